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


def print_table(df, max_rows: int = 200) -> None:
    from rich.console import Console
    from rich.table import Table
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
