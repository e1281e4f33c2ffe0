"""What a workspace holds, to compare before and after a job that should change nothing."""

from __future__ import annotations


def catalog_rows(ws) -> dict:
    """Every table's rows (the run log aside: each job records its run) and the media store's
    files."""
    with ws.catalog(read_only=True) as cat:
        tables = [r[0] for r in cat.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
            "AND table_name <> 'runs' ORDER BY 1").fetchall()]
        out = {t: sorted(map(repr, cat.con.execute(f'SELECT * FROM "{t}"').fetchall()))
               for t in tables}
    out["media files"] = sorted(ws.media.names())
    return out
