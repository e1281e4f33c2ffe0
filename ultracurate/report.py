"""The curation report: one self-contained HTML file (every figure inline as a base64 PNG).

Sections: the selection's counts by status; the acceptance funnel (the filter's thresholds
recomputed over the selection, without changing anything); score histograms per edit type with
the thresholds drawn (free-form solid, region dashed); the mask-class distribution; balance
before and after (per edit type: the accepted, de-duplicated rows balance chooses from, and the
rows export takes by default); CLIP against the judge (when rows were judged: how often the
CLIP verdict and the judge's disagree, a confusion table and example pairs of each kind of
disagreement); a grid of example pairs per edit type (accepted first, best clip_sim_dir
first).

    write_report(ws, "report.html", Selection(where="mode = 'free'"))
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import io
import os
from pathlib import Path

from .errors import UltracurateError
from .names import EDIT_TYPES, MODES, SCORE_COLUMNS
from .runner import SetStage
from .selection import Selection, selected_keys_sql
from .thresholds import Thresholds

_COLUMNS = ("candidate_id, edit_id, edit_type, mode, mask_class, status, auto_status, "
            "reject_reasons, selected, duplicate_of, source_image, edited_image, instruction, "
            + ", ".join(SCORE_COLUMNS))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return ("<img alt='figure' src='data:image/png;base64,"
            + base64.b64encode(buf.getvalue()).decode() + "'>")


def _table(headers, rows) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _histograms(df, t: Thresholds) -> str:
    plt = _plt()
    import numpy as np
    types = [e for e in EDIT_TYPES if e in set(df["edit_type"].to_list())]
    if not types:
        return "<p>No scored rows.</p>"
    out = []
    for col in SCORE_COLUMNS:
        vals = df.select(["edit_type", col]).drop_nulls()
        if len(vals) == 0:
            continue
        n = len(types)
        ncols = min(3, n)
        nrows = (n + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.3 * nrows),
                                 squeeze=False)
        allv = vals[col].to_numpy()
        lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 21)
        for i, et in enumerate(types):
            ax = axes[i // ncols][i % ncols]
            v = vals.filter(vals["edit_type"] == et)[col].to_numpy()
            ax.hist(v, bins=bins, color="#4878a8")
            ax.set_title(f"{et} (n={len(v)})", fontsize=9)
            ax.tick_params(labelsize=7)
            for mode, style in zip(MODES, ("-", "--")):
                for rule in t.rules(mode):
                    if rule.column == col:
                        ax.axvline(rule.value, color="#c03030", linestyle=style, linewidth=1,
                                   label=f"{mode} {rule.op} {rule.value:g}")
        for j in range(n, nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize=7)
        fig.suptitle(col, fontsize=11)
        fig.tight_layout()
        out.append(_png(fig))
    return "\n".join(out)


def _bar(groups, series: dict[str, list], title: str, ylabel: str = "candidates"):
    plt = _plt()
    import numpy as np
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(groups) + 2), 3.2))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _funnel_section(ws, cat, selection: Selection, t: Thresholds) -> str:
    from .runner import run
    res = run(ws, "filter", selection, thresholds=t, dry_run=True, cat=cat).result
    if res.rows_in == 0:
        return "<p>No scored rows in the selection.</p>"
    rows = [("selected rows", "", "", res.rows_in)] + [
        (s.step, s.removed_alone, s.removed, s.remaining) for s in res.funnel]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    labels = [r[0] for r in rows][::-1]
    ax.barh(labels, [r[3] for r in rows][::-1], color="#5a9a5a")
    ax.set_xlabel("rows remaining")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return (_table(["step", "removed alone", "removed (cumulative order)", "remaining"], rows)
            + _png(fig) + f"<p>Automatic decisions: {res.accepted} accepted, {res.rejected} "
            f"rejected; human decisions: {res.human_accepted} accepted, "
            f"{res.human_rejected} rejected.</p>")


def _examples(ws, df, per_type: int) -> str:
    plt = _plt()
    from .images import BadImage, load_rgb
    out = []
    import polars as pl
    for et in [e for e in EDIT_TYPES if e in set(df["edit_type"].to_list())]:
        sub = (df.filter(pl.col("edit_type") == et)
               .with_columns((pl.col("status") == "accepted").alias("_acc"))
               .sort(["_acc", "clip_sim_dir"], descending=[True, True], nulls_last=True)
               .head(per_type))
        if len(sub) == 0:
            continue
        fig, axes = plt.subplots(len(sub), 2, figsize=(5, 2.5 * len(sub)), squeeze=False)
        for i, r in enumerate(sub.iter_rows(named=True)):
            for j, (key, label) in enumerate((("source_image", "source"),
                                              ("edited_image", "edited"))):
                ax = axes[i][j]
                ax.axis("off")
                path = ws.media.path(r[key]) if r[key] else None  # a bad name: one error
                try:
                    im = load_rgb(path)
                    im.thumbnail((256, 256))
                    ax.imshow(im)
                except (BadImage, TypeError):
                    ax.text(0.5, 0.5, "missing", ha="center")
                dirs = r["clip_sim_dir"]
                title = (f"#{r['candidate_id']} {r['status']}"
                         + (f" dir={dirs:.2f}" if dirs is not None else "")
                         if j == 1 else (r["instruction"] or "")[:40])
                ax.set_title(f"{label}: {title}", fontsize=7)
        fig.suptitle(et, fontsize=11)
        fig.tight_layout()
        out.append(f"<h3>{html.escape(et)}</h3>" + _png(fig))
    return "\n".join(out) or "<p>No pairs.</p>"


def judge_confusion(cat, selection: Selection, t: Thresholds, examples: int = 4) -> dict:
    """CLIP's verdict against the judge's over the selected judged rows (`verdict_sql`):
    {'judged', 'not_judged', 'invalid', 'table': {(clip_pass, judge_pass): n},
    'disagree': [rows of each kind of disagreement, up to `examples` each]}."""
    from .stages.filter import JUDGED, verdict_sql
    clip, judge = verdict_sql(t)
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection)
    rows = cat.query(
        f"SELECT {clip} AS clip_pass, {judge} AS judge_pass, count(*) AS n FROM ({sql}) s "
        f"WHERE {JUDGED} GROUP BY ALL", params)
    counts = cat.query(
        f"SELECT count(*) FILTER (WHERE NOT ({JUDGED})) AS not_judged, "
        f"count(*) FILTER (WHERE judge_invalid_reason IS NOT NULL) AS invalid FROM ({sql}) s",
        params)[0]
    disagree = cat.query(
        f"SELECT * FROM (SELECT candidate_id, instruction, source_image, edited_image, "
        f"clip_sim_dir, judge_instruction, judge_preservation, judge_quality, "
        f"judge_rationale, {clip} AS clip_pass, {judge} AS judge_pass, row_number() OVER "
        f"(PARTITION BY {clip} ORDER BY candidate_id) AS k FROM ({sql}) s WHERE {JUDGED} "
        f"AND ({clip}) <> ({judge})) WHERE k <= {int(examples)} "
        f"ORDER BY clip_pass DESC, candidate_id", params)
    table = {(bool(r["clip_pass"]), bool(r["judge_pass"])): int(r["n"]) for r in rows}
    return {"judged": sum(table.values()), "not_judged": int(counts["not_judged"]),
            "invalid": int(counts["invalid"]), "table": table, "disagree": disagree}


def _judge_section(ws, conf: dict, t: Thresholds) -> str:
    tab = conf["table"]
    n = conf["judged"]
    both = tab.get((True, True), 0) + tab.get((False, False), 0)
    rules = list(dict.fromkeys(r.name for m in MODES for r in t.verdict_rules(m)[1]))
    out = [_table(["", "judge passes", "judge fails"],
                  [("CLIP passes", tab.get((True, True), 0), tab.get((True, False), 0)),
                   ("CLIP fails", tab.get((False, True), 0), tab.get((False, False), 0))]),
           f"<p>{n} judged rows: CLIP and the judge agree on {both} "
           f"({100 * both / n:.0f}%), disagree on {n - both}. Judge verdict: "
           f"{html.escape(', '.join(rules))}; CLIP verdict: the keep rule's "
           f"score thresholds (before top-k). Not judged: {conf['not_judged']}; invalid "
           f"answers: {conf['invalid']}.</p>"]
    if conf["disagree"]:
        plt = _plt()
        from .images import BadImage, load_rgb
        rows = conf["disagree"]
        fig, axes = plt.subplots(len(rows), 2, figsize=(6, 2.6 * len(rows)), squeeze=False)
        for i, r in enumerate(rows):
            for j, key in enumerate(("source_image", "edited_image")):
                ax = axes[i][j]
                ax.axis("off")
                path = ws.media.path(r[key]) if r[key] else None  # a bad name: one error
                try:
                    im = load_rgb(path)
                    im.thumbnail((256, 256))
                    ax.imshow(im)
                except (BadImage, TypeError):
                    ax.text(0.5, 0.5, "missing", ha="center")
            kind = "CLIP passes, judge fails" if r["clip_pass"] else "judge passes, CLIP fails"
            axes[i][0].set_title(f"#{r['candidate_id']}: {(r['instruction'] or '')[:40]}",
                                 fontsize=7)
            axes[i][1].set_title(f"{kind}: {r['judge_instruction']}/{r['judge_preservation']}"
                                 f"/{r['judge_quality']} {(r['judge_rationale'] or '')[:40]}",
                                 fontsize=7)
        fig.tight_layout()
        out.append("<p>Examples of each kind of disagreement (judge scores: instruction / "
                   "preservation / quality).</p>" + _png(fig))
    return "\n".join(out)


def balance_counts(cat, selection: Selection) -> dict[str, tuple[int, int]]:
    """{edit_type: (rows balance chooses from, rows export takes by default)} within the
    selection: the same predicates balance and export use, so the three agree."""
    from .export import DEFAULT_WHERE
    from .stages.balance import POOL_WHERE
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection)
    return {r[0]: (int(r[1]), int(r[2])) for r in cat.con.execute(
        f"SELECT edit_type, count(*) FILTER (WHERE {POOL_WHERE}), "
        f"count(*) FILTER (WHERE {DEFAULT_WHERE}) FROM ({sql}) s GROUP BY edit_type",
        params).fetchall()}


def write_report(ws, out: str | Path, selection: Selection | None = None,
                 thresholds: Thresholds | None = None, examples: int = 4) -> Path:
    """`run(ws, "report", selection, out=out, ...)`: the report's path (see ReportStage)."""
    from .runner import run
    return run(ws, "report", selection, out=out, thresholds=thresholds,
               examples=examples).result


