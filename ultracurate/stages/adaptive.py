"""Adaptive candidate rounds (beyond UltraEdit): generate candidates for an edit in rounds,
scoring and filtering each round, and stop the edit once `until_accepted` of its candidates
pass, instead of always generating a fixed 30 (free-form) or 100 (region).

    run_adaptive(ws, Selection(where="mode = 'free'"), until_accepted=4, max_candidates=30,
                 round_size=8, generate_kwargs={"size": 512})

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


def _edit_ids(cat: Catalog, selection: Selection) -> list[int]:
    sql, params = selected_keys_sql(cat.con, "edits_v", "edit_id", selection, None, "edit_id")
    return [r["edit_id"] for r in cat.query(sql + " ORDER BY edit_id", params)]


def _accepted_per_edit(cat: Catalog, ids: list[int]) -> dict[int, int]:
    rows = cat.query("SELECT edit_id, count(*) FILTER (WHERE status = 'accepted') AS n "
                     "FROM candidates_v WHERE list_contains($ids, edit_id) GROUP BY edit_id",
                     {"ids": ids})
    return {r["edit_id"]: r["n"] for r in rows}


def run_adaptive(ws, selection: Selection | None = None, *, until_accepted: int = 4,
                 max_candidates: int = 30, round_size: int = 8,
                 thresholds: Thresholds | None = None, generate_kwargs: dict | None = None,
                 score_kwargs: dict | None = None, progress: bool = False) -> AdaptiveResult:
    """Generate, score and filter the selected edits in rounds until each has until_accepted
    accepted candidates or max_candidates candidates."""
    from .filter import run_filter
    from .generate import run_generate
    from .score import run_score
    if until_accepted < 1 or max_candidates < until_accepted or round_size < 1:
        raise UltracurateError("adaptive rounds need 1 <= --until-accepted <= "
                               "--max-candidates and a round size of at least 1")
    t = (thresholds or Thresholds.preset("ultraedit")).override(top_k=until_accepted)
    with ws.catalog(read_only=True) as cat:
        open_ids = _edit_ids(cat, selection or Selection())
    res = AdaptiveResult(edits=len(open_ids))
    asked = 0
    done: set[int] = set()
    while open_ids and asked < max_candidates:
        asked = min(max_candidates, asked + round_size)
        sel = Selection(where="list_contains($_uc_ids, edit_id)", params={"_uc_ids": open_ids},
                        trusted=True)
        run_generate(ws, sel, candidates=asked, progress=progress, **(generate_kwargs or {}))
        cand_sel = Selection(where="list_contains($_uc_ids, edit_id) AND candidate_index < "
                                   "$_uc_n", params={"_uc_ids": open_ids, "_uc_n": asked},
                             trusted=True)
        run_score(ws, cand_sel, progress=progress, **(score_kwargs or {}))
        run_filter(ws, cand_sel, t)
        with ws.catalog(read_only=True) as cat:
            acc = _accepted_per_edit(cat, open_ids)
        closed = [e for e in open_ids if acc.get(e, 0) >= until_accepted]
        done.update(closed)
        res.rounds.append({"candidates": asked, "open_edits": len(open_ids),
                           "closed": len(closed)})
        open_ids = [e for e in open_ids if e not in set(closed)]
    with ws.catalog(read_only=True) as cat:
        all_ids = _edit_ids(cat, selection or Selection())
        res.generated = cat.scalar(
            "SELECT count(*) FROM candidates WHERE list_contains($ids, edit_id) AND "
            "edited_image IS NOT NULL", {"ids": all_ids})
    res.succeeded = len(done)
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
        sql, params, _ = _decision_sql(cat, selection or Selection(), t)
        rows = cat.query(f"SELECT d.edit_id, c.candidate_index, d.clip_sim_dir, "
                         f"len(d.reasons) = 0 AS pass FROM ({sql}) d JOIN candidates c "
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
