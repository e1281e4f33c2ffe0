"""The DuckDB catalog: opening, migrations, the views, and the few writes every stage shares.

The schema lives in `sql/` (migrations/NNN_*.sql, applied in order and recorded in schema_meta;
views.sql re-created when it changes). Nothing else in the package issues DDL.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import duckdb

from .errors import (CatalogBusyError, CatalogDamagedError, UltracurateError, reason_text,
                     redact)

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


def first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# What DuckDB says about a truncated or corrupt file, at open or when a damaged block is read.
_DAMAGE = ("not a valid duckdb database file", "could not read enough bytes",
           "corrupt database file", "does not match stored checksum",
           "failure while replaying wal", "invalid block", "serialization error")
_FILE_HEADERS = 3 * 4096  # DuckDB's main header and its two database headers


def is_damage(e) -> bool:
    text = str(e).lower()
    return any(d in text for d in _DAMAGE)


def damaged_message(cause, path: Path | str | None = None) -> str:
    where = f" {path}" if path else ""
    return f"catalog{where} is damaged: restore from a copy ({first_line(cause)})"


def catalog_error(e: Exception, path: Path | str | None = None) -> UltracurateError:
    """The one-line error for a DuckDB error on the catalog: damaged, or the query's own."""
    if is_damage(e):
        return CatalogDamagedError(damaged_message(e, path))
    return UltracurateError(f"catalog query failed: {redact(first_line(e))}")


@dataclass
class JobRun:
    """The run of a one-transaction job (see Catalog.job)."""
    run_id: int
    rows_in: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    message: str | None = None


