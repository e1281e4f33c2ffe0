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
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb

from .errors import (CatalogBusyError, CatalogDamagedError, UltracurateError, reason_text,
                     redact)

# What a caption row may carry besides its anchor and text (see Catalog.add_captions).
CAPTION_FIELDS = ("source", "model", "prompt", "invalid_reason")
VIEWS = {"anchors": "anchors_v", "edits": "edits_v", "candidates": "candidates_v",
         "sessions": "sessions_v"}
KEYS = {"anchors": "anchor_id", "edits": "edit_id", "candidates": "candidate_id",
        "sessions": "session_id"}
# The parent each table's view joins on the parent's key (an inner join, the key never
# changes): a window of a table's keys implies a range of its parent's (selection.key_window).
PARENTS = {"candidates": "edits", "edits": "anchors"}
# Every table of the catalog (cat.<name> is its table API) and its key, where it has one.
TABLE_KEYS = {**KEYS, "runs": "run_id", "stage_state": "key", "anchor_captions": "anchor_id",
              "candidate_rejects": "candidate_id", "ingest_rejects": "source_path",
              "schema_meta": "key", "session_turns": "session_id"}
TABLE_NAMES = frozenset(TABLE_KEYS)


def sql_text(name: str) -> str:
    """Text of a file under sql/ (e.g. 'views.sql', 'queries/stats.sql')."""
    return importlib.resources.files("ultracurate.sql").joinpath(name).read_text()


def named_queries(name: str) -> dict[str, str]:
    """The '-- name: key' blocks of sql/queries/<name>.sql."""
    blocks = re.split(r"^-- name: *(\w+) *$", sql_text(f"queries/{name}.sql"), flags=re.M)
    # without the closing ';', so that a query can be a subquery of another, and without its
    # comment lines, so that a {marker} a comment names is not filled in there
    return {blocks[i]: re.sub(r"^\s*--.*\n?", "", blocks[i + 1], flags=re.M).strip().rstrip(";")
            for i in range(1, len(blocks), 2)}


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


LOCK_WAIT = 60.0  # seconds an open waits for another process's lock on the catalog


def lock_wait(default: float = LOCK_WAIT) -> float:
    """How long opening the catalog waits for another process's lock: $ULTRACURATE_LOCK_WAIT
    seconds, else default."""
    from .limits import env_seconds
    return env_seconds("ULTRACURATE_LOCK_WAIT", default, zero=True)


def readers_dir(path: Path) -> Path:
    """Where readers waiting for the catalog say so (CATALOG.readers/): a job's commits make
    way for them (runner._Catalogs)."""
    return path.with_name(path.name + ".readers")


def _reader_waits(path: Path) -> Path | None:
    from . import procs
    folder = readers_dir(path)
    try:
        folder.mkdir(exist_ok=True)
        marker = folder / f"{procs.tag()}~{os.urandom(4).hex()}"
        marker.touch()
        return marker
    except OSError:  # a read-only folder: the reader simply waits its turn
        return None


