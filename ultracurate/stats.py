"""`stats`, `show` and table printing: read-only views of the catalog."""

from __future__ import annotations

import json
import re

from .catalog import Catalog, named_queries
from .errors import UltracurateError


def catalog_stats(cat: Catalog) -> dict[str, dict[str, int]]:
    return {key: {str(label): int(n) for label, n in cat.con.execute(q).fetchall()}
            for key, q in named_queries("stats").items()}


def render_stats(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    for key, counts in data.items():
        if not counts:
            continue
        t = Table(title=key.replace("_", " "), title_justify="left")
        t.add_column("")
        t.add_column("rows", justify="right")
        for label, n in counts.items():
            t.add_row(label, f"{n:,}")
        console.print(t)


def as_text_columns(df):
    """df with the columns CSV cannot hold as text: lists, arrays, structs and maps (captions,
    reject_reasons, mask_bbox, ...) as JSON, bytes as hex. Other columns stay as they are."""
    import polars as pl

    def text(v):
        if v is None:
            return None
        return v.hex() if isinstance(v, bytes) else json.dumps(v, default=str)
    odd = [c for c, t in df.schema.items() if t.is_nested() or t == pl.Binary]
    if not odd:
        return df
    return df.with_columns(pl.Series(c, [text(v) for v in df[c].to_list()], dtype=pl.String)
                           for c in odd)


def write_rows(df, fmt: str) -> None:
    """Rows on stdout as a table, csv or json (every value JSON can hold, the rest as text)."""
    import sys
    if fmt == "json":
        sys.stdout.write(json.dumps(df.to_dicts(), default=str, indent=2) + "\n")
    elif fmt == "csv":
        sys.stdout.write(as_text_columns(df).write_csv())
    else:
        print_table(df)


def print_table(df, max_rows: int = 200) -> None:
    from rich.console import Console
    from rich.table import Table
    df = as_text_columns(df)
    t = Table()
    for col in df.columns:
        t.add_column(col)
    for row in df.head(max_rows).iter_rows():
        t.add_row(*["" if v is None else str(v) for v in row])
    Console().print(t)
    if len(df) > max_rows:
        Console().print(f"... {len(df) - max_rows} more rows (use --format csv or json)")


def show_row(cat: Catalog, ref: str) -> dict:
    """One candidate (ID), edit (eID) or anchor (aID) with every column, plus its stage marks
    and, for an edit, its candidates."""
    m = re.fullmatch(r"([ae]?)(\d+)", ref.strip())
    if not m:
        raise UltracurateError(f"show: '{ref}' is not an id (123, e123 or a123)")
    kind, key = m.group(1), int(m.group(2))
    view, col = {"": ("candidates_v", "candidate_id"), "e": ("edits_v", "edit_id"),
                 "a": ("anchors_v", "anchor_id")}[kind]
    rows = cat.query(f"SELECT * FROM {view} WHERE {col} = ?", [key])
    if not rows:
        raise UltracurateError(f"show: no row with {col} = {key}")
    out = rows[0]
    table = {"": "candidates", "e": "edits", "a": "anchors"}[kind]
    from .stages import stages_over
    out["stages"] = cat.query(named_queries("show")["stages"], [key, stages_over(table)])
    if kind == "e":
        out["candidates"] = [r["candidate_id"] for r in cat.query(
            "SELECT candidate_id FROM candidates WHERE edit_id = ? ORDER BY candidate_index",
            [key])]
    for k, v in list(out.items()):
        if isinstance(v, str) and v[:1] in "[{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


_WIDTH = 100  # characters of a value's line (--full prints values whole)


def _scalar(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _compact(v) -> str:
    """A value inside a dict: nested dicts as {k=v ...}, long lists by their length, long
    texts (an RLE) cut."""
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_compact(x)}" for k, x in v.items() if x is not None) + "}"
    if isinstance(v, list):
        text = json.dumps(v, default=str, separators=(",", ":"))
        return text if len(text) <= 40 else f"<{len(v)} items>"
    text = _scalar(v)
    return text if len(text) <= 40 else f"{text[:12]}...<{len(text)} chars>"


def _lines(v) -> list[str]:
    """One value as a person reads it, in lines of at most _WIDTH: a dict as key=value pairs,
    a list comma-joined (one item a line when long), a long text cut with its length."""
    import textwrap
    if isinstance(v, dict):
        return textwrap.wrap(" ".join(f"{k}={_compact(x)}" for k, x in v.items()
                                      if x is not None), _WIDTH, break_long_words=False) or [""]
    if isinstance(v, list):
        items = [_compact(x) for x in v]
        joined = ", ".join(items)
        return [joined] if len(joined) <= _WIDTH else [x[:_WIDTH] for x in items]
    text = _scalar(v)
    return [text if len(text) <= _WIDTH else f"{text[:_WIDTH - 20]}... ({len(text)} chars)"]


def _mask_line(row: dict) -> str | None:
    if row.get("mask_rle") is None:
        return None
    parts = [row.get("mask_class") or "unclassified"]
    if row.get("mask_area") is not None:
        parts.append(f"{100 * row['mask_area']:.1f}% of {row.get('mask_width')}x"
                     f"{row.get('mask_height')}")
    if row.get("mask_bbox"):
        x, y, w, h = row["mask_bbox"]
        parts.append(f"bbox x {x} y {y} w {w} h {h}")
    if row.get("mask_components") is not None:
        parts.append(f"{row['mask_components']} components")
    return ", ".join(parts)


def format_row(row: dict, full: bool = False) -> str:
    """`show`'s text: one field a line, those without a value left out. The mask is its
    class, area and bbox (not its RLE), the scores a small table, dicts such as gen_params
    compact key=value pairs, long values cut. full: every field, every value whole (JSON)."""
    from .names import SCORE_COLUMNS
    if full:
        width = max(map(len, row))
        return "\n".join(f"{k:>{width}}: " + (json.dumps(v, default=str)
                                                if isinstance(v, (dict, list)) else str(v))
                         for k, v in row.items())
    mask = _mask_line(row)
    scores = {k: row[k] for k in SCORE_COLUMNS if row.get(k) is not None}
    fields: dict = {}
    for k, v in row.items():
        if mask and k.startswith("mask_"):
            fields.setdefault("mask", mask)      # where the mask's columns were
        elif v not in (None, "", [], {}) and k not in SCORE_COLUMNS:
            fields[k] = v
    stages = fields.pop("stages", None)
    if stages:
        fields["stages"] = [f"{s['stage']} {s['state']} (run {s['run_id']})"
                            + (f": {s['error']}" if s.get("error") else "") for s in stages]
    width = max(map(len, [*fields, "scores"]))
    lines = []
    for k, v in fields.items():
        first, *rest = _lines(v)
        lines += [f"{k:>{width}}: {first}"] + [f"{'':>{width}}  {x}" for x in rest]
    if scores:
        name_w = max(map(len, scores))
        for i, (k, v) in enumerate(scores.items()):
            number = f"{v:>10.3e}" if v and abs(v) < 1e-3 else f"{v:>10.4f}"
            lines.append(f"{'scores:' if i == 0 else '':>{width + 1}} {k:<{name_w}}  {number}")
    return "\n".join(lines)
