"""The DuckDB catalog: opening, migrations, the views, and the few writes every stage shares.

The schema lives in `sql/` (migrations/NNN_*.sql, applied in order and recorded in schema_meta;
views.sql re-created on each open). Nothing else in the package issues DDL.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import duckdb

from .errors import CatalogBusyError, UltracurateError, reason_text

TABLES = ("anchors", "edits", "candidates")
# What a caption row may carry besides its anchor and text (see Catalog.add_captions).
CAPTION_FIELDS = ("source", "model", "prompt", "invalid_reason")
VIEWS = {"anchors": "anchors_v", "edits": "edits_v", "candidates": "candidates_v",
         "sessions": "sessions_v"}
KEYS = {"anchors": "anchor_id", "edits": "edit_id", "candidates": "candidate_id",
        "sessions": "session_id"}
EDIT_TYPES = (
    "add", "change_global", "change_local", "change_color", "transform_global",
    "transform_local", "replace", "turn", "others",
)


def sql_text(name: str) -> str:
    """Text of a file under sql/ (e.g. 'views.sql', 'queries/stats.sql')."""
    return importlib.resources.files("ultracurate.sql").joinpath(name).read_text()


def named_queries(name: str) -> dict[str, str]:
    """The '-- name: key' blocks of sql/queries/<name>.sql."""
    blocks = re.split(r"^-- name: *(\w+) *$", sql_text(f"queries/{name}.sql"), flags=re.M)
    return {blocks[i]: blocks[i + 1].strip() for i in range(1, len(blocks), 2)}


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in sql/migrations, in order."""
    folder = importlib.resources.files("ultracurate.sql").joinpath("migrations")
    out = []
    for entry in folder.iterdir():
        m = re.match(r"(\d+)_.*\.sql$", entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(out)


SCHEMA_VERSION = migrations()[-1][0]


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@dataclass
class JobRun:
    """The run of a one-transaction job (see Catalog.job)."""
    run_id: int
    rows_in: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    message: str | None = None


class Catalog:
    """A DuckDB catalog file. One writer process at a time (DuckDB's own file lock)."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise UltracurateError(f"no catalog at {self.path}")
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            msg = str(e).splitlines()[0]
            if "lock" in msg.lower():
                raise CatalogBusyError(
                    f"catalog {self.path} is in use by another ultracurate job; wait for it "
                    f"or stop it ({msg})") from None
            raise UltracurateError(f"cannot open catalog {self.path}: {msg}") from None
        if not read_only:
            self.migrate()

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            rows = self.con.execute(
                "SELECT value FROM schema_meta WHERE key = 'schema_version'").fetchall()
        except duckdb.CatalogException:
            return 0
        return int(rows[0][0]) if rows else 0

    def migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise UltracurateError(
                f"catalog {self.path} has schema version {current}, newer than this "
                f"ultracurate ({SCHEMA_VERSION}); upgrade ultracurate")
        for version, name, sql in migrations():
            if version <= current:
                continue
            self.con.execute("BEGIN")
            try:
                self.con.execute(sql)
                self.con.execute(
                    "INSERT OR REPLACE INTO schema_meta VALUES ('schema_version', ?)",
                    [str(version)])
                self.con.execute("COMMIT")
            except Exception:
                self.con.execute("ROLLBACK")
                raise
        self.con.execute(sql_text("views.sql"))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def columns(self, relation: str) -> list[str]:
        return [r[0] for r in self.con.execute(f"DESCRIBE {relation}").fetchall()]

    def scalar(self, sql: str, params: Any = None) -> Any:
        """First column of the first row (fetched whole: DuckDB 2 keeps a half-read result
        open on the connection)."""
        rows = self.con.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    def query(self, sql: str, params: Any = None) -> list[dict]:
        cur = self.con.execute(sql, params) if params is not None else self.con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def pl(self, sql: str, params: Any = None):
        """A query's result as a polars DataFrame."""
        import polars as pl
        return pl.from_arrow(self.arrow(sql, params))

    def arrow(self, sql: str, params: Any = None):
        """A query's result as a pyarrow Table."""
        return self.con.sql(sql, params=params).to_arrow_table()

    # -- writing --------------------------------------------------------------------------
    def next_id(self, table: str, n: int = 1) -> int:
        """First of n fresh ids for table (the driver is the only writer, so max+1 is safe)."""
        key = KEYS.get(table, "run_id" if table == "runs" else None)
        m = self.scalar(f"SELECT coalesce(max({key}), 0) FROM {table}")
        return int(m) + 1

    def start_run(self, stage: str, params: dict, selection: dict | None, models: dict | None,
                  engine: str = "local") -> int:
        from . import __version__
        run_id = self.next_id("runs")
        self.con.execute(
            "INSERT INTO runs (run_id, stage, params, selection, models, code_version, engine,"
            " started_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running')",
            [run_id, stage, json.dumps(params, default=str), json.dumps(selection, default=str),
             json.dumps(models or {}, default=str), code_version(__version__), engine, now()])
        return run_id

    @contextlib.contextmanager
    def job(self, stage: str, params: dict, selection: dict | None = None,
            models: dict | None = None):
        """A job that is one transaction (filter, balance, dedup, review pulls): its run row
        and its writes commit together, or nothing does. Yields a JobRun whose counters and
        message the caller sets; they are written when the block ends without error."""
        self.con.execute("BEGIN")
        try:
            run = JobRun(self.start_run(stage, params, selection, models))
            yield run
            self.con.execute(
                "UPDATE runs SET rows_in = ?, rows_done = ?, rows_failed = ?, ended_at = ?, "
                "state = 'completed', message = ? WHERE run_id = ?",
                [run.rows_in, run.rows_done, run.rows_failed, now(), run.message, run.run_id])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def end_run(self, run_id: int, state: str, message: str | None = None) -> None:
        self.con.execute(
            "UPDATE runs SET ended_at = ?, state = ?, message = ? WHERE run_id = ?",
            [now(), state, reason_text(message) if message else None, run_id])

    def update_rows(self, table: str, df, key: str | None = None) -> None:
        """UPDATE table SET <df's columns> FROM df, matched on the key column. One statement,
        however many rows; call inside the caller's transaction."""
        key = key or KEYS[table]
        cols = [c for c in df.columns if c != key]
        if not cols or len(df) == 0:
            return
        self.con.register("_upd", df.to_arrow() if hasattr(df, "to_arrow") else df)
        try:
            sets = ", ".join(f'"{c}" = _upd."{c}"' for c in cols)
            self.con.execute(
                f'UPDATE {table} SET {sets} FROM _upd WHERE {table}."{key}" = _upd."{key}"')
        finally:
            self.con.unregister("_upd")

    def insert_rows(self, table: str, df) -> None:
        if len(df) == 0:
            return
        self.con.register("_ins", df.to_arrow() if hasattr(df, "to_arrow") else df)
        try:
            cols = ", ".join(f'"{c}"' for c in df.columns)
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _ins")
        finally:
            self.con.unregister("_ins")

    def add_captions(self, rows: list[dict], run_id: int | None) -> int:
        """Merge captions into anchor_captions; returns how many were new. Each row has
        anchor_id, caption and source (and optionally model, prompt, invalid_reason); texts
        are whitespace-normalised, empty ones dropped (unless invalid), and a text the anchor
        already has (from any source) is not added again. New captions keep the rows' order after the anchor's
        existing ones. Call inside the caller's transaction."""
        import pyarrow as pa
        # an invalid answer is kept with its reason even when it is empty
        rows = [r for r in rows if normalize_caption(r.get("caption")) or r.get("invalid_reason")]
        if not rows:
            return 0
        cols = {"anchor_id": pa.array([int(r["anchor_id"]) for r in rows], pa.int64()),
                "caption": pa.array([normalize_caption(r["caption"]) for r in rows]),
                "ord": pa.array(range(len(rows)), pa.int64())}
        for f in CAPTION_FIELDS:
            cols[f] = pa.array([r.get(f) for r in rows], pa.string())
        ids = cols["anchor_id"].to_pylist()
        self.con.register("_captions", pa.table(cols))
        try:
            n = self.con.execute(named_queries("captions")["add"],
                                 {"run_id": run_id, "at": now(), "lo": min(ids),
                                  "hi": max(ids)}).fetchall()
        finally:
            self.con.unregister("_captions")
        return int(n[0][0]) if n else 0

    def remove_captions(self, anchor_ids: list[int], source: str) -> None:
        """Drop one source's captions of these anchors (a captioner's --force rerun)."""
        if not anchor_ids:
            return
        import pyarrow as pa
        self.con.register("_anchors", pa.table({"anchor_id": pa.array(anchor_ids, pa.int64())}))
        try:
            self.con.execute(named_queries("captions")["remove_source"],
                             {"lo": min(anchor_ids), "hi": max(anchor_ids), "source": source})
        finally:
            self.con.unregister("_anchors")

    def anchors_without_caption(self) -> int:
        return int(self.scalar(named_queries("captions")["without_caption"]))

    def mark_state(self, stage: str, keys: Iterable[int], state: str, run_id: int,
                   errors: Iterable[str | None] | None = None) -> None:
        keys = list(keys)
        if not keys:
            return
        errors = ([reason_text(e) if e else None for e in errors] if errors is not None
                  else [None] * len(keys))
        import pyarrow as pa
        tbl = pa.table({"key": pa.array(keys, pa.int64()),
                        "error": pa.array(errors, pa.string())})
        self.con.register("_st", tbl)
        try:
            self.con.execute(
                "INSERT OR REPLACE INTO stage_state (stage, key, state, error, run_id, updated_at) "
                "SELECT ?, key, ?, error, ?, ? FROM _st",
                [stage, state, run_id, now()])
        finally:
            self.con.unregister("_st")


def normalize_caption(text) -> str:
    """A caption as stored: surrounding whitespace stripped, inner runs of whitespace one
    space ('' for None)."""
    return " ".join(str(text).split()) if text is not None else ""


def code_version(version: str) -> str:
    """Package version plus the git commit when running from a checkout."""
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = head.parent / ref[5:]
            sha = ref_path.read_text().strip() if ref_path.exists() else ""
        else:
            sha = ref
        return f"{version}+g{sha[:10]}" if sha else version
    except OSError:
        return version