def readers_waiting(path: Path) -> bool:
    """Whether a reader of another live process waits for the catalog (markers of processes
    now gone are removed)."""
    from . import procs
    folder = readers_dir(path)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    mine = procs.tag()
    waiting = False
    for e in entries:
        if e.name.startswith(mine + "~"):
            continue
        if procs.tag_alive(e.name):
            waiting = True
        else:
            with contextlib.suppress(OSError):
                os.unlink(e.path)
    return waiting


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
    the checksum of the schema recorded in schema_meta (`verify=False`: a job's reconnection
    to a catalog it opened and checked at its start).

    DuckDB lets one process write a file, or several read it; a job therefore holds no
    connection while it computes, and connects for each batch's short commit. Opening waits,
    up to `wait` seconds (default `lock_wait()`), while another process holds a conflicting
    lock, so that readers and jobs take turns."""

    def __init__(self, path: str | Path, read_only: bool = False, allow_files: bool = False,
                 wait: float | None = None, verify: bool = True):
        from .limits import duckdb_config
        self.path = Path(path)
        self.read_only = read_only
        self._tables: dict[str, Table] = {}
        self._types: dict[str, dict[str, str]] = {}
        self._n_registered = 0
        if read_only and not self.path.exists():
            raise UltracurateError(f"no catalog at {self.path}")
        if allow_files and not read_only:
            raise UltracurateError("a catalog opened for writing never reads outside files")
        if verify and not read_only and self.path.with_name(self.path.name + ".wal").exists():
            # a writer's connection checkpoints the WAL it replayed into the file when it
            # closes, refused or not: check the file read-only first, so that a refused
            # catalog is left as it was
            Catalog(self.path, read_only=True, wait=wait).close()
        self.con = self._connect(read_only, duckdb_config(allow_files),
                                 lock_wait() if wait is None else wait)
        if not verify:
            return
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

    def _connect(self, read_only: bool, config: dict, wait: float):
        deadline = time.monotonic() + wait
        pause = 0.005
        marker = None
        try:
            while True:
                try:
                    return duckdb.connect(str(self.path), read_only=read_only, config=config)
                except duckdb.Error as e:
                    msg = first_line(e)
                    if isinstance(e, duckdb.IOException) and "lock" in msg.lower():
                        left = deadline - time.monotonic()
                        if left > 0:  # another process commits or reads: its turn is short
                            if read_only and marker is None:
                                marker = _reader_waits(self.path)
                            time.sleep(min(pause, left) * random.uniform(0.5, 1.0))
                            pause = min(pause * 2, 0.03)  # several tries in a job's gap
                            continue
                        raise CatalogBusyError(
                            f"catalog {self.path} is in use by another ultracurate job "
                            f"(waited {wait:g} s); wait for it or stop it ({msg})") from None
                    if is_damage(e):
                        raise CatalogDamagedError(damaged_message(e, self.path)) from None
                    raise UltracurateError(f"cannot open catalog {self.path}: {msg}") from None
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            rows = self.con.execute(named_queries("catalog")["meta"],
                                    ["schema_version"]).fetchall()
        except duckdb.CatalogException:
            return 0
        try:
            return int(rows[0][0]) if rows else 0
        except ValueError:
            raise CatalogDamagedError(damaged_message(
                f"schema_version is '{rows[0][0]}'", self.path)) from None

    def _meta(self, key: str) -> str | None:
        try:
            rows = self.con.execute(named_queries("catalog")["meta"], [key]).fetchall()
        except duckdb.CatalogException:
            return None
        return rows[0][0] if rows else None

    def schema_checksum(self) -> str:
        """'<duckdb version>:<sha256>' of the schema version and every table's columns and
        types: recorded in schema_meta by each writer, checked on every open. The DuckDB
        version is part of it because type names may print differently in another version;
        a checksum from another version is not compared (a writer records a new one)."""
        rows = self.con.execute(named_queries("catalog")["schema_columns"]).fetchall()
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
        4 KiB headers, and a copy or a disk that stopped part-way leaves a length that is not.
        A partial last block is not proof of a cut, though: a job killed while DuckDB wrote a
        new block (a checkpoint, a large insert) leaves one past every block the catalog uses,
        and DuckDB opens that file, replays its WAL and loses nothing. So a partial tail is
        refused only when it ends before the last block that holds metadata or a table's rows
        (looked up only then: DuckDB's storage info reads every row group's metadata). A cut
        exactly at a block boundary shows up when a missing block is read."""
        block_size = self.con.execute(named_queries("catalog")["block_size"]).fetchone()
        block = int(block_size[0]) if block_size and block_size[0] else 0
        size = self.path.stat().st_size
        if not block or not (size - _FILE_HEADERS) % block:
            return
        last = self._last_used_block()
        if last is not None and size < _FILE_HEADERS + (last + 1) * block:
            raise CatalogDamagedError(damaged_message(
                f"its length, {size} bytes, is not whole {block}-byte blocks and ends before "
                f"the end of block {last}, which it uses: it was truncated", self.path))

    def _last_used_block(self) -> int | None:
        """The last block that holds DuckDB's metadata or any table's stored rows (None: no
        block yet)."""
        q = named_queries("catalog")
        lasts = [self.con.execute(q["last_metadata_block"]).fetchone()[0]]
        lasts += [self.con.execute(q["last_data_block"].format(
                      table="'" + name.replace("'", "''") + "'")).fetchone()[0]
                  for (name,) in self.con.execute(q["tables"]).fetchall()]
        return max((int(b) for b in lasts if b is not None), default=None)

    def migrate(self) -> None:
        current = self.schema_version()
        applied = False
        set_meta = named_queries("catalog")["set_meta"]
        for version, name, sql in migrations():
            if version <= current:
                continue
            with self.transaction():
                self.con.execute(sql)
                self.con.execute(set_meta, ["schema_version", str(version)])
            applied = True
        self._types.clear()
        # Views and the checksum are rewritten only when they changed, so that opening an
        # up-to-date catalog for writing writes nothing.
        views = sql_text("views.sql")
        views_sum = hashlib.sha256(views.encode()).hexdigest()
        have = {r[0] for r in self.con.execute(named_queries("catalog")["views"]).fetchall()}
        if applied or self._meta("views_checksum") != views_sum or not set(VIEWS.values()) <= have:
            self.con.execute(views)
            self.con.execute(set_meta, ["views_checksum", views_sum])
        checksum = self.schema_checksum()
        if self._meta("schema_checksum") != checksum:
            self.con.execute(set_meta, ["schema_checksum", checksum])

    def close(self) -> None:
        self.con.close()

    @contextlib.contextmanager
    def cursor(self) -> Iterator["Catalog"]:
        """This catalog on a second connection to the same database (DuckDB's cursor), for
        another thread's reads and transactions while this one is in use; closed after the
        block."""
        other = object.__new__(type(self))
        other.path, other.read_only = self.path, self.read_only
        other._tables, other._types, other._n_registered = {}, {}, 0
        other.con = self.con.cursor()
        try:
            yield other
        finally:
            other.con.close()

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
    @contextlib.contextmanager
    def transaction(self):
        """BEGIN ... COMMIT, or ROLLBACK when the block raises (Ctrl-C included): the one
        place a transaction is opened and closed."""
        self.con.execute("BEGIN")
        try:
            yield self
        except BaseException:
            _rollback(self.con)
            raise
        try:
            self.con.execute("COMMIT")
        except BaseException:
            _rollback(self.con)
            raise

    def table(self, name: str) -> "Table":
        """The table API of one table (`cat.table('edits')`, or `cat.edits`)."""
        if name not in self._tables:
            self._tables[name] = (Captions if name == "anchor_captions" else Table)(self, name)
        return self._tables[name]

    def __getattr__(self, name: str) -> "Table":
        if name in TABLE_NAMES:
            return self.table(name)
        raise AttributeError(name)

    def declared_types(self, table: str) -> dict[str, str]:
        """column -> DuckDB type of a table, as DuckDB itself describes it (cached until the
        schema changes)."""
        if table not in self._types:
            rows = self.con.execute(named_queries("catalog")["columns"], [table]).fetchall()
            if not rows:
                raise UndeclaredWrite(f"the catalog has no table '{table}'")
            self._types[table] = {name: kind for name, kind in rows}
        return self._types[table]

    @contextlib.contextmanager
    def registered(self, data, name: str | None = None):
        """data (an Arrow table) as a relation of this connection, under name (the one a
        query in sql/queries reads) or a fresh one."""
        if name is None:
            self._n_registered += 1
            name = f"_uc_rows_{self._n_registered}"
        self.con.register(name, data)
        try:
            yield name
        except BaseException:
            _after_failure(self.con.unregister, name)
            raise
        self.con.unregister(name)

    def temp_table(self, sql: str, params: Any = None) -> str:
        """A query's result computed once into a temporary table of this connection (DuckDB
        spills it to disk when large; a read-only catalog may hold one too); its name.
        Drop it with drop_temp."""
        self._n_registered += 1
        name = f"_uc_tmp_{self._n_registered}"
        self.con.execute(f"CREATE TEMP TABLE {name} AS {sql}", params or None)
        return name

    def drop_temp(self, name: str) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS temp.{name}")

    @contextlib.contextmanager
    def materialized(self, sql: str, params: Any = None):
        """temp_table for the block's length."""
        name = self.temp_table(sql, params)
        try:
            yield name
        except BaseException:
            _after_failure(self.drop_temp, name)
            raise
        self.drop_temp(name)

    # -- the run ledger's rows (written by ultracurate.runner) -----------------------------
    def start_run(self, stage: str, params: dict, selection: dict | None, models: dict | None,
                  engine: str = "local", parent_run: int | None = None) -> int:
        from . import __version__, procs
        run_id = self.runs.next_id()
        pid, host, proc_start = procs.identity()
        at = now()
        self.runs.insert([{
            "run_id": run_id, "stage": stage, "params": json.dumps(params, default=str),
            "selection": json.dumps(selection, default=str),
            "models": json.dumps(models or {}, default=str),
            "code_version": code_version(__version__), "engine": engine,
            "started_at": at, "heartbeat_at": at, "state": "running",
            "parent_run": parent_run, "pid": pid, "host": host, "proc_start": proc_start}])
        return run_id

    def end_run(self, run_id: int, state: str, message: str | None = None, **counts) -> None:
        """Close a run: its state, message (one line, redacted) and any of rows_in,
        rows_done, rows_failed."""
        self.runs.update([{"run_id": run_id, "ended_at": now(), "state": state,
                           "message": reason_text(message) if message else None, **counts}])

    @contextlib.contextmanager
    def job(self, stage: str, params: dict, selection: dict | None = None,
            models: dict | None = None):
        """A job that is one transaction: its run row and its writes commit together, or
        nothing does. Yields a JobRun whose counters and message the caller sets; they are
        written when the block ends without error."""
        with self.transaction():
            run = JobRun(self.start_run(stage, params, selection, models))
            yield run
            self.runs.update([{"run_id": run.run_id, "rows_in": run.rows_in,
                               "rows_done": run.rows_done, "rows_failed": run.rows_failed,
                               "ended_at": now(), "state": "completed",
                               "message": redact(run.message)}])

    def anchors_without_caption(self) -> int:
        return int(self.scalar(named_queries("captions")["without_caption"]))