class ReportStage(SetStage):
    """Write the HTML report for the selected candidates (the catalog is only read; the run
    records where it went). Thresholds drawn and used for the funnel: the given ones, else the
    last filter run's, else UltraEdit's."""

    name = "report"
    path_options = ("out",)
    table = "candidates"
    has_produce = True

    def __init__(self, out: str | Path, thresholds: Thresholds | dict | None = None,
                 examples: int = 4):
        if isinstance(thresholds, dict):
            thresholds = Thresholds.from_dict(thresholds)
        self.out, self.thresholds, self.examples = Path(out), thresholds, int(examples)
        super().__init__(out=str(out), examples=self.examples)

    def plan(self, r, selection) -> str:
        return _render(r.workspace, r.cat, selection, self.thresholds, self.examples)

    def produce(self, doc: str, ctx) -> Path:
        return _write(self.out, doc)

    def apply(self, w, doc, out: Path) -> Path:
        w.run.message = str(out)
        return out


def _render(ws, cat, selection: Selection, thresholds: Thresholds | None,
            examples: int) -> str:
    """The report's HTML (figures inline), from the catalog's rows."""
    from .stages.filter import latest_thresholds
    t = thresholds or latest_thresholds(cat) or Thresholds.preset("ultraedit")
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection,
                                    None, _COLUMNS)
    df = cat.pl(sql + " ORDER BY candidate_id", params)
    edits = cat.query(
        f"SELECT mode, coalesce(mask_class, '(none)') AS mask_class, count(*) AS n "
        f"FROM edits_v WHERE edit_id IN (SELECT edit_id FROM ({sql}) s) "
        f"GROUP BY ALL ORDER BY mode, mask_class", params)
    funnel = _funnel_section(ws, cat, selection, t)
    balance = balance_counts(cat, selection)
    confusion = judge_confusion(cat, selection, t)
    status_counts = df.group_by("status").len().sort("status").rows() if len(df) else []
    sections = [
        ("Selection", _table(["status", "candidates"], status_counts)
         + f"<p>{len(df)} candidates of {df['edit_id'].n_unique() if len(df) else 0} edits. "
           f"Selection: <code>{html.escape(str(selection.to_json()))}</code></p>"),
        ("Acceptance funnel", funnel),
        ("Score histograms per edit type", _histograms(df, t)),
    ]
    if edits:
        groups = [f"{e['mode']} / {e['mask_class']}" for e in edits]
        sections.append(("Mask-class distribution (edits)",
                         _table(["mode", "mask class", "edits"],
                                [(e["mode"], e["mask_class"], e["n"]) for e in edits])
                         + _bar(groups, {"edits": [e["n"] for e in edits]},
                                "edits by mask class", "edits")))
    if len(df):
        types = [e for e in EDIT_TYPES if e in balance]
        before = [balance[et][0] for et in types]
        after = [balance[et][1] for et in types]
        sections.append(("Balance before and after",
                         _table(["edit type", "accepted", "selected (export's default)"],
                                list(zip(types, before, after)))
                         + _bar(types, {"accepted (before)": before, "selected (after)": after},
                                "balance by edit type")))
    if confusion["judged"]:
        sections.append(("CLIP and the judge", _judge_section(ws, confusion, t)))
    sections.append(("Example pairs per edit type", _examples(ws, df, examples)))
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>{c}</section>" for h, c in sections)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ultracurate report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;
font-size:13px}}img{{max-width:100%;display:block;margin:.5em 0}}</style></head>
<body><h1>ultracurate report</h1>
<p>Workspace {html.escape(str(ws.root))}, written {_dt.datetime.now():%Y-%m-%d %H:%M}.
Thresholds: {html.escape(t.preset_name)}.</p>
{body}
</body></html>
"""
    return doc


def _write(out: Path, doc: str) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a read-only folder: one line, no partial file left
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UltracurateError(f"cannot write the report {out}: "
                               f"{e.strerror or type(e).__name__}") from None
    return out
