"""Adaptive candidate rounds (beyond UltraEdit): generate candidates for an edit in rounds,
scoring and filtering each round, and stop the edit once `until_accepted` of its candidates
pass, instead of always generating a fixed 30 (free-form) or 100 (region).

    run(ws, "adaptive", Selection(where="mode = 'free'"), until_accepted=4, max_candidates=30,
        round_size=8, generate={"size": 512})

Each round's generate, score and filter run through `runner.run` as children of one
`adaptive` run (a StepsStage, recipe.ParentRun); the edits still open are a scope of the
user's selection (CLOSED, in SQL) and their candidates a child selection of it: no id list
leaves the catalog.

Round r asks `generate` for the first min(max_candidates, r * round_size) candidates of the
edits still open (generation plans candidates by index with deterministic seeds, so a round
only renders the new indices, and candidate i is the same pair whichever scheme produced it),
then scores them and filters the open edits with top-k = until_accepted. An edit closes when
it has until_accepted accepted candidates, or when it reaches max_candidates.

Because candidate i is the same pair under both schemes, `compare_schemes` measures, on the
same scored edits, how many candidates each scheme generates per successful edit (an edit with
at least K passing candidates), without generating anything twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import Catalog
from ..errors import UltracurateError
from ..runner import StepsStage
from ..selection import Selection, selected_keys_sql
from ..thresholds import Thresholds


@dataclass
class AdaptiveResult:
    rounds: list[dict] = field(default_factory=list)  # per round: candidates asked, open edits
    edits: int = 0
    succeeded: int = 0
    generated: int = 0

    @property
    def candidates_per_success(self) -> float | None:
        return self.generated / self.succeeded if self.succeeded else None

    def to_json(self) -> dict:
        return dict(self.__dict__, candidates_per_success=self.candidates_per_success)


# An edit of the selection is closed once it has until_accepted ($_uc_k) accepted candidates.
CLOSED = ("edit_id IN (SELECT edit_id FROM candidates_v WHERE status = 'accepted' "
          "GROUP BY edit_id HAVING count(*) >= $_uc_k)")


def _count(cat: Catalog, selection: Selection, table: str, where: str | None = None) -> int:
    from ..catalog import KEYS, VIEWS
    sql, params = selected_keys_sql(cat.con, VIEWS[table], KEYS[table], selection, where,
                                    "count(*) AS n")
    return int(cat.scalar(sql, params))


class AdaptiveStage(StepsStage):
    """Generate, score and filter the selected edits in rounds until each has until_accepted
    accepted candidates or max_candidates candidates. Each round is three stage runs, children
    of the `adaptive` run; the edits still open and their candidates are selected in SQL (a
    scope on the user's selection, and a child selection of it). generate / score: more
    options of those stages (engine, device, batch_size ... included)."""

    name = "adaptive"
    table = "edits"

    def __init__(self, until_accepted: int = 4, max_candidates: int = 30, round_size: int = 8,
                 thresholds: Thresholds | dict | None = None, preset: str | None = None,
                 generate: dict | None = None, score: dict | None = None):
        if until_accepted < 1 or max_candidates < until_accepted or round_size < 1:
            raise UltracurateError("adaptive rounds need 1 <= --until-accepted <= "
                                   "--max-candidates and a round size of at least 1")
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        t = thresholds or Thresholds.preset(preset or "ultraedit")
        self.thresholds = t.override(top_k=until_accepted)
        self.until_accepted, self.max_candidates = int(until_accepted), int(max_candidates)
        self.round_size = int(round_size)
        self.generate, self.score = dict(generate or {}), dict(score or {})
        super().__init__(until_accepted=self.until_accepted,
                         max_candidates=self.max_candidates, round_size=self.round_size,
                         thresholds=self.thresholds.to_dict(), generate=self.generate,
                         score=self.score)

    def check(self, r, selection: Selection) -> None:
        selection.checked(r.cat.con, "edits_v")  # a bad --where: before anything is recorded

    def steps(self, ws, selection: Selection, parent, progress: bool) -> AdaptiveResult:
        from ..recipe import Step
        k, t = self.until_accepted, self.thresholds
        still_open = selection.narrowed(f"NOT ({CLOSED})", _uc_k=k)
        with ws.catalog(read_only=True) as cat:
            res = AdaptiveResult(edits=_count(cat, selection, "edits"))
        asked, n_open, step = 0, res.edits, 0
        while n_open and asked < self.max_candidates:
            asked = min(self.max_candidates, asked + self.round_size)
            # round 1 takes every selected edit; later ones those the rounds left open
            edits = selection if not res.rounds else still_open
            candidates = edits.within("edits", "candidate_index < $_uc_n", _uc_n=asked)
            for stage, options, sel in (
                    ("generate", {**self.generate, "candidates": asked}, edits),
                    ("score", dict(self.score), candidates),
                    ("filter", {"thresholds": t}, candidates)):
                run_options = {o: options.pop(o) for o in ("engine", "address", "workers",
                                                           "device", "batch_size")
                               if o in options}
                parent.run_step(step, Step(stage, options, run=run_options, selection=sel),
                                progress)
                step += 1
            with ws.catalog(read_only=True) as cat:
                left = _count(cat, still_open, "edits")
            res.rounds.append({"candidates": asked, "open_edits": n_open,
                               "closed": n_open - left})
            res.succeeded += n_open - left
            n_open = left
        with ws.catalog(read_only=True) as cat:
            res.generated = _count(cat, selection.within("edits"), "candidates",
                                   "edited_image IS NOT NULL")
        return res


def compare_schemes(ws, selection: Selection | None = None, *, until_accepted: int = 4,
                    max_candidates: int = 30, round_size: int = 8, fixed: int = 30,
                    thresholds: Thresholds | None = None) -> dict:
    """On edits already scored with at least `fixed` candidates: candidates generated per
    successful edit (>= until_accepted passing) under the fixed scheme and the adaptive one,
    and the mean clip_sim_dir of the candidates each would keep."""
    from .filter import DEFAULT_WHERE, _decision_sql
    t = thresholds or Thresholds.preset("ultraedit")
    with ws.catalog(read_only=True) as cat:
        sql, params, _ = _decision_sql(cat.con, selection or Selection(), t)
        rows = cat.query(f"SELECT d.edit_id, c.candidate_index, d.clip_sim_dir, "
                         f"NOT d.failed AS pass FROM ({sql}) d JOIN candidates c "
                         f"USING (candidate_id) ORDER BY d.edit_id, c.candidate_index", params)
    by_edit: dict[int, list[tuple[bool, float]]] = {}
    for r in rows:
        by_edit.setdefault(r["edit_id"], []).append((bool(r["pass"]), r["clip_sim_dir"]))
    out = {"edits": 0, "fixed": {"generated": 0, "succeeded": 0, "kept_dir": []},
           "adaptive": {"generated": 0, "succeeded": 0, "kept_dir": []}}
    for cands in by_edit.values():
        if len(cands) < fixed:
            continue  # only edits with the full fixed scheme's candidates compare fairly
        out["edits"] += 1
        f = cands[:fixed]
        passing = sorted((d for p, d in f if p), reverse=True)
        out["fixed"]["generated"] += fixed
        if len(passing) >= until_accepted:
            out["fixed"]["succeeded"] += 1
            out["fixed"]["kept_dir"] += passing[:until_accepted]
        n = 0
        while n < min(max_candidates, len(cands)):
            n = min(max_candidates, len(cands), n + round_size)
            p = sorted((d for ok, d in cands[:n] if ok), reverse=True)
            if len(p) >= until_accepted:
                out["adaptive"]["succeeded"] += 1
                out["adaptive"]["kept_dir"] += p[:until_accepted]
                break
        out["adaptive"]["generated"] += n
    for k in ("fixed", "adaptive"):
        s = out[k]
        s["candidates_per_success"] = (s["generated"] / s["succeeded"] if s["succeeded"]
                                       else None)
        kd = s.pop("kept_dir")
        s["mean_kept_clip_sim_dir"] = sum(kd) / len(kd) if kd else None
    out["where"] = DEFAULT_WHERE
    return out