class UndeclaredWrite(RuntimeError):
    """A write to a column the table lacks or the writer did not declare: a bug in the
    caller, so the job stops and its batch is rolled back."""


class WriteError(UltracurateError):
    """A value that cannot be stored as its column's declared type."""


def _rollback(con) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


# DuckDB's type names (as DESCRIBE gives them) and the Arrow types values are cast to before
# they reach DuckDB; a type not listed is left to DuckDB's own cast.
_ARROW_TYPES = {
    "BIGINT": "int64", "INTEGER": "int32", "SMALLINT": "int16", "TINYINT": "int8",
    "UBIGINT": "uint64", "UINTEGER": "uint32", "DOUBLE": "float64", "FLOAT": "float32",
    "VARCHAR": "string", "JSON": "string", "BOOLEAN": "bool", "TIMESTAMP": "timestamp[us]",
    "DATE": "date32",
}


def arrow_type(duckdb_type: str):
    """The Arrow type a value of a DuckDB column type is cast to (None: DuckDB casts)."""
    import pyarrow as pa
    if duckdb_type.endswith("[]"):
        inner = arrow_type(duckdb_type[:-2])
        return pa.list_(inner) if inner is not None else None
    name = _ARROW_TYPES.get(duckdb_type)
    if name is None:
        return None
    return pa.timestamp("us") if name == "timestamp[us]" else pa.type_for_alias(name)


