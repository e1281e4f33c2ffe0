"""Filter: the keep rule (ultracurate.thresholds), applied as one set-based SQL update.

For every selected scored candidate it decides `auto_status` ('accepted' | 'rejected') and
records ALL of the reasons a rejected row fails, e.g.
['clip_sim_image < 0.75', 'clip_sim_dir < 0.22', 'judge_instruction < 4'] (a score the row
lacks fails its rule as 'judge_quality missing'; one row each in `candidate_rejects`, which
`candidates_v.reject_reasons` lists), then per edit:

- top-k: among the rows that pass the thresholds, the k with the highest clip_sim_dir stay
  accepted; the others record 'not in top 4 by clip_sim_dir';
- the region rule (region mode by default): an edit with fewer than k passing rows is dropped,
  every one of its rows recording 'edit has 2 < 3 passing candidates'.

Human decisions (`human_decision`, set by review) are never written here; `candidates_v.status`
lets them override `auto_status`, so they survive any re-filtering. A human-rejected row takes
no top-k place; a human-accepted row takes one first.

Filtering is a pure function of the scores and thresholds: rerunning it with other thresholds
recomputes every selected row's decision (nothing is lost, the previous run is in `runs`).
`run(ws, "filter", ..., dry_run=True)` computes the funnel and changes nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..catalog import Catalog
from ..errors import UltracurateError
from ..names import MODES
from ..runner import SetStage
from ..selection import Selection, selected_keys_sql
from ..thresholds import JUDGE_COLUMNS, SCORE_RANGES, Rule, Thresholds

DEFAULT_WHERE = ("auto_status IN ('scored', 'accepted', 'rejected') "
                 "AND clip_sim_dir IS NOT NULL")
_SCORE_COLS = ", ".join(SCORE_RANGES)  # every column a rule can bound, the judge's too
# Which passing candidate of a group comes first (top-k; and the one a chain continues with):
# a human accept, then the highest clip_sim_dir.
RANK_ORDER = ("(human_decision = 'accept') DESC NULLS LAST, clip_sim_dir DESC NULLS LAST, "
              "candidate_id")


@dataclass
class FunnelStep:
    step: str            # 'clip_sim_dir >= 0.22', 'top-k', 'region rule'
    removed_alone: int   # rows this step removes on its own (thresholds only)
    removed: int         # rows it removes after the steps before it
    remaining: int


@dataclass
class FilterResult:
    run_id: int | None
    rows_in: int
    accepted: int
    rejected: int
    funnel: list[FunnelStep] = field(default_factory=list)
    human_accepted: int = 0
    human_rejected: int = 0
    dry_run: bool = False
    thresholds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["funnel"] = [s.__dict__ for s in self.funnel]
        return d


def _lit(x: float) -> str:
    """A threshold as an SQL number (Thresholds.validate has refused nan and inf)."""
    v = float(x)
    if not math.isfinite(v):
        raise UltracurateError(f"threshold {x!r} is not a finite number")
    return repr(v)


def _cond(rule: Rule) -> str:
    """SQL that is true when a row FAILS rule (a missing score fails too)."""
    bad = "<" if rule.op == ">=" else ">"
    return f"coalesce({rule.column} {bad} {_lit(rule.value)}, true)"


def _reason(rule: Rule, missing: str) -> str:
    """SQL for what a row failing rule records: the rule's reason, or '<column> missing'
    (missing: SQL true when the row lacks the rule's score)."""
    return f"(CASE WHEN {missing} THEN '{rule.column} missing' ELSE '{rule.reason}' END)"


def _per_mode(exprs: dict[str, str], default: str = "NULL") -> str:
    whens = " ".join(f"WHEN '{m}' THEN {e}" for m, e in exprs.items())
    return f"(CASE mode {whens} ELSE {default} END)" if whens else f"({default})"


def verdict_sql(t: Thresholds) -> tuple[str, str]:
    """(CLIP verdict, judge verdict): SQL over candidates_v true when a row passes the score
    rules of its mode, and the judge rules (`Thresholds.verdict_rules`). Trusted predicates
    (column names and numbers only), usable as a --where."""
    def passes(rules: list[Rule]) -> str:
        return " AND ".join(f"NOT {_cond(r)}" for r in rules) or "true"
    clip = _per_mode({m: passes(t.verdict_rules(m)[0]) for m in MODES}, "false")
    judge = _per_mode({m: passes(t.verdict_rules(m)[1]) for m in MODES}, "false")
    return clip, judge


JUDGED = " AND ".join(f"{c} IS NOT NULL" for c in JUDGE_COLUMNS)


def _bit(i: int) -> int:
    """Rule i's bit in a row's `fails` and `missing` masks."""
    return 1 << i


def _has(mask: str, i: int) -> str:
    return f"(({mask} & {_bit(i)}) <> 0)"


def _decision_sql(con, selection: Selection, t: Thresholds) -> tuple[str, dict, list]:
    """SQL giving, per selected row: candidate_id, edit_id, clip_sim_dir, `fails` (bit i:
    the row fails distinct rule i; `_has`), `missing` (bit i: it lacks rule i's score),
    `failed` (any rule), human_decision, k, n_pass, dropped_by_region, cut_by_topk and
    `rejected`. Also the distinct rules.
    Bits, not a list of reasons nor a column per rule: building a list per row cost most of
    the decision at 3M rows, and each column of the decision table a tenth of a second or
    more to write; the reasons are made from the bits for the rejected rows only
    (`_reasons_sql`)."""
    inner, params = selected_keys_sql(
        con, "candidates_v", "candidate_id", selection, DEFAULT_WHERE,
        f"candidate_id, edit_id, mode, human_decision, {_SCORE_COLS}")
    rules = t.all_rules()
    if len(rules) > 62:
        raise UltracurateError(f"filter takes at most 62 distinct rules, got {len(rules)}")
    fails, missing = [], []
    for i, rule in enumerate(rules):
        applies = _per_mode({m: "true" for m in MODES if rule in t.rules(m)}, "false")
        fails.append(f"(({applies} AND {_cond(rule)})::BIGINT << {i})")
        missing.append(f"(({rule.column} IS NULL)::BIGINT << {i})")
    k = _per_mode({m: str(t[m].top_k) for m in MODES if t[m].top_k})
    drop = _per_mode({m: "true" for m in MODES if t[m].drop_if_fewer and t[m].top_k}, "false")
    # A step read once is not materialised (DuckDB would write it to memory first: a second
    # or more at 3M rows). The pool: rows that pass the thresholds and no person rejected, or
    # that a person accepted; NULL for a failing row no person decided, which counts nothing.
    sql = f"""
    WITH sel AS NOT MATERIALIZED ({inner}),
    r AS NOT MATERIALIZED (
      SELECT *, ({" | ".join(fails) or "0"})::BIGINT AS fails,
        ({" | ".join(missing) or "0"})::BIGINT AS missing, {k} AS k, {drop} AS drop_rule
      FROM sel),
    p AS MATERIALIZED (
      SELECT candidate_id, edit_id, human_decision, clip_sim_dir, fails, missing, k,
        drop_rule, fails <> 0 AS failed,
        ((fails = 0 AND human_decision IS DISTINCT FROM 'reject')
         OR human_decision = 'accept') AS pool FROM r),
    -- Per edit, how many rows are in the pool, from the rows whose place is known (NULL for
    -- an edit without any, as a sum over none): a window over every row cost a sort of
    -- them all.
    passing AS (
      SELECT edit_id, sum(pool::INTEGER)::INTEGER AS n_pass FROM p WHERE pool IS NOT NULL
      GROUP BY edit_id),
    -- Top-k ranks the pool of the edits with more than k in it (the others keep theirs).
    ranks AS (
      SELECT candidate_id, row_number() OVER (PARTITION BY edit_id ORDER BY {RANK_ORDER})
        AS rank
      FROM p JOIN passing USING (edit_id) WHERE pool AND n_pass > k),
    ranked AS NOT MATERIALIZED (
      SELECT p.*, n_pass, rank
      FROM p LEFT JOIN passing USING (edit_id) LEFT JOIN ranks USING (candidate_id)),
    decided AS NOT MATERIALIZED (
      SELECT candidate_id, edit_id, clip_sim_dir, fails, missing, failed, human_decision, k,
        n_pass, coalesce(drop_rule AND n_pass < k, false) AS dropped_by_region,
        coalesce(pool AND NOT coalesce(drop_rule AND n_pass < k, false) AND rank > k, false)
          AS cut_by_topk
      FROM ranked)
    SELECT *, (failed OR dropped_by_region OR cut_by_topk) AS rejected FROM decided"""
    return sql, params, rules


# What the decision table keeps of each row: what the funnel, the reasons and the update read.
DECIDED = ("candidate_id, fails, missing, human_decision, k, n_pass, dropped_by_region, "
           "cut_by_topk, rejected")


def _reasons_sql(decided: str, rules: list[Rule]) -> str:
    """The reasons of the rejected rows of a decision table, one row each, numbered in the
    order filter gives them: the rules', the region rule's, top-k's. A reason's number is
    how many come before it (the failed rules before it), so no window sorts the reasons."""
    def before(i: int) -> str:
        return f"bit_count(fails & {_bit(i) - 1})::INTEGER"
    parts = [f"SELECT candidate_id, {before(i)} AS reason_index, "
             f"{_reason(rule, _has('missing', i))} AS reason FROM {decided} "
             f"WHERE {_has('fails', i)}" for i, rule in enumerate(rules)]
    n = len(rules)
    # a row the region rule drops takes no top-k place: at most one of the two
    parts.append(f"SELECT candidate_id, {before(n)}, 'edit has ' || n_pass || ' < ' || k || "
                 f"' passing candidates' FROM {decided} WHERE dropped_by_region")
    parts.append(f"SELECT candidate_id, {before(n)}, 'not in top ' || k || "
                 f"' by clip_sim_dir' FROM {decided} WHERE cut_by_topk")
    return " UNION ALL ".join(parts)


def _funnel(cat, sql: str, params: dict, rules: list[Rule],
            rules_by_mode: dict[str, list[Rule]]) -> tuple[list, dict]:
    n = len(rules)
    parts = ["count(*) AS total"]
    for i in range(n):
        parts.append(f"count(*) FILTER (WHERE {_has('fails', i)}) AS alone_{i}")
        parts.append(f"count(*) FILTER (WHERE (fails & {_bit(i + 1) - 1}) = 0) AS left_{i}")
    parts += [
        "count(*) FILTER (WHERE fails = 0) AS pass_thresholds",
        "count(*) FILTER (WHERE fails = 0 AND dropped_by_region) AS region_removed",
        "count(*) FILTER (WHERE fails = 0 AND dropped_by_region) AS region_alone",
        "count(*) FILTER (WHERE fails = 0 AND cut_by_topk) AS topk",
        "count(*) FILTER (WHERE NOT rejected) AS accepted",
        "count(*) FILTER (WHERE human_decision = 'accept') AS h_acc",
        "count(*) FILTER (WHERE human_decision = 'reject') AS h_rej",
    ]
    row = cat.query(f"SELECT {', '.join(parts)} FROM ({sql}) d", params)[0]
    steps = []
    prev = row["total"]
    for i, rule in enumerate(rules):
        left = row[f"left_{i}"]
        only = [m for m in MODES if rule in rules_by_mode[m]]
        name = rule.name + (f" ({only[0]})" if len(only) == 1 else "")
        steps.append(FunnelStep(name, row[f"alone_{i}"], prev - left, left))
        prev = left
    after_region = prev - row["region_removed"]
    steps.append(FunnelStep("region rule (edit has fewer than k passing)",
                            row["region_alone"], row["region_removed"], after_region))
    steps.append(FunnelStep("top-k by clip_sim_dir", row["topk"], row["topk"],
                            after_region - row["topk"]))
    return steps, row


class FilterStage(SetStage):
    """The keep rule over the selected scored candidates, as one set-based UPDATE (see the
    module docstring)."""

    name = "filter"
    table = "candidates"
    writes = {"candidates": {"auto_status", "filter_run"},
              "candidate_rejects": {"candidate_id", "reason_index", "reason", "filter_run"}}

    def __init__(self, thresholds: Thresholds | dict | None = None, preset: str = "ultraedit",
                 mode: str | None = None, clip_min: float | None = None, **bounds):
        """thresholds: a Thresholds (or its dict); else the preset (UltraEdit's, per mode)
        with bounds overriding it (ModeThresholds fields: clip_sim_dir_min=0.25, top_k=4,
        unset=[...]), for one mode or both."""
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        t = thresholds or Thresholds.preset(preset)
        if mode is not None or clip_min is not None or bounds:
            t = t.override(mode=mode, clip_min=clip_min, **bounds)
        t.validate()
        self.thresholds = t
        super().__init__(thresholds=t.to_dict())

    def plan(self, r, selection):
        t = self.thresholds
        sql, params, rules = _decision_sql(r.cat.con, selection, t)
        # Every selected row's decision, computed once (window functions over millions of
        # rows): the funnel counts it and apply writes it.
        decided = r.temp_table(f"SELECT {DECIDED} FROM ({sql}) d", params)
        self._conn = r
        steps, counts = _funnel(r, f"SELECT * FROM {decided}", None, rules,
                                {m: t.rules(m) for m in MODES})
        total = counts["total"]
        result = FilterResult(None, total, counts["accepted"], total - counts["accepted"],
                              steps, counts["h_acc"], counts["h_rej"], False, t.to_dict())
        return decided, rules, result

    def _drop(self, decided: str) -> None:
        try:
            self._conn.drop_temp(decided)
        except Exception:
            pass  # the connection is gone: so is its temporary table

    def preview(self, plan):
        decided, _, result = plan
        self._drop(decided)
        result.dry_run = True
        return result

    def failed(self, plan, error) -> None:
        self._drop(plan[0])

    def apply(self, w, plan, produced):
        d, rules, result = plan
        run = {"_uc_run": w.run_id}
        # The row's status is a scalar update, and its reasons are rows of candidate_rejects
        # (old ones deleted, new ones appended): a list column rewritten in place cost 52 s
        # of 70 at 4.1M rows (migration 011).
        w.candidates.update_from(
            f"""SELECT candidate_id, $_uc_run AS filter_run,
                       CASE WHEN rejected THEN 'rejected' ELSE 'accepted' END AS auto_status
                FROM {d}""", run, ["auto_status", "filter_run"])
        w.candidate_rejects.delete_keys(f"SELECT candidate_id FROM {d}", None)
        w.candidate_rejects.insert_from(
            f"SELECT *, $_uc_run AS filter_run FROM ({_reasons_sql(d, rules)}) reasons", run,
            ["candidate_id", "reason_index", "reason", "filter_run"])
        w.drop_temp(d)
        w.run.rows_in = w.run.rows_done = result.rows_in
        w.run.message = json.dumps(result.to_json()["funnel"])
        result.run_id = w.run_id
        return result


def latest_thresholds(cat: Catalog) -> Thresholds | None:
    """The thresholds of the last completed filter run, if any."""
    rows = cat.query("SELECT params FROM runs WHERE stage = 'filter' AND state = 'completed' "
                     "ORDER BY run_id DESC LIMIT 1")
    if not rows:
        return None
    p = rows[0]["params"]
    p = json.loads(p) if isinstance(p, str) else p
    return Thresholds.from_dict(p["thresholds"])


def format_funnel(result: FilterResult) -> str:
    """The funnel as a plain-text table."""
    w = max([len(s.step) for s in result.funnel] + [20])
    lines = [f"{'step':<{w}}  {'alone':>8}  {'removed':>8}  {'remaining':>9}",
             f"{'selected rows':<{w}}  {'':>8}  {'':>8}  {result.rows_in:>9}"]
    for s in result.funnel:
        lines.append(f"{s.step:<{w}}  {s.removed_alone:>8}  {s.removed:>8}  {s.remaining:>9}")
    lines.append(f"accepted {result.accepted}, rejected {result.rejected}"
                 + (f"; human decisions override: {result.human_accepted} accepted, "
                    f"{result.human_rejected} rejected" if result.human_accepted
                    or result.human_rejected else "")
                 + (" (dry run: nothing changed)" if result.dry_run else
                    f" (run {result.run_id})"))
    return "\n".join(lines)


