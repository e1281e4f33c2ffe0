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

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import polars as pl

from ..catalog import Catalog, named_queries, now
from ..errors import UltracurateError, reason_text
from ..images import BadImage, inspect_image, read_bytes
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


@contextlib.contextmanager
def _tx(cat: Catalog):
    """BEGIN ... COMMIT around a block (ROLLBACK on any error)."""
    cat.con.execute("BEGIN")
    try:
        yield
        cat.con.execute("COMMIT")
    except BaseException:
        cat.con.execute("ROLLBACK")
        raise


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
    with _tx(cat):
        first = cat.next_id("sessions")
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
    first = cat.next_id("anchors")
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
    with _tx(cat):
        if rows:
            cat.insert_rows("anchors", pl.DataFrame(rows, schema_overrides={
                "source_path": pl.String, "conversion": pl.String}))
            cat.add_captions(captions, run_id)
        _end(cat, ended, turn)
    return len(due), len(rows), ended


def _end(cat: Catalog, reasons: dict[int, str], turn: int) -> None:
    if reasons:
        cat.update_rows("sessions", pl.DataFrame(
            {"session_id": list(reasons), "ended_turn": [turn] * len(reasons),
             "end_reason": [reason_text(r) for r in reasons.values()]},
            schema={"session_id": pl.Int64, "ended_turn": pl.Int32, "end_reason": pl.String}))


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
    with _tx(cat):
        if turns:
            cat.insert_rows("session_turns", pl.DataFrame(turns, schema={
                "session_id": pl.Int64, "turn": pl.Int32, "candidate_id": pl.Int64,
                "chain_run": pl.Int64, "created_at": pl.Datetime("us")}))
        _end(cat, ended, turn)
    rep.continued, rep.ended = len(turns), len(ended)
    return rep


# -- the library entry point -------------------------------------------------------------------
def run_chain(ws, selection: Selection | None = None, *, turns: int = 3, per_anchor: int = 1,
              candidates: int = 8, types: list[str] | str | None = None, seed: int = 0,
              thresholds: Thresholds | None = None, instruct: dict | None = None,
              ground: dict | None = None, generate: dict | None = None,
              score: dict | None = None, judge: dict | None = None,
              progress: bool = True, say: Callable[[str], None] | None = None) -> ChainResult:
    """Grow multi-turn sessions from the selected accepted candidates up to `turns` turns.

    per_anchor, types: instruct's for each turn's anchor; candidates: generated per edit.
    thresholds: the keep rule of each turn (default: the last filter run's, else UltraEdit's).
    instruct / ground / generate / score / judge: more options of those stages' `run_*`
    (e.g. generate={"size": 512}); judge must be given (possibly {}) when the keep rule has
    judge bounds. say: called with a line before each step (progress for a person).
    """
    from .classify_masks import run_classify_masks
    from .filter import latest_thresholds, run_filter
    from .generate import run_generate
    from .ground import run_ground
    from .instruct import run_instruct
    from .judge import clip_passed, run_judge
    from .score import run_score

    if turns < 1:
        raise UltracurateError(f"--turns must be at least 1 (got {turns})")
    if per_anchor < 1 or candidates < 1:
        raise UltracurateError("--per-anchor and --candidates must be at least 1")
    # options a later turn's stage would refuse: one clear error before anything is made
    from ..instruct.plan import parse_types
    from .generate import GenerateStage
    parse_types(types)
    GenerateStage(size=(generate or {}).get("size", 512))
    selection = selection or Selection()
    say = say or (lambda line: None)
    with ws.catalog() as cat:
        selection.checked_where(cat.con, "candidates_v")  # a bad --where: before any change
        t = thresholds or latest_thresholds(cat) or Thresholds.preset("ultraedit")
        t.validate()
        if t.has_judge_rules() and judge is None:
            raise UltracurateError("the keep rule has judge bounds (judge_*_min): chain needs "
                                   "the judge too (--judge)")
        run_id = cat.start_run("chain", {"turns": turns, "per_anchor": per_anchor,
                                         "candidates": candidates, "types": types,
                                         "seed": seed, "thresholds": t.to_dict(),
                                         "judge": judge is not None},
                               selection.to_json(), None)
    res = ChainResult(run_id)
    state, message = "failed", None
    try:
        with ws.catalog() as cat:
            res.roots, sessions, res.new_sessions = start_sessions(cat, selection, run_id)
        res.sessions = len(sessions)
        say(f"chain: {res.sessions} sessions ({res.new_sessions} new) from {res.roots} roots")
        for turn in range(2, turns + 1):
            with ws.catalog() as cat:
                n_due, made, stopped = make_anchors(cat, ws, sessions, turn, run_id)
                due = [r[0] for r in cat.con.execute(
                    _q("at_turn"), {"turn": turn, "sessions": sessions}).fetchall()]
            rep = TurnReport(turn, sessions=n_due, anchors_made=made)
            if due:
                prm = {"_uc_turn": turn, "_uc_sessions": due}
                anchors_sel = Selection(TURN_ANCHORS, prm, trusted=True)
                rows_sel = Selection(TURN_ROWS, prm, trusted=True)
                steps = [
                    ("instruct", lambda: run_instruct(
                        ws, anchors_sel, per_anchor=per_anchor, types=types, seed=seed,
                        progress=progress, **(instruct or {}))),
                    ("ground", lambda: run_ground(ws, rows_sel, progress=progress,
                                                  **(ground or {}))),
                    ("classify-masks", lambda: run_classify_masks(ws, rows_sel,
                                                                  progress=progress)),
                    ("generate", lambda: run_generate(ws, rows_sel, candidates=candidates,
                                                      seed=seed, progress=progress,
                                                      **(generate or {}))),
                    ("score", lambda: run_score(ws, rows_sel, progress=progress,
                                                **(score or {}))),
                ]
                if judge is not None:
                    def judge_step():
                        with ws.catalog(read_only=True) as c2:
                            where = f"({TURN_ROWS}) AND ({clip_passed(c2)})"
                        return run_judge(ws, Selection(where, prm, trusted=True),
                                         seed=seed, progress=progress, **judge)
                    steps.append(("judge", judge_step))
                steps.append(("filter", lambda: run_filter(ws, rows_sel, t)))
                for name, step in steps:
                    say(f"chain: turn {turn}: {name} ({len(due)} sessions)")
                    rep.stages[name] = _summary(step())
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
        state = "completed"
    except KeyboardInterrupt:
        state, message = "interrupted", "interrupted by the user"
        raise
    except BaseException as e:
        message = reason_text(e, typed=not isinstance(e, UltracurateError))
        raise
    finally:
        try:
            with ws.catalog() as cat:
                cat.end_run(run_id, state, message or res.text().replace("\n", "; "))
                cat.con.execute("UPDATE runs SET rows_in = ?, rows_done = ? WHERE run_id = ?",
                                [res.sessions, sum(t.continued for t in res.turns), run_id])
        except UltracurateError:
            pass  # never hide the chain's own outcome behind its run row
    return res


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _summary(obj) -> Any:
    """A stage's summary as plain data (every run_* returns an object with to_json)."""
    return obj.to_json()