class Table:
    """One catalog table: its declared columns and types (DuckDB's own description of the
    table, never a copy), and every write to it. A write takes a polars DataFrame, an Arrow
    table or a list of dicts; casts each column to its declared type (whatever a DataFrame
    inferred: an all-None column, an Int64 for an INTEGER); refuses a column the table lacks,
    or that the writer may not set (`allowed`, e.g. a stage's declared columns); and runs as
    one statement in the caller's transaction.

        cat.edits.insert(rows)                       # list of dicts or a DataFrame
        cat.candidates.update(df)                    # matched on candidate_id
        cat.candidates.update_from(sql, params, ["auto_status", "filter_run"])
        cat.candidate_rejects.delete_keys(sql, params)   # the rows whose key the query gives
        cat.candidate_rejects.insert_from(sql, params, ["candidate_id", "reason"])
    """

    def __init__(self, cat: "Catalog", name: str):
        self.cat, self.name = cat, name
        self.key = TABLE_KEYS.get(name)

    def __repr__(self) -> str:
        return f"<Table {self.name}>"

    @property
    def types(self) -> dict[str, str]:
        return self.cat.declared_types(self.name)

    def next_id(self) -> int:
        """The next free key (max + 1): call inside the transaction that inserts it."""
        m = self.cat.scalar(f'SELECT coalesce(max("{self.key}"), 0) FROM {self.name}')
        return int(m) + 1

    def count(self) -> int:
        return int(self.cat.scalar(f"SELECT count(*) FROM {self.name}"))

    def _check(self, names, allowed) -> None:
        types = self.types
        unknown = [c for c in names if c not in types]
        if unknown:
            raise UndeclaredWrite(f"{self.name} has no column {unknown[0]!r}")
        if allowed is not None:
            extra = sorted(set(names) - set(allowed) - {self.key})
            if extra:
                raise UndeclaredWrite(f"wrote undeclared columns {extra} of {self.name}")

    def cast(self, rows, allowed=None):
        """rows as an Arrow table of the declared types (see the class docstring)."""
        import pyarrow as pa
        types = self.types
        if isinstance(rows, list):
            names = list(dict.fromkeys(k for r in rows for k in r))
            self._check(names, allowed)
            columns = {c: [r.get(c) for r in rows] for c in names}
            for c in names:  # JSON columns take text: a dict or list is written as JSON
                if types[c] == "JSON":
                    columns[c] = [v if v is None or isinstance(v, str)
                                  else json.dumps(v, default=str) for v in columns[c]]
        else:
            data = rows if isinstance(rows, pa.Table) else rows.to_arrow()
            names = data.column_names
            self._check(names, allowed)
            columns = {c: data.column(c) for c in names}
        arrays = []
        for c in names:
            target = arrow_type(types[c])
            try:
                if isinstance(columns[c], list):
                    arrays.append(pa.array(columns[c], type=target))
                elif target is not None and columns[c].type != target:
                    arrays.append(columns[c].cast(target))
                else:
                    arrays.append(columns[c])
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                raise WriteError(f"cannot write {self.name}.{c} as {types[c]}: "
                                 f"{first_line(e)}") from None
        return pa.table(arrays, names=names) if names else pa.table({})

    def insert(self, rows, *, allowed=None, replace: bool = False) -> int:
        """Insert rows (INSERT OR REPLACE with replace); returns how many."""
        data = self.cast(rows, allowed)
        if data.num_rows == 0:
            return 0
        cols = ", ".join(f'"{c}"' for c in data.column_names)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self.cat.registered(data) as src:
            self.cat.con.execute(f"{verb} INTO {self.name} ({cols}) SELECT {cols} FROM {src}")
        return data.num_rows

    def insert_missing(self, rows, on: tuple[str, ...], *, allowed=None) -> int:
        """Insert the rows no existing row equals on the columns `on` (NULLs equal), nor an
        earlier row of rows; returns how many were new."""
        data = self.cast(rows, allowed)
        if data.num_rows == 0:
            return 0
        cols = ", ".join(f'"{c}"' for c in data.column_names)
        same = " AND ".join(f'x."{c}" IS NOT DISTINCT FROM r."{c}"' for c in on)
        part = ", ".join(f'"{c}"' for c in on)
        with self.cat.registered(data) as src:
            n = self.cat.con.execute(
                f"INSERT INTO {self.name} ({cols}) SELECT {cols} FROM (SELECT * FROM {src} "
                f"QUALIFY row_number() OVER (PARTITION BY {part}) = 1) r "
                f"WHERE NOT EXISTS (SELECT 1 FROM {self.name} x WHERE {same})").fetchall()
        return int(n[0][0]) if n else 0

    def update(self, rows, *, key: str | None = None, allowed=None) -> int:
        """UPDATE the rows matched on the key column with the other columns' values; one
        statement, however many rows."""
        key = key or self.key
        data = self.cast(rows, allowed)
        cols = [c for c in data.column_names if c != key]
        if not cols or data.num_rows == 0:
            return 0
        sets = ", ".join(f'"{c}" = {{src}}."{c}"' for c in cols)
        with self.cat.registered(data) as src:
            self.cat.con.execute(
                f'UPDATE {self.name} SET {sets.format(src=src)} FROM {src} '
                f'WHERE {self.name}."{key}" = {src}."{key}"')
        return data.num_rows

    def update_from(self, sql: str, params: dict | None, columns, *,
                    key: str | None = None, allowed=None) -> None:
        """Set-based UPDATE: the rows of a query (the key and `columns`) set those columns,
        each cast to its declared type in DuckDB."""
        key = key or self.key
        self._check(list(columns), allowed)
        types = self.types
        sets = ", ".join(f'"{c}" = CAST(_uc_src."{c}" AS {types[c]})' for c in columns)
        self.cat.con.execute(
            f'UPDATE {self.name} SET {sets} FROM ({sql}) _uc_src '
            f'WHERE {self.name}."{key}" = _uc_src."{key}"', params or None)

    def update_set(self, values: dict[str, str], params: dict | None, *,
                   where: str | None = None, allowed=None) -> None:
        """Set-based UPDATE in place: each column to a trusted SQL expression over the row
        (cast to its declared type), on the rows where a trusted predicate holds (every row
        without one). No join with a source query: over 41M rows, balance's update joined
        with the selection's rows took 27 s, in place 1.7 s."""
        self._check(list(values), allowed)
        types = self.types
        sets = ", ".join(f'"{c}" = CAST(({e}) AS {types[c]})' for c, e in values.items())
        self.cat.con.execute(f"UPDATE {self.name} SET {sets}"
                             + (f" WHERE {where}" if where else ""), params or None)

    def insert_from(self, sql: str, params: dict | None, columns, *, allowed=None) -> int:
        """Set-based INSERT of a query's `columns`, each cast to its declared type; returns
        how many rows."""
        self._check(list(columns), allowed)
        types = self.types
        cols = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join(f'CAST(_uc_src."{c}" AS {types[c]})' for c in columns)
        n = self.cat.con.execute(f"INSERT INTO {self.name} ({cols}) SELECT {values} "
                                 f"FROM ({sql}) _uc_src", params or None).fetchall()
        return int(n[0][0]) if n else 0

    def delete_keys(self, sql: str, params: dict | None, *, key: str | None = None) -> None:
        """DELETE the rows whose key a query's `key` column gives (a side table's rows of
        the rows a set stage rewrites)."""
        key = key or self.key
        self.cat.con.execute(f'DELETE FROM {self.name} WHERE "{key}" IN '
                             f'(SELECT "{key}" FROM ({sql}) _uc_src)', params or None)