class Catalog:
    """A DuckDB catalog file. One writer process at a time (DuckDB's own file lock).

    Every connection runs under `limits.duckdb_config()` (no file or network access, no
    extension autoload, configuration locked, a memory limit); `allow_files` lets a read-only
    connection read files (`ultracurate sql --allow-files`). Opening checks the file before
    anything is written: DuckDB's own errors, a schema version newer than this ultracurate, and
    the checksum of the schema recorded in schema_meta."""

    def __init__(self, path: str | Path, read_only: bool = False, allow_files: bool = False):
        from .limits import duckdb_config
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise UltracurateError(f"no catalog at {self.path}")
        if allow_files and not read_only:
            raise UltracurateError("a catalog opened for writing never reads outside files")
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only,
                                      config=duckdb_config(allow_files))
        except duckdb.Error as e:
            msg = first_line(e)
            if isinstance(e, duckdb.IOException) and "lock" in msg.lower():
                raise CatalogBusyError(
                    f"catalog {self.path} is in use by another ultracurate job; wait for it "
                    f"or stop it ({msg})") from None
            if is_damage(e):
                raise CatalogDamagedError(damaged_message(e, self.path)) from None
            raise UltracurateError(f"cannot open catalog {self.path}: {msg}") from None
        try:
            self.check()
            if not read_only:
                self.migrate()
        except duckdb.Error as e:
            self.con.close()
            raise catalog_error(e, self.path) from None
        except BaseException:
            self.con.close()
            raise

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            rows = self.con.execute(
                "SELECT value FROM schema_meta WHERE key = 'schema_version'").fetchall()
        except duckdb.CatalogException:
            return 0
        try:
            return int(rows[0][0]) if rows else 0
        except ValueError:
            raise CatalogDamagedError(damaged_message(
                f"schema_version is '{rows[0][0]}'", self.path)) from None

    def _meta(self, key: str) -> str | None:
        try:
            rows = self.con.execute("SELECT value FROM schema_meta WHERE key = ?",
                                    [key]).fetchall()
        except duckdb.CatalogException:
            return None
        return rows[0][0] if rows else None

    def schema_checksum(self) -> str:
        """'<duckdb version>:<sha256>' of the schema version and every table's columns and
        types: recorded in schema_meta by each writer, checked on every open. The DuckDB
        version is part of it because type names may print differently in another version;
        a checksum from another version is not compared (a writer records a new one)."""
        rows = self.con.execute(
            "SELECT table_name, column_index, column_name, data_type FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main' AND table_name "
            "IN (SELECT table_name FROM duckdb_tables() WHERE database_name = "
            "current_database() AND schema_name = 'main') ORDER BY table_name, column_index"
        ).fetchall()
        text = json.dumps([self.schema_version(), rows], default=str)
        return f"{duckdb.__version__}:{hashlib.sha256(text.encode()).hexdigest()}"

    def check(self) -> None:
        """Refuse a catalog this ultracurate cannot read safely, before anything is written:
        a newer schema version, or a schema that no longer matches its recorded checksum."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise UltracurateError(
                f"catalog {self.path} has schema version {current}, newer than this "
                f"ultracurate ({SCHEMA_VERSION}); upgrade ultracurate")
        self._check_length()
        stored = self._meta("schema_checksum")
        if (stored is not None and stored.startswith(f"{duckdb.__version__}:")
                and stored != self.schema_checksum()):
            raise CatalogDamagedError(damaged_message(
                "its tables do not match the schema checksum in schema_meta", self.path))

    def _check_length(self) -> None:
        """A truncated file may still open and answer the queries that need only its first
        blocks (a count), so its length is checked: DuckDB writes whole blocks after its three
        4 KiB headers, and a copy or a disk that stopped part-way leaves a length that is
        not. (A cut exactly at a block boundary shows up when a missing block is read.)"""
        block_size = self.con.execute(
            "SELECT block_size FROM pragma_database_size() "
            "WHERE database_name = current_database()").fetchone()
        size = self.path.stat().st_size
        if block_size and block_size[0] and (size - _FILE_HEADERS) % int(block_size[0]):
            raise CatalogDamagedError(damaged_message(
                f"its length, {size} bytes, is not whole {block_size[0]}-byte blocks: it was "
                "truncated", self.path))

    def migrate(self) -> None:
        current = self.schema_version()
        applied = False
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
            applied = True
        # Views and the checksum are rewritten only when they changed, so that opening an
        # up-to-date catalog for writing writes nothing.
        views = sql_text("views.sql")
        views_sum = hashlib.sha256(views.encode()).hexdigest()
        have = {r[0] for r in self.con.execute(
            "SELECT view_name FROM duckdb_views() WHERE database_name = current_database() "
            "AND NOT internal").fetchall()}
        if applied or self._meta("views_checksum") != views_sum or not set(VIEWS.values()) <= have:
            self.con.execute(views)
            self.con.execute("INSERT OR REPLACE INTO schema_meta VALUES ('views_checksum', ?)",
                             [views_sum])
        checksum = self.schema_checksum()
        if self._meta("schema_checksum") != checksum:
            self.con.execute("INSERT OR REPLACE INTO schema_meta VALUES ('schema_checksum', ?)",
                             [checksum])

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

    def read_query(self, query: str, params: dict | None = None):
        """A user's one read-only statement (SELECT, or EXPLAIN of one) as a polars DataFrame,
        run under the user-SQL bounds (limits.bounded); parameters by exact name."""
        import re

        from .limits import bounded
        try:
            statements = duckdb.extract_statements(query)
        except duckdb.Error as e:
            raise UltracurateError(f"sql: {first_line(e)}") from None
        if len(statements) != 1:
            raise UltracurateError(f"sql takes one statement, got {len(statements)}")
        statement = statements[0]
        if statement.type == duckdb.StatementType.EXPLAIN:
            inner = re.sub(r"(?is)^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", query)
            try:
                inner_types = [s.type for s in duckdb.extract_statements(inner)]
            except duckdb.Error:
                inner_types = []
            if inner_types != [duckdb.StatementType.SELECT]:
                raise UltracurateError("sql: EXPLAIN only of a SELECT")
        elif statement.type != duckdb.StatementType.SELECT:
            kind = str(statement.type).rsplit(".", 1)[-1]
            raise UltracurateError(f"sql runs read-only queries (SELECT, DESCRIBE, SHOW, "
                                   f"SUMMARIZE, EXPLAIN), not {kind}")
        names = set(statement.named_parameters)
        if any(n.isdigit() for n in names) or "?" in names:
            raise UltracurateError("sql: name the parameters ($name with -p name VALUE), "
                                   "not ? or $1")
        params = params or {}
        missing = sorted(names - set(params))
        if missing:
            raise UltracurateError(f"sql: parameter ${missing[0]} has no value "
                                   f"(give it with -p {missing[0]} VALUE)")
        bound = {k: v for k, v in params.items() if k in names}
        try:
            with bounded(self.con, "sql:"):
                return self.pl(query, bound or None)
        except duckdb.Error as e:
            raise catalog_error(e, self.path) if is_damage(e) else UltracurateError(
                f"sql: {redact(first_line(e))}") from None

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
                [run.rows_in, run.rows_done, run.rows_failed, now(), redact(run.message),
                 run.run_id])
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
