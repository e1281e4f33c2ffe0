"""Multi-turn edit chains (beyond UltraEdit, whose pairs are all single-turn; MagicBrush
evaluates sessions of up to three turns): an accepted candidate's edited image becomes the
anchor of the next turn, and each turn runs the normal stages on it.

    run_chain(ws, Selection(where="edit_type = 'add'"), turns=3, candidates=8)

A *session* starts from a root: the best accepted candidate (a human accept first, then the
highest clip_sim_dir: the filter's ranking) of each selected edit on a photo; that candidate
is turn 1. For turn t = 2..turns, each open session that has turn t - 1:

1. gets an anchor: the turn t - 1 candidate's edited image (the same media file), with its
   lineage (parent_candidate_id, session_id, turn = t) and one caption, the parent's target
   caption (source `chain`, through the catalog's anchor_captions);
2. runs instruct (per_anchor edits), ground and classify-masks, generate (`candidates` per
   edit), score, the judge when the keep rule has judge bounds, and filter (the keep rule of
   the last filter run), each the library's own `run_*` over exactly this turn's rows;
3. continues with the turn's best accepted candidate (recorded in session_turns), or ends
   (sessions.ended_turn, end_reason) when the turn yields nothing accepted. A session whose
   turn has unfinished work (a failed row, an undecided candidate) neither continues nor ends:
   a rerun retries that work first.

Every step is idempotent on the catalog: sessions and anchors are made once (a rerun finds
them), each stage skips the rows it finished, filter is a pure function of the scores, and a
turn is recorded once. So a chain killed at any point and rerun with the same options goes on
where it stopped, and `--turns` larger than before extends the open sessions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..catalog import Catalog, named_queries, now
from ..errors import UltracurateError, reason_text
from ..images import BadImage, inspect_image, read_bytes
from ..runner import StepsStage
from ..selection import Selection, selected_keys_sql
from ..thresholds import Thresholds

CAPTION_SOURCE = "chain"
DATASET = "chain"
# Roots: accepted candidates with an edited image, on a photo (not on an anchor a chain made).
ROOT_WHERE = ("status = 'accepted' AND edited_image IS NOT NULL "
              "AND anchor_session_id IS NULL")
# A turn's rows, in each view a stage runs over.
TURN_ANCHORS = "turn = $_uc_turn AND list_contains($_uc_sessions, session_id)"
TURN_ROWS = "anchor_turn = $_uc_turn AND list_contains($_uc_sessions, anchor_session_id)"


@dataclass
class TurnReport:
    turn: int
    sessions: int = 0             # sessions that could take this turn
    anchors_made: int = 0
    continued: int = 0            # got an accepted candidate for this turn
    ended: int = 0                # yielded nothing accepted
    waiting: int = 0              # unfinished work: a rerun retries it
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChainResult:
    run_id: int
    roots: int = 0
    sessions: int = 0
    new_sessions: int = 0
    turns: list[TurnReport] = field(default_factory=list)
    by_length: dict[int, int] = field(default_factory=dict)   # session turns -> sessions
    open: int = 0
    ended: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        lines = [f"chain (run {self.run_id}): {self.sessions} sessions "
                 f"({self.new_sessions} new) from {self.roots} roots"]
        for t in self.turns:
            lines.append(f"  turn {t.turn}: {t.sessions} sessions, {t.continued} continued, "
                         f"{t.ended} ended" + (f", {t.waiting} waiting on failed or "
                                               "unfinished rows (rerun to retry)"
                                               if t.waiting else ""))
        lengths = ", ".join(f"{n} with {k} turn{'s' if k != 1 else ''}"
                            for k, n in sorted(self.by_length.items()))
        lines.append(f"  sessions: {lengths or 'none'}; {self.open} open, {self.ended} ended")
        return "\n".join(lines)


def _q(name: str) -> str:
    from .filter import RANK_ORDER
    return named_queries("chain")[name].replace("{rank_order}", RANK_ORDER)


# -- sessions and anchors ----------------------------------------------------------------------
def start_sessions(cat: Catalog, selection: Selection, run_id: int) -> tuple[int, list[int], int]:
    """(roots, the chain's session ids, sessions new in this run): one session per selected
    edit on a photo with an accepted candidate (its best), made once. Leaves _roots registered
    on cat's connection (the caller's; it goes with the connection)."""
    sel = Selection(f"({ROOT_WHERE})" + (f" AND ({selection.where}\n)" if selection.where
                                         else ""),
                    selection.params, selection.limit, selection.sample, selection.seed)
    sql, params = selected_keys_sql(
        cat.con, "candidates_v", "candidate_id", sel, ROOT_WHERE,
        "candidate_id, edit_id, anchor_id, human_decision, clip_sim_dir")
    roots = cat.arrow(_q("roots").replace("{selected}", sql), params)
    cat.con.register("_roots", roots)
    with cat.transaction():
        first = cat.sessions.next_id()
        cat.con.execute(_q("start_sessions"), {"first": first, "run": run_id, "at": now()})
        cat.con.execute(_q("first_turns"), {"run": run_id, "at": now()})
    ids = [r[0] for r in cat.con.execute(_q("chain_sessions")).fetchall()]
    new = sum(1 for i in ids if i >= first)
    return roots.num_rows, ids, new


def make_anchors(cat: Catalog, ws, sessions: list[int], turn: int, run_id: int
                 ) -> tuple[int, int, dict[int, str]]:
    """Anchors for turn `turn` of the due sessions that have none yet, each with its caption,
    in one transaction. Returns (sessions due, how many anchors made, {session: reason}) for
    the sessions that cannot go on (their edited image is unreadable, or already an anchor)."""
    due = cat.query(_q("due"), {"sessions": sessions, "turn": turn})
    todo = [d for d in due if d["anchor_id"] is None]
    ended: dict[int, str] = {}
    rows, captions = [], []
    # media names are the sha256 of their bytes, which anchors.sha256 holds unique
    shas = [d["edited_image"].split(".")[0] for d in todo]
    taken = dict(cat.con.execute("SELECT sha256, anchor_id FROM anchors WHERE "
                                 "list_contains($s, sha256)", {"s": shas}).fetchall())
    seen: set[str] = set()
    first = cat.anchors.next_id()
    for d in todo:
        sid, parent, name = d["session_id"], d["parent_candidate_id"], d["edited_image"]
        sha = name.split(".")[0]
        if sha in taken or sha in seen:
            ended[sid] = (f"turn {turn}: the edited image of candidate {parent} is already "
                          + (f"anchor {taken[sha]}" if sha in taken else
                             "the anchor of another session"))
            continue
        try:
            info, _ = inspect_image(read_bytes(ws.media.path(name)), name)
        except BadImage as e:
            ended[sid] = f"turn {turn}: candidate {parent}'s edited image: {e}"
            continue
        seen.add(sha)
        aid = first + len(rows)
        rows.append({"anchor_id": aid, "sha256": sha, "media": name, "source_path": None,
                     "dataset": DATASET, "width": info.width, "height": info.height,
                     "format": info.format, "orig_mode": info.mode,
                     "conversion": info.conversion or None,
                     "external_id": f"session {sid} turn {turn}", "ingest_run": run_id,
                     "ingested_at": now(), "parent_candidate_id": parent,
                     "session_id": sid, "turn": turn})
        captions.append({"anchor_id": aid, "caption": d["target_caption"],
                         "source": CAPTION_SOURCE})
    with cat.transaction():
        if rows:
            cat.anchors.insert(rows)
            cat.anchor_captions.merge(captions, run_id)
        _end(cat, ended, turn)
    return len(due), len(rows), ended


def _end(cat: Catalog, reasons: dict[int, str], turn: int) -> None:
    if reasons:
        cat.sessions.update([{"session_id": sid, "ended_turn": turn,
                              "end_reason": reason_text(r)} for sid, r in reasons.items()])


def decide_turn(cat: Catalog, sessions: list[int], turn: int, run_id: int) -> TurnReport:
    """Record turn `turn` of each of these sessions whose anchor yielded an accepted candidate
    (its best), end those that yielded none, and leave those with unfinished work."""
    rep = TurnReport(turn)
    turns, ended = [], {}
    for r in cat.query(_q("outcome"), {"sessions": sessions, "turn": turn}):
        if r["best"] is not None:
            turns.append({"session_id": r["session_id"], "turn": turn,
                          "candidate_id": r["best"], "chain_run": run_id, "created_at": now()})
        elif r["unfinished"]:
            rep.waiting += 1
        else:
            ended[r["session_id"]] = (f"turn {turn}: no accepted candidate ("
                                      f"{_n(r['candidates'], 'candidate')} of "
                                      f"{_n(r['edits'], 'edit')})")
    with cat.transaction():
        if turns:
            cat.session_turns.insert(turns)
        _end(cat, ended, turn)
    rep.continued, rep.ended = len(turns), len(ended)
    return rep


# -- the stage ---------------------------------------------------------------------------------
class ChainStage(StepsStage):
    """Grow multi-turn sessions from the selected accepted candidates up to `turns` turns
    (see the module docstring): each turn's stages run through `run`, as children of the
    chain's own run.

    per_anchor, types: instruct's for each turn's anchor; candidates: generated per edit.
    thresholds: the keep rule of each turn (default: the last filter run's, else UltraEdit's).
    instruct / ground / generate / score / judge: more options of those stages (e.g.
    generate={"size": 512}); judge must be given (possibly {}) when the keep rule has judge
    bounds. say: called with a line before each step (progress for a person)."""

    name = "chain"
    table = "candidates"

    def __init__(self, turns: int = 3, per_anchor: int = 1, candidates: int = 8,
                 types: list[str] | str | None = None, seed: int = 0,
                 thresholds: Thresholds | dict | None = None, instruct: dict | None = None,
                 ground: dict | None = None, generate: dict | None = None,
                 score: dict | None = None, judge: dict | None = None,
                 say: Callable[[str], None] | None = None):
        if turns < 1:
            raise UltracurateError(f"--turns must be at least 1 (got {turns})")
        if per_anchor < 1 or candidates < 1:
            raise UltracurateError("--per-anchor and --candidates must be at least 1")
        # options a later turn's stage would refuse: one clear error before anything is made
        from ..instruct.plan import parse_types
        from .generate import GenerateStage
        parse_types(types)
        GenerateStage(size=(generate or {}).get("size", 512))
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        self.turns, self.per_anchor, self.candidates = int(turns), int(per_anchor), int(candidates)
        self.types, self.seed, self.thresholds = types, int(seed), thresholds
        self.options = {"instruct": instruct or {}, "ground": ground or {},
                        "generate": generate or {}, "score": score or {}}
        self.judge = judge
        self.say = say or (lambda line: None)
        super().__init__(turns=self.turns, per_anchor=self.per_anchor,
                         candidates=self.candidates, types=types, seed=self.seed,
                         judge=judge is not None)

    def check(self, r, selection: Selection) -> None:
        from .filter import latest_thresholds
        selection.checked_where(r.cat.con, "candidates_v")  # a bad --where: before any change
        t = self.thresholds or latest_thresholds(r.cat) or Thresholds.preset("ultraedit")
        t.validate()
        if t.has_judge_rules() and self.judge is None:
            raise UltracurateError("the keep rule has judge bounds (judge_*_min): chain needs "
                                   "the judge too (--judge)")
        self.thresholds = t
        self.params["thresholds"] = t.to_dict()

    def steps(self, ws, selection: Selection, parent, progress: bool) -> "ChainResult":
        from ..recipe import Step
        res = ChainResult(parent.run_id)
        run_id, say, t = parent.run_id, self.say, self.thresholds
        with ws.catalog() as cat:
            res.roots, sessions, res.new_sessions = start_sessions(cat, selection, run_id)
        res.sessions = len(sessions)
        say(f"chain: {res.sessions} sessions ({res.new_sessions} new) from {res.roots} roots")
        step = 0
        for turn in range(2, self.turns + 1):
            with ws.catalog() as cat:
                n_due, made, stopped = make_anchors(cat, ws, sessions, turn, run_id)
                due = [r[0] for r in cat.con.execute(
                    _q("at_turn"), {"turn": turn, "sessions": sessions}).fetchall()]
            rep = TurnReport(turn, sessions=n_due, anchors_made=made)
            if due:
                prm = {"_uc_turn": turn, "_uc_sessions": due}
                anchors_sel = Selection(scope=(TURN_ANCHORS,), scope_params=prm)
                rows_sel = Selection(scope=(TURN_ROWS,), scope_params=prm)
                o = self.options
                plan = [
                    ("instruct", {"per_anchor": self.per_anchor, "types": self.types,
                                  "seed": self.seed, **o["instruct"]}, anchors_sel),
                    ("ground", o["ground"], rows_sel),
                    ("classify-masks", {}, rows_sel),
                    ("generate", {"candidates": self.candidates, "seed": self.seed,
                                  **o["generate"]}, rows_sel),
                    ("score", o["score"], rows_sel),
                ]
                if self.judge is not None:  # with no --where, the rows CLIP passed
                    plan.append(("judge", {"seed": self.seed, **self.judge}, rows_sel))
                plan.append(("filter", {"thresholds": t}, rows_sel))
                for name, options, sel in plan:
                    say(f"chain: turn {turn}: {name} ({len(due)} sessions)")
                    run_options = {k: options.pop(k) for k in ("device", "engine", "address",
                                                               "workers", "batch_size")
                                   if k in options}
                    options = {k: v for k, v in options.items() if v is not None}
                    done = parent.run_step(step, Step(name, options, run=run_options,
                                                      selection=sel), progress)
                    rep.stages[name] = done.summary.to_json()
                    step += 1
            with ws.catalog() as cat:
                decided = decide_turn(cat, due, turn, run_id) if due else TurnReport(turn)
            rep.continued, rep.waiting = decided.continued, decided.waiting
            rep.ended = decided.ended + len(stopped)
            res.turns.append(rep)
            say(f"chain: turn {turn}: {rep.continued} continued, {rep.ended} ended"
                + (f", {rep.waiting} waiting" if rep.waiting else ""))
        with ws.catalog(read_only=True) as cat:
            counts = cat.query("SELECT n_turns, session_state, count(*) AS n FROM sessions_v "
                               "WHERE list_contains($s, session_id) GROUP BY ALL",
                               {"s": sessions})
        for r in counts:
            res.by_length[r["n_turns"]] = res.by_length.get(r["n_turns"], 0) + r["n"]
            setattr(res, r["session_state"], getattr(res, r["session_state"]) + r["n"])
        parent.message = res.text().replace("\n", "; ")
        return res


def run_chain(ws, selection: Selection | None = None, *, progress: bool = True,
              **options) -> ChainResult:
    """`run(ws, "chain", selection, **options)`: the ChainResult (see ChainStage)."""
    from ..runner import run
    return run(ws, "chain", selection, progress=progress, **options).result


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"