def _after_failure(cleanup, name: str) -> None:
    """A block's cleanup while its error propagates: in a transaction the error aborted,
    DuckDB refuses every statement until the rollback (which drops a temp table made in it),
    and the error to see is the block's, not that refusal."""
    try:
        cleanup(name)
    except duckdb.TransactionException:
        pass


class Captions(Table):
    """anchor_captions: every caption of an anchor, unique text per anchor, in order of
    arrival (sql/queries/captions.sql)."""

    def merge(self, rows: list[dict], run_id: int | None) -> int:
        """Merge captions; returns how many were new. Each row has anchor_id, caption and
        source (and optionally model, prompt, invalid_reason); texts are whitespace-normalised,
        empty ones dropped (unless invalid), and a text the anchor already has (from any
        source) is not added again. New captions keep the rows' order after the anchor's
        existing ones."""
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
        with self.cat.registered(pa.table(cols), "_captions"):
            n = self.cat.con.execute(named_queries("captions")["add"],
                                     {"run_id": run_id, "at": now(), "lo": min(ids),
                                      "hi": max(ids)}).fetchall()
        return int(n[0][0]) if n else 0

    def remove_source(self, anchor_ids: list[int], source: str) -> None:
        """Drop one source's captions of these anchors (a captioner's --force rerun)."""
        if not anchor_ids:
            return
        import pyarrow as pa
        ids = pa.table({"anchor_id": pa.array(anchor_ids, pa.int64())})
        with self.cat.registered(ids, "_anchors"):
            self.cat.con.execute(
                named_queries("captions")["remove_source"],
                {"lo": min(anchor_ids), "hi": max(anchor_ids), "source": source})


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
