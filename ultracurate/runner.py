"""The runner: the one way every job runs, and the two contracts a stage follows.

    run(ws, "score", Selection(where="edit_type = 'replace'"), engine="ray")
    run(ws, "filter", thresholds=Thresholds.preset("ultraedit"), dry_run=True)

A **row stage** (`RowStage`: ingest, caption, instruct, ground, classify-masks, generate, score,
embed-anchors, the UltraEdit import) works row by row. It declares which rows it takes (its
table's view narrowed by its trusted `default_where`; or outside items such as files), what
it computes for a batch (`process`, which may run on another thread or a Ray worker and never
touches the catalog), and which columns it writes. A **set stage** (`SetStage`: filter,
balance, dedup, review pulls, ...) is one SQL plan applied in one transaction: `plan` reads,
`apply` writes; a stage that makes something outside the catalog first (an export's files)
does it in `produce`, with no catalog connection held.

The runner owns, for both: the run ledger (`runs`: options, selection, models, counters,
state), the selection (the user's `--where`, guarded; a child selection scoped by a semi-join
on its parent's view; the stage's trusted predicates), resumption (the only place rows a stage
finished are left out: `stage_state`, or the catalog's record of outside items), progress,
Ctrl-C, and the engine (local or Ray) where rows are computed. Every catalog access of a stage
goes through the handle the runner gives it (`Access`), inside the runner's transaction for
writes, through the catalog's table API. A refusal (a bad option, a bad `--where`, an empty
selection where one is needed) happens before the run is recorded, so it leaves the catalog
as it was.

Jobs share the catalog with readers and with each other. DuckDB lets one process write a file
or several read it, so a row stage holds the catalog only while it must: one connection to plan,
materialise its pending rows (`Pending`: a stage in key order, their first key window) and
record its run; none while batches compute; one for each batch's commit (its writes, its rows'
marks, its run's counters and heartbeat) or each further window of its pending rows, which waits
its turn behind readers and other jobs' commits. A set stage is one transaction. The run
records its process (host, pid, start time), so a run marked running is closed as killed only
once its process is gone (`ultracurate.runs`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import procs
from .catalog import (KEYS, VIEWS, Catalog, JobRun, UndeclaredWrite, lock_wait, named_queries,
                      now, readers_waiting)
from .errors import UltracurateError, reason_text
from .progress import JobBar
from .runs import close_dead
from .selection import (Selection, key_bounds, key_window, key_window_params,
                        selected_keys_sql, top_n)
from .workspace import Workspace, remove_dead_files


@dataclass
class Context:
    """What a stage's `setup`/`prepare`/`process`/`produce` may use. Picklable (no catalog
    handle)."""

    workspace_root: str
    device: str = "cpu"
    run_id: int = 0
    config: dict = field(default_factory=dict)
    force: bool = False
    batch_size: int | None = None   # the job's rows per batch
    show_progress: bool = True      # whether the job shows progress bars
    batch_rows: int = 0   # rows of the batch in hand (set by the local engine)
    # the runner's bar, given rows of the batch in hand done; never shipped to a Ray worker,
    # whose batches move the bar when they return
    on_progress: Callable[[float], None] | None = field(default=None, repr=False,
                                                        compare=False)

    @property
    def workspace(self) -> Workspace:
        # the driver's config travels with the context: a worker needs no workspace folder
        return (Workspace.attached(self.workspace_root, self.config) if self.config
                else Workspace(self.workspace_root))

    def progress(self, done: float, total: float) -> None:
        """Report that done/total of the batch in hand is computed (a diffusion step, a
        sub-batch), so the bar moves inside a long batch. A no-op where nothing listens."""
        if self.on_progress is not None and self.batch_rows and total > 0:
            self.on_progress(self.batch_rows * min(max(done / total, 0.0), 1.0))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "on_progress": None}


@dataclass
class BatchResult:
    """What `process` returns for one batch. `updates`/`inserts` map a table to its rows (a
    polars DataFrame, an Arrow table or a list of dicts; updates keyed by the table's key);
    `failed` maps a row key to its error. Keys of the batch neither failed nor listed are
    marked done."""

    updates: dict[str, Any] = field(default_factory=dict)
    inserts: dict[str, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific, for write()
    # Work that finishes the batch off the compute thread (waiting for its media writes):
    # the runner calls it on its commit thread, while the next batch computes, and commits
    # what it returns.
    complete: Any = None

    def completed(self) -> "BatchResult":
        return self.complete() if self.complete is not None else self


GROUP = "_uc_group"       # the row key holding a row's group (see RowStage.group_by)
ORDINAL = "_uc_ordinal"   # a row's number in the whole selection (see RowStage.ordinal_where)
ITEMS = "_uc_items"       # the relation a stage's outside items are registered as


# -- what a stage may touch -------------------------------------------------------------------
class Access:
    """A stage's handle on the catalog, given by the runner: reads always; writes only inside
    the runner's transaction, to the tables and columns the stage declared (`writes`), through
    the catalog's table API. `w.edits.insert(rows)`, `w.query(sql, params)`, `w.run_id`."""

    def __init__(self, cat: Catalog, stage: "Stage", run: JobRun | None = None,
                 writable: bool = False, workspace: Workspace | None = None,
                 force: bool = False):
        self.cat, self.stage, self.run, self.writable = cat, stage, run, writable
        self.workspace, self.force = workspace, force

    @property
    def run_id(self) -> int | None:
        return self.run.run_id if self.run else None

    @property
    def lance_path(self):
        return self.cat.path.parent / "lance"

    # reads
    def query(self, sql: str, params: Any = None) -> list[dict]:
        return self.cat.query(sql, params)

    def scalar(self, sql: str, params: Any = None) -> Any:
        return self.cat.scalar(sql, params)

    def pl(self, sql: str, params: Any = None):
        return self.cat.pl(sql, params)

    def named(self, queries: str, name: str, params: Any = None) -> list[dict]:
        """A query of sql/queries/<queries>.sql."""
        return self.cat.query(named_queries(queries)[name], params)

    def registered(self, data, name: str | None = None):
        return self.cat.registered(data, name)

    def materialized(self, sql: str, params: Any = None):
        return self.cat.materialized(sql, params)

    def temp_table(self, sql: str, params: Any = None) -> str:
        return self.cat.temp_table(sql, params)

    def drop_temp(self, name: str) -> None:
        self.cat.drop_temp(name)

    def selected(self, selection: Selection, table: str, columns: str = "*",
                 where: str | None = None) -> tuple[str, dict]:
        """SQL (and its parameters) of the rows of table's view that selection picks."""
        return selected_keys_sql(self.cat.con, VIEWS[table], KEYS[table], selection, where,
                                 columns)

    # writes
    def table(self, name: str) -> "_Declared":
        if not self.writable:
            raise RuntimeError(f"stage {self.stage.name} wrote {name} outside a transaction")
        return _Declared(self.cat.table(name), self.stage.writes.get(name, set()))

    def __getattr__(self, name: str):
        from .catalog import TABLE_NAMES
        if name in TABLE_NAMES:
            return self.table(name)
        raise AttributeError(name)


class _Declared:
    """A table's writes narrowed to the columns its stage declared."""

    def __init__(self, table, allowed):
        self._t, self._allowed = table, allowed

    def __getattr__(self, name):
        return getattr(self._t, name)

    def insert(self, rows, **kw) -> int:
        return self._t.insert(rows, allowed=self._allowed, **kw)

    def insert_missing(self, rows, on, **kw) -> int:
        return self._t.insert_missing(rows, on, allowed=self._allowed, **kw)

    def update(self, rows, **kw) -> int:
        return self._t.update(rows, allowed=self._allowed, **kw)

    def update_from(self, sql, params, columns, **kw) -> None:
        return self._t.update_from(sql, params, columns, allowed=self._allowed, **kw)

    def update_set(self, values, params, **kw) -> None:
        return self._t.update_set(values, params, allowed=self._allowed, **kw)

    def insert_from(self, sql, params, columns) -> int:
        return self._t.insert_from(sql, params, columns, allowed=self._allowed)

    def delete_keys(self, sql, params, **kw) -> None:
        if not self._allowed:
            raise UndeclaredWrite(f"deleted from {self._t.name}, which the stage does not "
                                  "declare")
        return self._t.delete_keys(sql, params, **kw)

    def merge(self, rows, run_id) -> int:  # anchor_captions
        self._t._check({k for r in rows for k in r}, self._allowed)
        return self._t.merge(rows, run_id)

    def remove_source(self, anchor_ids, source) -> None:
        return self._t.remove_source(anchor_ids, source)


# -- the two contracts ------------------------------------------------------------------------
class Stage:
    """What both contracts share: a registered name (runs.stage), the table whose view the
    selection applies to, the options recorded in runs.params, the model roles it loads."""

    name: str = ""
    table: str | None = "edits"      # anchors | edits | candidates (None: no selection)
    roles: tuple[str, ...] = ()      # model roles it loads (recorded in runs.models)
    writes: dict[str, set[str]] = {}  # table -> columns it may set
    path_options: tuple[str, ...] = ()  # options that are paths (a recipe's: workspace-relative)

    def __init__(self, **params):
        self.params = params

    def requires(self) -> list["Stage"]:
        """Stages to run before this one, each as its own run (dedup embeds anchors first);
        their summaries are in self.before when this one runs."""
        return []

    before: list = []

    def check(self, r: Access, selection: Selection) -> None:
        """Refuse what cannot run, before the run is recorded (reads only)."""

    def effective_selection(self, selection: Selection) -> Selection:
        """The selection the stage runs over, as runs.selection records it (an export
        without --where: its default)."""
        return selection

    def models(self, ctx: Context) -> dict:
        from .models import describe
        return describe(ctx.workspace, self.roles)


class RowStage(Stage):
    """A stage that works row by row. Subclasses set the class attributes and `process`."""

    table: str | None = "edits"
    default_where: str | None = None  # trusted predicate: the rows it can work on at all
    force_where: str | None = None    # with --force, instead of default_where
    columns: str = "*"               # what a batch needs from the view
    batch_size: int = 16
    # The table whose view the user's selection is over, when it is not the stage's own: the
    # stage runs over the rows of its table whose parent rows the selection picks (generate:
    # the candidates of the selected edits).
    selects: str | None = None
    # A trusted SQL expression over the view: rows with the same non-NULL value form a group
    # that no batch splits (NULL: a row on its own). The runner hands it to the stage as
    # row[GROUP], keeps a group's rows together in the batch order, and fills a batch with
    # whole groups (a group larger than the batch size is a batch of its own).
    group_by: str | None = None
    order_by: str | None = None       # batch order (default: the key); e.g. "anchor_id, edit_id"
    # order_by only gathers rows for a batch's sake (ground: an anchor's edits share its
    # image embedding), so the rows may come a key window at a time, each in that order
    # (Pending); otherwise the order holds over the whole selection (one sorted read).
    order_in_windows: bool = False
    # A stage whose work is arithmetic over columns gets each batch as a pyarrow Table
    # instead of a list of dicts (no Python object per row; no groups, numbering or order
    # of its own): classify-masks over masks whose features it computes.
    columnar: bool = False
    # Rows the stage finishes in SQL, without a batch: a trusted predicate over its view
    # (classify-masks: masks whose features are stored). The runner applies its pending rows
    # where this holds with `apply_set`, in the transaction that records the run (as a set
    # stage applies its plan), marks them done and counts them; batches take the others.
    set_where: str | None = None
    set_columns: str | None = None    # what apply_set reads of each row (default: the key)
    # Resumption, all done by the runner. A row is finished once stage_state marks it done...
    resume_on: tuple[str, ...] = ()   # ...by a run with the same values of these options
    run_column: str | None = None     # ...and the row still carries that run in this column
    # A trusted predicate: the runner numbers the selected rows where it holds, in key order,
    # over the whole selection before finished rows are left out, and hands each row its
    # number (row[ORDINAL]); a stage that deals work out over the selection (instruct's edit
    # types) deals the same on a rerun. (No count of them: it would be a pass over the whole
    # selection before the first batch.)
    ordinal_where: str | None = None
    # Outside items (files, parquet rows) instead of catalog rows: `items()` gives them, keyed
    # by `key`; `recorded` names the query (sql/queries/<file>.sql: "file.name") that finds
    # the ones the catalog already records, which the runner leaves out unless --force;
    # `identity` is a column several items may share (one row they make): the runner takes the
    # first pending item of each.
    key: str | None = None
    recorded: str | None = None
    identity: str | None = None

    def items(self):
        """Outside items as an Arrow table (None: the rows of the table's view)."""
        return None

    def sql_params(self) -> dict:
        """Parameters of the stage's trusted SQL (default_where, columns, ...)."""
        return {}

    def plan(self, w: Access, selection: Selection, parent_sql: str, params: dict
             ) -> dict | None:
        """Set-based preparation in one transaction before the run (generate plans its
        candidate rows): parent_sql selects the user's rows (selection) of `selects`. Returns
        what runs.params records as `plan`. It may plan the first of several windows: then
        plan_left holds until plan_next planned the last (the runner plans them as its pending
        rows need them)."""
        return None

    @property
    def plan_left(self) -> bool:
        """Whether the plan has windows left to plan (plan_next)."""
        return False

    def plan_next(self, w: Access) -> tuple[int, int]:
        """Plan the next window in the caller's transaction: the first key of the rows it
        added (keys above every earlier row's) and how many."""
        raise NotImplementedError(f"{self.name} plans in one go")

    def key_of(self, row: dict) -> int:
        return row[self.row_key]

    def keys_of(self, batch) -> list[int]:
        """The keys of a batch's rows, in order."""
        if self.columnar:
            return batch.column(self.row_key).to_pylist()
        return [self.key_of(r) for r in batch]

    @property
    def row_key(self) -> str:
        return self.key or KEYS[self.table]

    @property
    def items_relation(self) -> bool:
        """Whether the stage runs over outside items (`items()`) rather than catalog rows."""
        return self.key is not None

    @property
    def tracks_state(self) -> bool:
        """Catalog rows are marked done/failed in stage_state; outside items are recorded by
        what they made."""
        return self.recorded is None and self.key is None

    # -- on the driver, inside the runner's transactions -----------------------------------
    def apply_set(self, w: Access, rows: str) -> None:
        """Write the rows finished in SQL (`set_where`): `rows` names a relation of their
        `set_columns`, one row each. Runs in the runner's transaction, before any batch."""
        raise NotImplementedError

    def write(self, w: Access, result: BatchResult) -> None:
        """Apply a batch's results (default: inserts, then updates)."""
        for table, rows in result.inserts.items():
            w.table(table).insert(rows)
        for table, rows in result.updates.items():
            w.table(table).update(rows)

    def finish(self, w: Access) -> None:
        """Called once after the last batch (in its own transaction)."""

    def report(self, w: Access) -> dict:
        """What the run's summary adds to its counts (after finish): stage-specific figures,
        and `notes`, lines a person should read (also the run's message)."""
        return {}

    # -- where the work happens (driver thread, another thread, or a Ray worker) ----------
    def setup(self, ctx: Context) -> None:
        """Load models once per worker."""

    def prepare(self, rows: list[dict], ctx: Context) -> Any:
        """CPU-side loading (decode images, ...) for a batch; runs ahead on a thread."""
        return None

    def process(self, rows: list[dict], prepared: Any, ctx: Context) -> BatchResult:
        raise NotImplementedError


class SetStage(Stage):
    """A stage that is one SQL plan applied in one transaction. `plan` reads (a refusal there
    records no run), `produce` (optional) makes what lies outside the catalog with no catalog
    connection held, `apply` writes, in the transaction that also records the run. Set
    `w.run`'s counters and message in apply."""

    record_empty: bool = True   # False: a plan with nothing to do records no run

    def plan(self, r: Access, selection: Selection) -> Any:
        raise NotImplementedError

    def empty(self, plan: Any) -> bool:
        return False

    def produce(self, plan: Any, ctx: Context) -> Any:
        return None

    def apply(self, w: Access, plan: Any, produced: Any) -> Any:
        """Write, and return the stage's result (what run()'s summary carries)."""
        raise NotImplementedError

    def preview(self, plan: Any) -> Any:
        """dry_run: the result without writing anything."""
        raise UltracurateError(f"{self.name} has no dry run")

    def failed(self, plan: Any, error: BaseException) -> None:
        """Clean up after produce or apply failed (an export's partial folder)."""

    has_produce = False


class StepsStage(Stage):
    """A stage made of stage runs (a chain's turns): `steps` runs them, each through `run`
    (`ParentRun.run_step`), as children of this stage's own run, which the runner records
    first and ends with them; what `steps` returns is the summary's result. `check` refuses
    before anything is recorded, like the other contracts'."""

    table: str | None = None

    def steps(self, ws: Workspace, selection: Selection, parent, progress: bool) -> Any:
        raise NotImplementedError


# -- engines ----------------------------------------------------------------------------------
class LocalEngine:
    """In-process: `prepare` runs on worker threads up to `prefetch` batches ahead of
    `process`, so decoding overlaps the model."""

    name = "local"

    def __init__(self, prefetch: int = 2, threads: int = 2):
        self.prefetch = prefetch
        self.threads = threads

    def map(self, stage: RowStage, batches, ctx: Context, stop=None
            ) -> Iterator[tuple[list[dict], BatchResult | BaseException]]:
        stage.setup(ctx)
        with ThreadPoolExecutor(self.threads) as pool:
            futures: queue.Queue = queue.Queue()
            it = iter(batches)
            for batch in _take(it, self.prefetch):
                futures.put((batch, pool.submit(stage.prepare, batch, ctx)))
            while not futures.empty():
                batch, fut = futures.get()
                for nxt in _take(it, 1):
                    futures.put((nxt, pool.submit(stage.prepare, nxt, ctx)))
                try:
                    ctx.batch_rows = len(batch)   # what ctx.progress reports a share of
                    yield batch, stage.process(batch, fut.result(), ctx)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # one bad batch never stops the job
                    yield batch, e


def _take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


class RayEngine:
    """Stage replicas as Ray actors, spread over the cluster's nodes; results stream back to
    the driver, which alone writes the catalog. Workers read and write media through the
    workspace's media store (a shared mount or a bucket, see `workspace.MediaStore`).

    Faults: a replica that dies (its node lost) takes its in-flight batches with it; the
    driver knows which (each task is tracked), resubmits them to live replicas (at most
    `retries` times each; beyond that the batch's rows are marked failed and a rerun retries
    them), and starts a replacement when the cluster has room. Nothing is written twice:
    a batch's rows are committed only from the one result that reaches the driver.
    Placement: the replicas must all start within `placement_timeout` seconds, else the job
    fails in one line naming what it asked for and what the cluster has."""

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None,
                 num_gpus_per_worker: float | None = None,
                 num_cpus_per_worker: float | None = None,
                 resources_per_worker: dict | None = None,
                 placement_timeout: float | None = None, retries: int | None = None,
                 ship_code: bool | None = None):
        self.address = address
        self.num_workers = num_workers
        self.num_gpus_per_worker = num_gpus_per_worker
        self.num_cpus_per_worker = num_cpus_per_worker
        self.resources_per_worker = dict(resources_per_worker or {})
        self.placement_timeout = float(PLACEMENT_TIMEOUT if placement_timeout is None
                                       else placement_timeout)
        self.retries = RAY_RETRIES if retries is None else int(retries)
        self.ship_code = ship_code
        self.stats: dict = {}   # what the last map did: nodes, replicas lost, batches retried
        # (recorded in runs.workers)

    # -- the cluster ------------------------------------------------------------------------
    def _connect(self) -> bool:
        """ray.init unless the caller did; True when this engine started (and ends) it."""
        import ray
        if ray.is_initialized():
            return False
        env = {"env_vars": {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}
        # Ray's own messages stay quiet (a refusal is one line); its logs are in its session
        # folder (/tmp/ray/session_latest/logs)
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if self.address in (None, "local"):
            ray.init(num_cpus=os.cpu_count(), runtime_env=env, **quiet)
        else:
            if self.ship_code is not False:   # workers import the driver's code, not theirs
                env["py_modules"] = [_package_dir()]
                env["excludes"] = ["__pycache__", "*.pyc"]
            ray.init(address=self.address, runtime_env=env, **quiet)
        return True

    def _spec(self, gpus_in_cluster: float) -> dict:
        per_gpu = self.num_gpus_per_worker if self.num_gpus_per_worker is not None else (
            1 if gpus_in_cluster else 0)
        per_cpu = self.num_cpus_per_worker if self.num_cpus_per_worker is not None else 1
        return {"num_gpus": per_gpu, "num_cpus": per_cpu,
                "resources": self.resources_per_worker}

    def _replicas(self, spec: dict, gpus_in_cluster: float) -> int:
        if self.num_workers:
            return self.num_workers
        if spec["num_gpus"]:
            return max(1, int(gpus_in_cluster // spec["num_gpus"]))
        return 1

    def map(self, stage: RowStage, batches, ctx: Context, stop=None):
        import ray
        self.stats = {}
        started = self._connect()
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            spec = self._spec(gpus)
            n = self._replicas(spec, gpus)
            worker_ctx = Context(ctx.workspace_root, "cuda" if spec["num_gpus"] else "cpu",
                                 ctx.run_id, ctx.config, ctx.force, ctx.batch_size,
                                 show_progress=False)
            pool = _Replicas(stage, worker_ctx, spec, n, self.placement_timeout, stop)
            try:
                pool.start()
                yield from pool.feed(batches, self.retries)
            finally:
                self.stats = pool.stats()
                pool.close()
        finally:
            if started:
                ray.shutdown()


PLACEMENT_TIMEOUT = 60.0   # seconds every replica has to start (config: [ray] placement_timeout)
RAY_RETRIES = 2            # times a batch whose replica died is resubmitted ([ray] retries)
IN_FLIGHT = 2              # batches queued per replica (one running, one waiting)
# Environment the workers need as the driver has it (offline flags; credentials of the media
# store are read by the workers' own s3fs from their environment or the workspace config).
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "ULTRACURATE_PROGRESS",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")


def _package_dir() -> str:
    """The package folder shipped to the workers."""
    return str(Path(__file__).resolve().parent)


def code_digest() -> str:
    """A digest of the Python sources of the package this process runs: driver and workers
    must run the same code."""
    return _code_digest(str(Path(__file__).resolve().parent))


@functools.lru_cache(maxsize=4)
def _code_digest(root: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*.py")):
        if "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _describe(spec: dict) -> str:
    parts = [f"CPU {spec['num_cpus']:g}"] + ([f"GPU {spec['num_gpus']:g}"]
                                              if spec["num_gpus"] else [])
    parts += [f"{k} {v:g}" for k, v in sorted(spec["resources"].items())]
    return ", ".join(parts)


def _cluster_text() -> str:
    """What the cluster has: its live nodes and their resources (total, and free now)."""
    import ray
    nodes = [x for x in ray.nodes() if x.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()

    def show(res):
        keep = [k for k in sorted(res) if not k.startswith("node:") and k not in
                ("memory", "object_store_memory")]
        return ", ".join(f"{k} {res[k]:g}" for k in keep) or "nothing"
    return f"{len(nodes)} node(s) with {show(total)} (free: {show(free)})"


class _Replicas:
    """The actors of one job and the batches in flight on each; the driver's side of the
    fault handling (see RayEngine)."""

    def __init__(self, stage, ctx, spec, n, timeout, stop):
        import ray
        self.ray = ray
        self.stage, self.ctx, self.spec, self.n = stage, ctx, spec, n
        self.timeout, self.stop = timeout, stop or (lambda: False)
        self.live: dict = {}       # actor -> node id
        self.starting: dict = {}   # ready() ref -> actor
        self.inflight: dict = {}   # task ref -> (actor, batch, attempt)
        self.lost = 0
        self.retried = 0
        self.replaced = 0
        self.batches_by_node: dict[str, int] = {}
        self.placed: list[str] = []   # the node of every replica that started
        from . import __version__
        self.version = (__version__, code_digest())

    def _spawn(self) -> None:
        Actor = self.ray.remote(_StageActor).options(
            num_cpus=self.spec["num_cpus"], num_gpus=self.spec["num_gpus"],
            resources=self.spec["resources"] or None, scheduling_strategy="SPREAD",
            max_restarts=0, max_concurrency=1)
        actor = Actor.remote(self.stage, self.ctx)
        self.starting[actor.ready.remote()] = actor

    def _check_stop(self) -> None:
        if self.stop():
            raise KeyboardInterrupt

    def _accept(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            node, version = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            self.lost += 1   # died while starting (its node went): another may take its place
            return
        except self.ray.exceptions.RayError as e:
            raise UltracurateError(f"a Ray replica could not start: {_last_line(e)}") from None
        if tuple(version) != self.version:
            raise UltracurateError(
                f"the Ray worker on node {node[:12]} runs ultracurate {version[0]} (code "
                f"{version[1]}), the driver {self.version[0]} (code {self.version[1]}): install "
                "the same version on every node, or let the engine ship the driver's code "
                "([ray] ship_code, on by default with --address)")
        self.live[actor] = node
        self.placed.append(node)

    def start(self) -> None:
        """Start n replicas and wait until all are placed, or fail in one line."""
        for _ in range(self.n):
            self._spawn()
        deadline = time.monotonic() + self.timeout
        while self.starting:
            self._check_stop()
            left = deadline - time.monotonic()
            if left <= 0:
                raise UltracurateError(
                    f"cannot place {self.n} Ray replica(s) of {_describe(self.spec)} each "
                    f"within {self.timeout:g} s: {len(self.live)} started; the cluster has "
                    f"{_cluster_text()}; lower --workers or the per-worker resources, or add "
                    "nodes")
            ready, _ = self.ray.wait(list(self.starting), num_returns=1,
                                     timeout=min(0.5, left))
            for ref in ready:
                self._accept(ref)
        if not self.live:
            raise UltracurateError("every Ray replica died while starting")

    def _submit(self, actor, batch, attempt) -> None:
        self.inflight[actor.run.remote(batch)] = (actor, batch, attempt)

    def _load(self, actor) -> int:
        return sum(1 for a, _, _ in self.inflight.values() if a is actor)

    def _free_slot(self):
        """The live replica with the fewest batches in flight, if one has room."""
        if not self.live:
            return None
        actor = min(self.live, key=self._load)
        return actor if self._load(actor) < IN_FLIGHT else None

    def _lose(self, actor, retry: list, why: str) -> None:
        """A replica died: its in-flight batches go back to the queue, and a replacement is
        asked for (it joins when the cluster can place it)."""
        if actor in self.live:
            del self.live[actor]
            self.lost += 1
            if self.replaced < self.n:   # bounded: a node that keeps dying is not chased
                self.replaced += 1
                self._spawn()
        for ref, (a, batch, attempt) in list(self.inflight.items()):
            if a is actor:
                del self.inflight[ref]
                retry.append((batch, attempt + 1, why))

    def feed(self, batches, retries: int):
        """Yield (batch, result) as results arrive; every batch exactly once."""
        it = iter(batches)
        retry: list = []         # (batch, attempt, why) to resubmit first
        exhausted = False
        no_replica_since = None
        while True:
            self._check_stop()
            # fill the free slots: resubmitted batches first
            while True:
                actor = self._free_slot()
                if actor is None:
                    break
                if retry:
                    batch, attempt, _ = retry.pop(0)
                    self.retried += 1
                elif not exhausted:
                    nxt = _take(it, 1)
                    if not nxt:
                        exhausted = True
                        continue
                    batch, attempt = nxt[0], 0
                else:
                    break
                self._submit(actor, batch, attempt)
            if not self.inflight and not retry and exhausted:
                return
            if not self.live and not self.inflight:
                # every replica lost: wait for a replacement up to the placement timeout
                no_replica_since = no_replica_since or time.monotonic()
                if not self.starting or time.monotonic() - no_replica_since > self.timeout:
                    raise UltracurateError(
                        f"every Ray replica was lost ({self.lost}) and none could be placed "
                        f"again within {self.timeout:g} s; the cluster has {_cluster_text()}; "
                        "rerun to resume")
            else:
                no_replica_since = None
            refs = list(self.inflight) + list(self.starting)
            done, _ = self.ray.wait(refs, num_returns=1, timeout=0.5)
            for ref in done:
                if ref in self.starting:
                    self._accept(ref)
                    continue
                actor, batch, attempt = self.inflight.pop(ref)
                try:
                    out_batch, result = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as e:
                    retry.append((batch, attempt + 1, _last_line(e)))
                    self._lose(actor, retry, _last_line(e))
                    continue
                except (self.ray.exceptions.ObjectLostError,
                        self.ray.exceptions.OwnerDiedError) as e:
                    retry.append((batch, attempt + 1, _last_line(e)))
                    continue
                except self.ray.exceptions.RayError as e:
                    # the replica itself failed (its models did not load, the stage did
                    # not unpickle): every batch would fail the same way
                    node = self.live.get(actor, "?")[:12]
                    raise UltracurateError(f"Ray worker failed on node {node}: "
                                           f"{_last_line(e)}") from None
                node = self.live.get(actor, "?")
                self.batches_by_node[node] = self.batches_by_node.get(node, 0) + 1
                yield out_batch, result
            # batches retried too often: their rows are failed (a rerun retries them)
            keep = []
            for batch, attempt, why in retry:
                if attempt > retries:
                    yield batch, UltracurateError(
                        f"lost with its Ray worker {attempt} times (last: {why})")
                else:
                    keep.append((batch, attempt, why))
            retry[:] = keep

    def stats(self) -> dict:
        return {"replicas": self.n, "placed": list(self.placed),
                "nodes": dict(self.batches_by_node),
                "lost": self.lost, "retried": self.retried,
                "spec": {"num_cpus": self.spec["num_cpus"], "num_gpus": self.spec["num_gpus"],
                         **self.spec["resources"]}}

    def close(self) -> None:
        for actor in [*self.live, *self.starting.values()]:
            try:
                self.ray.kill(actor)
            except Exception:
                pass


def _last_line(e: BaseException) -> str:
    """A Ray error in one line: a task's own exception (RayTaskError.cause) rather than the
    traceback Ray wraps it in."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
        if not isinstance(e, UltracurateError):
            return f"{type(e).__name__}: {_last_line(e)}"
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


class _StageActor:
    """One replica: placed first (ready() answers at once), models loaded on its first batch
    (so the placement timeout never counts model loading)."""

    def __init__(self, stage: RowStage, ctx: Context):
        self.stage, self.ctx, self._setup = stage, ctx, False

    def ready(self):
        import ray
        import ultracurate
        return ray.get_runtime_context().get_node_id(), (ultracurate.__version__,
                                                         code_digest())

    def run(self, batch):
        if not self._setup:   # a failure here fails the job (every batch would fail)
            self.stage.setup(self.ctx)
            self._setup = True
        try:  # completed here: what travels back to the driver is plain rows
            return batch, self.stage.process(batch, self.stage.prepare(batch, self.ctx),
                                             self.ctx).completed()
        except Exception as e:
            return batch, RuntimeError(f"{type(e).__name__}: {e}")


ENGINES = ("local", "ray")


def make_engine(engine: Any = None, address: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                config: dict | None = None):
    """An engine from its name (local, ray) or as given. The Ray engine's other settings come
    from the workspace config's [ray] section (placement_timeout, retries, ship_code,
    resources_per_worker, and defaults for the per-worker resources)."""
    if engine is None or engine == "local":
        if workers is not None and workers > 1:
            raise UltracurateError(f"--workers {workers} needs --engine ray (the local engine "
                                   "runs one replica)")
        return LocalEngine()
    if engine == "ray":
        cfg = dict(config or {})
        unknown = sorted(set(cfg) - RAY_CONFIG)
        if unknown:
            raise UltracurateError(f"[ray] {unknown[0]}: unknown setting (one of "
                                   f"{', '.join(sorted(RAY_CONFIG))})")
        timeout, retries = cfg.get("placement_timeout"), cfg.get("retries")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not 0 < timeout < float("inf")):
            raise UltracurateError(f"[ray] placement_timeout must be a number of seconds > 0, "
                                   f"got {timeout!r}")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise UltracurateError(f"[ray] retries must be a whole number >= 0, got {retries!r}")
        return RayEngine(address=address or cfg.get("address"),
                         num_workers=workers or cfg.get("workers"),
                         num_gpus_per_worker=_first(gpus_per_worker, cfg.get("gpus_per_worker")),
                         num_cpus_per_worker=_first(cpus_per_worker, cfg.get("cpus_per_worker")),
                         resources_per_worker=cfg.get("resources_per_worker"),
                         placement_timeout=cfg.get("placement_timeout"),
                         retries=cfg.get("retries"), ship_code=cfg.get("ship_code"))
    if isinstance(engine, str):
        raise UltracurateError(f"unknown engine '{engine}' (local or ray)")
    return engine


RAY_CONFIG = {"address", "workers", "gpus_per_worker", "cpus_per_worker",
              "resources_per_worker", "placement_timeout", "retries", "ship_code"}


def _first(*values):
    return next((v for v in values if v is not None), None)


# -- the summary of a run ---------------------------------------------------------------------
@dataclass
class RunSummary:
    run_id: int | None
    stage: str
    rows_in: int
    rows_done: int
    rows_failed: int
    state: str           # completed | interrupted | failed | dry-run | empty
    extra: dict = field(default_factory=dict)  # a row stage's report: figures and notes
    result: Any = None   # a set stage's own result (FilterResult, BalanceResult, ...)
    seconds: float = 0.0
    before: list["RunSummary"] = field(default_factory=list)  # the runs stage.requires() made

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("extra", "result", "before")}
        out.update(self.extra)
        if self.result is not None:
            out.update(self.result.to_json() if hasattr(self.result, "to_json")
                       else {"result": self.result})
        if self.before:
            out["before"] = [b.to_json() for b in self.before]
        return out


class Interrupted(UltracurateError):
    pass


# -- the entry point --------------------------------------------------------------------------
_OPEN_RUNS: set[int] = set()   # runs this process has open (never closed as dead)


def run(ws: Workspace, stage: str | Stage, selection: Selection | None = None, *,
        engine: Any = None, address: str | None = None, workers: int | None = None,
        gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
        force: bool = False, device: str | None = None, batch_size: int | None = None,
        progress: bool = True, dry_run: bool = False, parent_run: int | None = None,
        cat: Catalog | None = None, **options) -> RunSummary:
    """Run a stage (a registered name with its options, or a Stage) over the selection.

    Row stages commit batch by batch and resume where they stopped; set stages apply one plan
    in one transaction (dry_run: the plan's result, nothing written). engine: 'local', 'ray'
    (address, workers, gpus_per_worker, cpus_per_worker; the rest from the workspace's [ray]
    config) or an engine object; device and batch_size for row stages."""
    from .stages import make_stage
    stage = make_stage(stage, options)
    selection = selection or Selection()
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size
                                   or batch_size < 1):
        raise UltracurateError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if dry_run and not isinstance(stage, SetStage):
        raise UltracurateError(f"{stage.name} has no dry run")
    # the engine's settings are refusals too: checked first (nothing connects yet)
    eng = make_engine(engine, address, workers, gpus_per_worker, cpus_per_worker,
                      ws.section("ray"))
    started = time.perf_counter()
    if isinstance(stage, StepsStage):
        summary = _run_steps(ws, stage, selection, parent_run, progress)
        summary.seconds = round(time.perf_counter() - started, 3)
        return summary
    conns = _Catalogs(ws, cat, read_only=dry_run)
    # refusals first, before any run (this one's, or those it requires) is recorded
    with conns.open() as c:
        # the user's predicate first: a refused --where records and runs nothing, not even
        # the stages this one requires (dedup's embedding pass)
        table = getattr(stage, "selects", None) or (
            None if getattr(stage, "items_relation", False) else stage.table)
        if table:
            selection.checked(c.con, VIEWS[table])
        stage.check(Access(c, stage, workspace=ws, force=force), selection)
    # the stages it requires run on the same engine (dedup's embedding pass)
    stage.before = [run(ws, s, engine=engine, address=address, workers=workers,
                        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                        device=device, progress=progress, parent_run=parent_run,
                        cat=cat) for s in stage.requires()] if not dry_run else []
    if isinstance(stage, SetStage):
        summary = _run_set(ws, conns, stage, selection, dry_run, parent_run, device, progress)
    else:
        summary = _run_rows(ws, conns, stage, selection, eng, force, device, batch_size,
                            progress, parent_run)
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.before = stage.before
    return summary


COMMIT_WAIT = 600.0  # seconds a batch's commit waits for other processes' turns (a reader's
                     # long query, another job's set stage) before the job stops


class _Catalogs:
    """How the runner reaches the catalog. Its own (run() without cat): opened for each
    phase (the plan and the pending rows, the batches' commits, the end) and closed in
    between, so that while a batch computes other processes read the catalog and other jobs
    commit theirs; each open waits its turn (catalog.lock_wait). The caller's (cat=...):
    held throughout.

    A batch's commit keeps its connection open LINGER seconds for the next batch's when the
    batches come faster than that, so that a stage whose batches compute in a fraction of a
    second does not pay an open (tens of ms) and the GAP per batch (slower batches close it
    at once; with LINGER at 0.1 s, the tiny editor's generate, whose batches take 0.1 s, ran
    25.7% below its rendering alone, and 14.5% at 0.3 s: bench/generate_overlap.py); a
    connection is never held more than HOLD_MAX seconds in all, and once closed stays closed
    GAP seconds, several of a waiting reader's pauses between tries (catalog._connect).
    Readers waiting for the catalog say so (catalog.readers_waiting): then the connection
    closes after the commit in hand, and the next commit waits (at most READERS_FIRST
    seconds) until they are in."""

    LINGER = 0.3
    HOLD_MAX = 0.5
    GAP = 0.12
    READERS_FIRST = 2.0

    def __init__(self, ws: Workspace, held: Catalog | None = None, read_only: bool = False):
        self.ws, self.held, self.read_only = ws, held, read_only
        self.verified = False
        self._lock = threading.Lock()
        self._cat: Catalog | None = None
        self._opened = self._used = self._closed = 0.0
        self._stop: threading.Event | None = None

    def _connect(self, wait: float | None) -> Catalog:
        # the first open checks (and migrates) the file; the job's later ones skip that
        cat = Catalog(self.ws.catalog_path, read_only=self.read_only, wait=wait,
                      verify=not self.verified)
        self.verified = True
        return cat

    @contextlib.contextmanager
    def open(self, wait: float | None = None) -> Iterator[Catalog]:
        if self.held is not None:
            yield self.held
            return
        self.release()
        cat = self._connect(wait)
        try:
            yield cat
        finally:
            cat.close()

    @contextlib.contextmanager
    def commit(self) -> Iterator[Catalog]:
        """The catalog for one batch's commit (see the class docstring)."""
        if self.held is not None:
            yield self.held
            return
        path = self.ws.catalog_path
        # how long the batch took since the last commit ended: its compute, not our opening
        computed = time.monotonic() - self._used
        with self._lock:
            if self._cat is not None and readers_waiting(path):
                self._close()
            if self._cat is None:
                pause = self.GAP - (time.monotonic() - self._closed)
                if pause > 0:
                    time.sleep(pause)
                until = time.monotonic() + self.READERS_FIRST
                while readers_waiting(path) and time.monotonic() < until:
                    time.sleep(0.01)
                self._cat = self._connect(lock_wait(COMMIT_WAIT))
                self._opened = time.monotonic()
                self._watch()
            try:
                yield self._cat
            except BaseException:
                self._close()
                raise
            self._used = time.monotonic()
            # batches slower than LINGER: the next commit is far off, close now
            if (computed >= self.LINGER or self._used - self._opened >= self.HOLD_MAX
                    or readers_waiting(path)):
                self._close()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Catalog]:
        """The catalog for the job's own work while batches compute (its pending rows' later
        windows, and the plan's): the commits' (see commit), or a cursor of the caller's
        catalog, which the commit thread uses meanwhile."""
        if self.held is not None:
            with self.held.cursor() as cur:
                yield cur
            return
        with self.commit() as cat:
            yield cat

    def _close(self) -> None:  # with self._lock held
        if self._cat is not None:
            self._cat.close()
            self._cat = None
            self._closed = time.monotonic()

    def _watch(self) -> None:
        """A thread that closes the commits' connection once it lingered LINGER unused."""
        if self._stop is not None:
            return
        self._stop = stop = threading.Event()

        def loop():
            while not stop.wait(self.LINGER / 4):
                with self._lock:
                    if self._cat is not None and (
                            time.monotonic() - self._used >= self.LINGER
                            or readers_waiting(self.ws.catalog_path)):
                        self._close()
        threading.Thread(target=loop, name="uc-catalog-linger", daemon=True).start()

    def release(self) -> None:
        """Close the commits' connection and stop its thread."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        with self._lock:
            self._close()


def resume_key(stage: Stage) -> str | None:
    """The digest of the options a row stage's output depends on (RowStage.resume_on)."""
    on = getattr(stage, "resume_on", ())
    if not on:
        return None
    text = json.dumps({k: stage.params.get(k) for k in on}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _start(cat: Catalog, stage: Stage, selection: Selection, models: dict, engine: str,
           parent_run: int | None) -> int:
    # A run still marked running whose process is gone (SIGKILL, power loss) is closed as
    # killed, its batches stand; a live job's (another process's, or this one's) never.
    close_dead(cat, _OPEN_RUNS)
    recorded = getattr(stage, "effective_selection", lambda s: s)(selection)
    run_id = cat.start_run(stage.name, stage.params, recorded.to_json(), models,
                           engine=engine, parent_run=parent_run)
    key = resume_key(stage)
    if key:
        cat.runs.update([{"run_id": run_id, "resume_key": key}])
    _OPEN_RUNS.add(run_id)
    return run_id


def _end(cat: Catalog, run_id: int, state: str, message: str | None = None, **counts) -> None:
    cat.end_run(run_id, state, message, **counts)
    _OPEN_RUNS.discard(run_id)


def _run_rows(ws: Workspace, conns: _Catalogs, stage: RowStage, selection: Selection,
              engine, force: bool, device: str | None, batch_size: int | None,
              progress: bool, parent_run: int | None) -> RunSummary:
    """Plan, materialise the pending rows and record the run (one connection); then compute
    batch by batch with no connection held, connecting only for each batch's commit."""
    ws.media.check()   # one line now, not a failure per row on the workers
    ws.media.clean_tmp()
    remove_dead_files(ws.scratch)
    ctx = Context(str(ws.root), device or default_device(), 0, ws.config, force,
                  show_progress=progress)
    size = ctx.batch_size = batch_size or stage.batch_size
    models = stage.models(ctx) if stage.roles else {}
    items = stage.items()
    with conns.open() as cat:
        if items is not None:
            cat.con.register(ITEMS, items)
        pending = None
        try:
            scoped = selection
            if stage.selects:  # a child selection: the rows of the parent rows the user picks
                pview, pkey = VIEWS[stage.selects], KEYS[stage.selects]
                psql, pparams = selected_keys_sql(cat.con, pview, pkey, selection, None, pkey)
                with cat.transaction():
                    plan = stage.plan(Access(cat, stage, writable=True, workspace=ws),
                                      selection, psql, pparams)
                if plan is not None:
                    stage.params["plan"] = plan
                scoped = Selection(parent=selection, parent_table=stage.selects)
            elif stage.table and not stage.items_relation:
                selection.checked(cat.con, VIEWS[stage.table])
            batched = scoped.narrowed(f"NOT ({stage.set_where})") if stage.set_where else scoped
            pending = Pending.write(stage, cat, batched, force, ws.scratch,
                                    Planner(stage, ws) if stage.plan_left else None)
            with cat.transaction():
                run_id = _start(cat, stage, selection, models,
                                getattr(engine, "name", "local"), parent_run)
                settled = (_apply_set(cat, stage, scoped, force, run_id, ws)
                           if stage.set_where else 0)
                counts = {"rows_done": settled}
                if pending.complete:   # else once its last window is in
                    counts["rows_in"] = pending.n + settled
                cat.runs.update([{"run_id": run_id, **counts}])
        except BaseException as e:
            if pending is not None:
                pending.remove()
            if stage.set_where and locals().get("run_id") is not None:
                # the set-based rows' transaction rolled back with the run: the run is
                # recorded on its own, as a set stage's failure is
                _OPEN_RUNS.discard(run_id)
                stopped = _ctrl_c(e)
                _record_failure(cat, stage, selection, models, parent_run,
                                KeyboardInterrupt() if stopped else e)
                if stopped:
                    raise Interrupted(f"{stage.name} interrupted: nothing changed") from None
            raise
        finally:
            if items is not None:
                cat.con.unregister(ITEMS)
    ctx.run_id = run_id
    pending.fill(conns.reader)   # the rest of its windows, ahead of the batches
    counted = pending.complete   # the run (and the bar) have the total
    done, failed = settled, 0
    bar = JobBar(pending.n, stage.name) if progress else None
    ctx.on_progress = bar
    ctrl_c = _DeferredInterrupt()
    results = batches = None
    # A batch is committed (on its own short connection) on this thread while the engine
    # computes the next one, at most one commit in flight: the model never waits for writes
    # and commits.
    committer = ThreadPoolExecutor(1, thread_name_prefix="uc-commit")
    in_flight: list = []

    def commit(batch, result, rows_in: int | None) -> tuple[int, int]:
        with conns.commit() as cat:
            w = Access(cat, stage, JobRun(run_id), writable=True, workspace=ws, force=force)
            out = _commit_batch(cat, stage, w, batch, result)
            if rows_in is not None:   # the total, known since the last batch
                cat.runs.update([{"run_id": run_id, "rows_in": rows_in}])
            return out

    def settle() -> None:
        nonlocal done, failed
        while in_flight:
            fut, _ = in_flight.pop()
            n_done, n_failed = fut.result()
            done += n_done
            failed += n_failed
    try:
        ctrl_c.install()
        if bar:
            bar.start()
        batches = pending.batches(size, stage.columnar)
        results = (engine.map(stage, batches, ctx, stop=lambda: ctrl_c.requested)
                   if not pending.empty else iter(()))
        for batch, result in results:
            total = None
            if not counted and pending.complete:
                total, counted = pending.n, True
                if bar:
                    bar.set_total(total)
            if bar:   # computed rows (their commit at most one batch behind): the next
                bar.advance(len(batch))   # batch's in-batch progress starts from here
            settle()
            in_flight.append((committer.submit(
                commit, batch, result, None if total is None else total + settled),
                len(batch)))
            if ctrl_c.requested:
                settle()
                raise KeyboardInterrupt
        settle()
        stats = getattr(engine, "stats", None)   # where the replicas ran, what was retried
        with conns.commit() as cat:
            w = Access(cat, stage, JobRun(run_id), writable=True, workspace=ws, force=force)
            with cat.transaction():
                stage.finish(w)
            extra = stage.report(w)
            if "plan" in stage.params and extra.get("plan") not in (None, stage.params["plan"]):
                # planned a window at a time: the run records the whole plan
                stage.params["plan"] = extra["plan"]
                cat.runs.update([{"run_id": run_id,
                                  "params": json.dumps(stage.params, default=str)}])
            if stats:
                cat.runs.update([{"run_id": run_id, "workers": json.dumps(stats)}])
                extra = {**extra, "workers": stats}
                if stats.get("lost"):
                    extra["notes"] = [*extra.get("notes", []), (
                        f"{stats['lost']} Ray replica(s) lost; {stats['retried']} batch(es) "
                        "resubmitted to the others")]
            _end(cat, run_id, "completed", "; ".join(extra.get("notes", [])) or None,
                 rows_in=pending.n + settled)
    except (KeyboardInterrupt, RuntimeError) as e:
        _drain(in_flight)  # a commit under way finishes (or fails) before the run ends
        # DuckDB turns a Ctrl-C during a query into RuntimeError('Query interrupted')
        if isinstance(e, RuntimeError) and not ctrl_c.requested:
            _end_after(conns, run_id, "failed", f"{type(e).__name__}: {e}")
            raise
        _end_after(conns, run_id, "interrupted", "interrupted by the user")
        raise Interrupted(f"{stage.name} interrupted: {done} rows done, {failed} failed; "
                          "rerun the same command to resume") from None
    except BaseException as e:
        _drain(in_flight)
        _end_after(conns, run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        committer.shutdown(wait=True)
        for gen in (results, batches):  # the pending rows' files are read by these
            if hasattr(gen, "close"):
                gen.close()
        pending.remove()   # its filling stops before the connection it borrows goes
        conns.release()
        ctrl_c.restore()
        if bar:
            bar.stop()
    return RunSummary(run_id, stage.name, pending.n + settled, done, failed, "completed",
                      extra)


def _apply_set(cat: Catalog, stage: RowStage, selection: Selection, force: bool,
               run_id: int, ws: Workspace) -> int:
    """The stage's pending rows where its `set_where` holds (the same resumption as its
    batches': pending_sql), applied by `stage.apply_set` and marked done by run_id, in the
    caller's transaction; how many."""
    key = stage.row_key
    sql, params = pending_sql(stage, cat, selection.narrowed(stage.set_where), force)
    columns = stage.set_columns or key
    with cat.materialized(f"SELECT {columns} FROM ({sql}) p", params) as rows:
        n = int(cat.scalar(f"SELECT count(*) FROM {rows}"))
        if n:
            stage.apply_set(Access(cat, stage, JobRun(run_id), writable=True, workspace=ws,
                                   force=force), rows)
            _mark_done(cat, stage.name, f"SELECT {key} AS key FROM {rows}", run_id)
    return n


def _mark_done(cat: Catalog, stage: str, keys: str, run_id: int) -> None:
    """Mark the rows whose keys a query gives done by run_id: the stage's marks they have
    are updated in place, the others inserted (INSERT OR REPLACE through the key's index cost
    twice as much at millions of rows)."""
    at = now()
    q = named_queries("runs")
    cat.con.execute(q["mark_done_update"].format(keys=keys), [run_id, at, stage])
    cat.con.execute(q["mark_done_insert"].format(keys=keys), [stage, run_id, at, stage])


def _end_after(conns: _Catalogs, run_id: int, state: str, message: str) -> None:
    """Close a run that stopped (an error, Ctrl-C). Should the catalog not open in time, the
    run stays marked running until the next job finds its process gone (killed)."""
    try:
        with conns.open(wait=lock_wait()) as cat:
            _end(cat, run_id, state, message)
    except UltracurateError:
        _OPEN_RUNS.discard(run_id)


def _run_set(ws: Workspace, conns: _Catalogs, stage: SetStage, selection: Selection,
             dry_run: bool, parent_run: int | None, device: str | None,
             progress: bool) -> RunSummary:
    ctx = Context(str(ws.root), device or "cpu", 0, ws.config, show_progress=progress)
    models = stage.models(ctx) if stage.roles and not dry_run else {}
    with conns.open() as cat:
        r = Access(cat, stage, workspace=ws)
        if stage.table:
            selection.checked(cat.con, VIEWS[stage.table])
        plan = stage.plan(r, selection)
        if dry_run:
            return RunSummary(None, stage.name, 0, 0, 0, "dry-run", result=stage.preview(plan))
        if not stage.record_empty and stage.empty(plan):
            return RunSummary(None, stage.name, 0, 0, 0, "empty", result=stage.preview(plan))
        if not stage.has_produce:  # the plan, the writes and the run: one transaction
            try:
                with cat.transaction():
                    run_id = _start(cat, stage, selection, models, "local", parent_run)
                    w = Access(cat, stage, JobRun(run_id), writable=True, workspace=ws)
                    result = stage.apply(w, plan, None)
                    _close_set(cat, w.run)
            except BaseException as e:
                _OPEN_RUNS.discard(locals().get("run_id"))
                _record_failure(cat, stage, selection, models, parent_run, e)
                raise
            return _set_summary(stage, w.run, result)
        # produce: the run is recorded first (running); what lies outside the catalog is
        # made with no catalog connection held, then applied in one transaction with the
        # run's end.
        with cat.transaction():
            run_id = _start(cat, stage, selection, models, "local", parent_run)
    ctx.run_id = run_id
    try:
        produced = stage.produce(plan, ctx)
    except BaseException as e:
        stage.failed(plan, e)
        _end_after(conns, run_id, *_failure_state(e))
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{stage.name} interrupted") from None
        raise
    with conns.open(wait=lock_wait(COMMIT_WAIT)) as c:
        try:
            with c.transaction():
                w = Access(c, stage, JobRun(run_id), writable=True, workspace=ws)
                result = stage.apply(w, plan, produced)
                _close_set(c, w.run)
        except BaseException as e:
            stage.failed(plan, e)
            _end(c, run_id, *_failure_state(e))
            raise
    return _set_summary(stage, w.run, result)


def _run_steps(ws: Workspace, stage: StepsStage, selection: Selection,
               parent_run: int | None, progress: bool) -> RunSummary:
    from .recipe import ParentRun
    with ws.catalog() as cat:  # refusals first: nothing recorded
        stage.check(Access(cat, stage, workspace=ws), selection)
    with ParentRun(ws, stage.name, stage.params, 0, parent_run=parent_run,
                   selection=selection) as parent:
        result = stage.steps(ws, selection, parent, progress)
    return RunSummary(parent.run_id, stage.name, parent.done, parent.done, 0, "completed",
                      result=result)


def _ctrl_c(e: BaseException) -> bool:
    """Whether e is a Ctrl-C: Python's, or DuckDB's during a query (it turns SIGINT into
    RuntimeError('Query interrupted'))."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, RuntimeError)
                                                and str(e) == "Query interrupted")


def _failure_state(e: BaseException) -> tuple[str, str]:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", "interrupted by the user"
    return "failed", str(e) if isinstance(e, UltracurateError) else f"{type(e).__name__}: {e}"


def _close_set(cat: Catalog, run: JobRun) -> None:
    _end(cat, run.run_id, "completed", run.message, rows_in=run.rows_in,
         rows_done=run.rows_done, rows_failed=run.rows_failed)


def _set_summary(stage: SetStage, run: JobRun, result) -> RunSummary:
    return RunSummary(run.run_id, stage.name, run.rows_in, run.rows_done, run.rows_failed,
                      "completed", result=result)


def _record_failure(cat: Catalog, stage: Stage, selection: Selection, models: dict,
                    parent_run: int | None, e: BaseException) -> None:
    """A set stage whose one transaction failed (rolled back): its run, recorded on its own."""
    try:
        with cat.transaction():
            run_id = _start(cat, stage, selection, models, "local", parent_run)
            _end(cat, run_id, *_failure_state(e))
    except Exception:
        pass  # never hide the job's own error behind this


class _DeferredInterrupt:
    """The first Ctrl-C asks the job to stop after the batch in hand is committed; a second
    one stops it at once (the batch in hand is rolled back). Only in the main thread."""

    def __init__(self):
        self.requested = 0
        self._old = None

    def install(self) -> None:
        import signal
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested += 1
        if self.requested > 1:
            raise KeyboardInterrupt
        import sys
        print("\nstopping after the current batch (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


# -- selection and resumption: the pending rows -----------------------------------------------
def pending_sql(stage: RowStage, cat: Catalog, selection: Selection, force: bool,
                window: bool = False) -> tuple[str, dict]:
    """SQL for the rows a row stage still has to do, unordered (see `order_sql`): the
    selection (the user's, scoped), numbered when the stage deals over it, without the rows
    the stage finished (unless force), narrowed by the stage's trusted predicate. window:
    only the rows of a key window (selection.key_window, its parameters bound by the
    caller), on both sides of the anti-join."""
    key = stage.row_key
    view = ITEMS if stage.items_relation else VIEWS[stage.table]
    params = dict(stage.sql_params())
    columns = stage.columns + (f", ({stage.group_by}) AS {GROUP}" if stage.group_by else "")
    where = stage.force_where if force and stage.force_where else stage.default_where
    if window:
        where = key_window(stage.table, key) + (f" AND ({where})" if where else "")
    join = None
    if not force and stage.tracks_state:
        # An explicit ANTI JOIN: DuckDB plans it as a hash anti-join before the view's joins
        # (NOT EXISTS became a mark join after them, 3-5x slower at 4M rows).
        done = "SELECT key, run_id FROM stage_state WHERE stage = $_uc_stage AND state = 'done'"
        if window:  # the finished rows of the window alone (not every mark, every window)
            done += " AND key >= $_uc_wlo AND key < $_uc_whi"
        rk = resume_key(stage)
        if rk:
            done = (f"SELECT s.key, s.run_id FROM ({done}) s JOIN runs r ON r.run_id = s.run_id "
                    "AND r.resume_key = $_uc_resume")
            params["_uc_resume"] = rk
        on = f"done.key = sel.{key}"
        if stage.run_column:
            on += f" AND done.run_id = sel.{stage.run_column}"
        join = f"ANTI JOIN ({done}) done ON {on}"
        params["_uc_stage"] = stage.name
    elif not force and stage.recorded:
        queries, name = stage.recorded.split(".")
        join = (f"ANTI JOIN ({named_queries(queries)[name]}) done "
                f"ON done.key = sel.{key}")
    if stage.ordinal_where:  # numbered over the whole selection, before done rows go
        # A running sum of a 0/1 column (numbered_sql): a window aggregate's FILTER
        # clause cost DuckDB time quadratic in the rows (160k anchors: 13 s, 1.6M: tens of
        # minutes), the sums are linear (0.6 s at 160k). A key window's rows are numbered on
        # from the selection's numbered rows below it ($_uc_numbered_before; Pending).
        flagged, p = numbered_sql(stage, cat, selection, window)
        before = "$_uc_numbered_before" if window else "0"
        inner = (f"SELECT *, CASE WHEN _uc_numbered = 1 THEN (sum(_uc_numbered) OVER (ORDER BY "
                 f"{key} ROWS UNBOUNDED PRECEDING))::BIGINT - 1 + {before} END AS {ORDINAL} "
                 f"FROM ({flagged}) flagged")
        columns += f", {ORDINAL}"
        sql = f"SELECT {columns} FROM ({inner}) sel"
        if join:
            sql += f" {join}"
        if where:
            sql += f" WHERE ({where})"
    else:
        sql, p = selected_keys_sql(cat.con, view, key, selection, where, columns, join=join)
    params.update(p)
    if stage.identity:  # the first pending item of each identity
        sql = (f"SELECT * FROM ({sql}) pending QUALIFY row_number() OVER "
               f"(PARTITION BY {stage.identity} ORDER BY {key}) = 1")
    return sql, params


def numbered_sql(stage: RowStage, cat: Catalog, selection: Selection, window: bool = False
                 ) -> tuple[str, dict]:
    """The selection's rows (window: those of a key window) with `_uc_numbered`: 1 where the
    stage's ordinal_where holds, else 0; and the parameters of the selection."""
    view = ITEMS if stage.items_relation else VIEWS[stage.table]
    return selected_keys_sql(
        cat.con, view, stage.row_key, selection,
        key_window(stage.table, stage.row_key) if window else None,
        f"*, coalesce(({stage.ordinal_where})::INTEGER, 0) AS _uc_numbered")


def numbered_count_sql(stage: RowStage, cat: Catalog, selection: Selection
                       ) -> tuple[str, dict]:
    """How many of a key window's rows of the selection (its parameters bound by the caller)
    the stage numbers, and the parameters it names."""
    sql, params = numbered_sql(stage, cat, selection, window=True)
    sql = f"SELECT coalesce(sum(_uc_numbered), 0) FROM ({sql}) n"
    return sql, _used(sql, {**stage.sql_params(), **params})


def _used(sql: str, params: dict) -> dict:
    """The parameters a statement names (DuckDB refuses any other)."""
    import duckdb
    names = set(duckdb.extract_statements(sql)[0].named_parameters)
    return {k: v for k, v in params.items() if k in names}


def order_sql(stage: RowStage) -> str:
    """The batch order: the stage's (or the key), with a group's rows kept together."""
    order = stage.order_by or stage.row_key
    return f" ORDER BY {GROUP} NULLS LAST, {order}" if stage.group_by else f" ORDER BY {order}"


class Pending:
    """A job's pending rows, materialised as Parquet files under the workspace's tmp/ (named
    by the job's process, so that a killed job's files are removed by the next job), in batch
    order, with the columns the stage needs. The job then holds no catalog cursor while it
    runs, and one over 41M rows never holds them all in memory.

    A stage in key order (no groups or order of its own, over catalog rows, no --limit/--sample)
    gets them a key window at a time: a window is the pending rows whose key lies in a range,
    sorted on their own, and windows follow each other up the keys, so together they are in key
    order (a stage whose order only gathers a batch's rows, `order_in_windows`: each window in
    its order). A stage that numbers the selection's rows (`ordinal_where`) has each window
    numbered on from the count of the windows before it. The first window is small (FIRST rows),
    and the job starts as soon as a window holds a row, so that the first batch starts within a
    second however large the selection; the rest are materialised ahead on a thread while
    batches compute (`fill`), each on the job's short connection between commits, their ranges
    sized from the rows the last window found (up to MAX rows, a fraction of a second's hold at
    4.1M). The total is known once the last window is in (`n`; None before). Rows a batch
    finishes lie in windows already read, so no row comes twice; rows added after the job
    started have keys above its last window (sequences). A stage whose groups are a whole-number
    column of its table (generate's model calls, `gen_call`) gets windows over that column
    instead, each sorted by group then key (a group never straddles two windows), then the rows
    without a group. Every window also narrows the keys (and the keys of the tables the view
    joins) to those of its rows, so no scan reads the whole table (`selection.key_window`).
    Other stages (an order of their own over the whole selection, --limit/--sample) get one
    sorted file at the start, as do outside items.

    A stage whose plan is planned a window at a time (a Planner: generate's candidates)
    plans its next window whenever the windows read so far hold every group planned: the new
    rows' groups lie above them. The rows without a group come once the plan is done."""

    CHUNK = 8192        # rows read from DuckDB (and from a file) at a time
    FIRST = 16_384      # rows the first window(s) aim at
    MAX = 1_048_576     # rows a window aims at, at most

    def __init__(self, folder: Path, sql: str = "", params: dict | None = None,
                 key: str = "", table: str = "", bounds: tuple[int, int] | None = None,
                 span: int = 1, group: str | None = None, planner: "Planner | None" = None,
                 order: str | None = None):
        self.folder, self.sql, self.params = folder, sql, params or {}
        self.planner = planner
        self.order = order or key     # a window's order (without groups)
        # numbering: the SQL counting a window's numbered rows of the selection, its params
        self.numbered: tuple[str, dict] | None = None
        self.key, self.table = key, table
        # windows over the key, or over a group column of the table (the batch order is the
        # group's, then the key): the groups in windows, then the rows without a group (last:
        # at the start, they would cost a pass over every row that never had a group)
        self.group = group
        self.ungrouped_left = group is not None
        self.files: list[Path] = []
        self.counts: list[int] = []
        self.next, self.hi = (bounds or (0, -1))
        self.span, self.target = span, self.FIRST
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- making it
    @classmethod
    def write(cls, stage: RowStage, cat: Catalog, selection: Selection, force: bool,
              folder: Path, planner: "Planner | None" = None) -> "Pending":
        """The pending rows: all of them, or (windows) those up to the first window holding
        any (or all, if none does).
        planner: the rest of the stage's plan, planned as the windows need it (in windows
        over its groups; otherwise all of it now)."""
        folder.mkdir(parents=True, exist_ok=True)
        key = stage.row_key
        group = (stage.group_by if stage.group_by and stage.order_by is None
                 and not stage.items_relation
                 and _integer_column(cat, stage.table, stage.group_by) else None)
        windowed = (not stage.items_relation
                    and not stage.identity and not top_n(selection)
                    and (group is not None or (not stage.group_by and (
                        stage.order_by in (None, key) or stage.order_in_windows))))
        bounds = None
        col = group or key
        planned = windowed and group is not None and planner is not None
        if windowed:  # the column's range and density in the stage's table (it alone)
            found = key_bounds(cat.con, stage.table, col)
            if found is None and planned:   # nothing planned yet: the planner's windows will
                found = (1, 0, 0)
            windowed = found is not None
            if windowed:
                lo, hi, n = found
                bounds = (lo, hi)
        while planner is not None and not planned and planner.left:
            planner.step(cat)   # rows in one sorted read: the whole plan first
        sql, params = pending_sql(stage, cat, selection, force, window=windowed)
        if not windowed:
            pending = cls(folder)
            pending._write(cat.con, sql + order_sql(stage), params)
            pending.next = 1   # nothing left to read
            return pending
        span = max(1, -(-(hi - lo + 1) * cls.FIRST // max(n, 1)))
        pending = cls(folder, sql, params, key, stage.table, bounds, span, group,
                      planner if planned else None, stage.order_by)
        if stage.ordinal_where:   # numbered a window at a time, on from the windows before
            pending.numbered = numbered_count_sql(stage, cat, selection)
            pending.params = {**pending.params, "_uc_numbered_before": 0}
        try:   # the job starts with the first window holding rows: the rest are read meanwhile
            while not pending.complete and not pending.known:
                pending._window(cat)
        except BaseException:
            pending.remove()
            raise
        return pending

    def _write(self, con, sql: str, params: dict) -> int:
        import pyarrow.parquet as pq
        path = self.folder / f"{procs.tag()}~pending-{uuid.uuid4().hex[:12]}.parquet"
        reader = con.sql(sql, params=params).to_arrow_reader(self.CHUNK)
        n = 0
        try:
            with pq.ParquetWriter(path, reader.schema) as out:
                for rb in reader:
                    out.write_batch(rb)
                    n += rb.num_rows
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        with self._cond:
            if n:
                self.files.append(path)
                self.counts.append(n)
            else:
                path.unlink(missing_ok=True)
            self._cond.notify_all()
        return n

    def _window(self, cat: Catalog) -> None:
        """Read the next window (past the groups read: the planner's next window, then the
        rows without a group); size the one after it from the rows this one found."""
        if self.next > self.hi and self.planner is not None and self.planner.left:
            first, added = self.planner.step(cat)
            with self._cond:
                if added:   # its groups: from the first row it added on (a group per row
                    # at most: windows of up to `added` keys)
                    self.next, self.hi = max(self.next, first), first + added - 1
                    self.span = max(self.span, min(added, self.target))
                self._cond.notify_all()
            return
        con = cat.con
        ungrouped = self.next > self.hi
        lo, hi = self.next, min(self.next + self.span, self.hi + 1)
        sql, keys = self.sql, (lo, hi)
        if self.group is not None:   # the keys of the window's rows, from its groups'
            inside = (f"{self.group} IS NULL" if ungrouped
                      else f"{self.group} >= {lo} AND {self.group} < {hi}")
            sql = f"SELECT * FROM ({sql}) pending WHERE {GROUP} " + (
                "IS NULL" if ungrouped else f">= {lo} AND {GROUP} < {hi}")
            first, last = con.execute(f"SELECT min({self.key}), max({self.key}) "
                                      f"FROM {self.table} WHERE {inside}").fetchall()[0]
            keys = (first, last + 1) if first is not None else None
        n = 0
        if keys is not None:
            window = key_window_params(con, self.table, self.key, *keys)
            order = f"{GROUP}, {self.key}" if self.group and not ungrouped else self.order
            n = self._write(con, f"{sql} ORDER BY {order}", {**self.params, **window})
            if self.numbered is not None:   # the next window numbers on from this one's
                count_sql, count_params = self.numbered
                self.params["_uc_numbered_before"] += con.execute(
                    count_sql, {**count_params, **window}).fetchall()[0][0]
        if ungrouped:
            with self._cond:
                self.ungrouped_left = False
                self._cond.notify_all()
            return
        self.target = min(self.target * 2, self.MAX)
        # as many keys as should hold `target` rows at this window's density: at most 4x
        # the last (a stretch of finished rows), at least half
        want = self.span * 4 if not n else self.span * self.target // n
        self.span = max(1, min(self.span * 4, max(self.span // 2, want)))
        with self._cond:
            self.next = hi
            self._cond.notify_all()

    def fill(self, reader: Callable[[], Any]) -> None:
        """Materialise the rest on a thread, each window on the catalog `reader()` lends (a
        context manager giving a Catalog)."""
        if self.complete:
            return

        def loop():
            try:
                while not self.complete and not self._stop:
                    with reader() as cat:
                        self._window(cat)
            except BaseException as e:  # the batches reaching the missing window raise it
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
        self._thread = threading.Thread(target=loop, name="uc-pending", daemon=True)
        self._thread.start()

    # -- what it holds
    @property
    def complete(self) -> bool:
        return (self.next > self.hi and not self.ungrouped_left
                and (self.planner is None or not self.planner.left))

    @property
    def known(self) -> int:
        """Rows materialised so far."""
        return sum(self.counts)

    @property
    def n(self) -> int | None:
        """How many rows are pending (None until the last window is in)."""
        return self.known if self.complete else None

    @property
    def empty(self) -> bool:
        return self.complete and not self.known

    # -- reading it
    def rows(self) -> Iterator[dict]:
        for rb in self.record_batches():
            yield from rb.to_pylist()

    def batches(self, size: int, columnar: bool = False) -> Iterator:
        """Lists of row dicts in whole groups, or (a columnar stage) pyarrow Tables."""
        if columnar:
            return table_batches(self.record_batches(), size)
        return whole_groups(self.rows(), size)

    def record_batches(self) -> Iterator:
        import pyarrow.parquet as pq
        i = 0
        while True:
            with self._cond:
                while i >= len(self.files) and not self.complete and self.error is None:
                    if self._thread is None:   # nobody fills it: a caller's mistake
                        raise RuntimeError("pending rows beyond the first window need fill()")
                    self._cond.wait(1.0)
                if i >= len(self.files):
                    if self.error is not None and not self.complete:
                        raise self.error
                    return
                path = self.files[i]
            with pq.ParquetFile(path) as f:
                yield from f.iter_batches(batch_size=self.CHUNK)
            path.unlink(missing_ok=True)   # read: its disk goes now
            i += 1

    def remove(self) -> None:
        """Stop the filling (after the window in hand) and remove the files."""
        self._stop = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for path in self.files:
            path.unlink(missing_ok=True)


class Planner:
    """The rest of a stage's plan (RowStage.plan_left / plan_next), each window planned in a
    transaction of its own on the catalog it is given."""

    def __init__(self, stage: RowStage, ws: Workspace | None = None):
        self.stage, self.ws = stage, ws

    @property
    def left(self) -> bool:
        return self.stage.plan_left

    def step(self, cat: Catalog) -> tuple[int, int]:
        with cat.transaction():
            return self.stage.plan_next(Access(cat, self.stage, writable=True,
                                               workspace=self.ws))


def _integer_column(cat: Catalog, table: str, expr: str) -> bool:
    """Whether expr is a whole-number column of table (a group to read in windows)."""
    types = {c.lower(): t for c, t in cat.declared_types(table).items()}
    return types.get(expr.strip().lower(), "") in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT",
                                                   "UTINYINT", "USMALLINT", "UINTEGER",
                                                   "UBIGINT", "HUGEINT")


def pending_batches(stage: RowStage, cat: Catalog, selection: Selection, force: bool,
                    size: int, folder: Path) -> tuple[int | None, Iterator[list[dict]]]:
    """How many rows are pending (None: not known yet), and their batches (see Pending; the
    files go as they are read, and when the batches are exhausted or closed). Later windows
    are read on a cursor of cat's connection."""
    pending = Pending.write(stage, cat, selection, force, folder,
                            Planner(stage) if stage.plan_left else None)
    pending.fill(cat.cursor)

    def batches():
        try:
            yield from pending.batches(size, stage.columnar)
        finally:
            pending.remove()
    return pending.n, batches()


def table_batches(record_batches, size: int) -> Iterator:
    """pyarrow Tables of `size` rows (the last one shorter) from a stream of record batches."""
    import pyarrow as pa
    held: list = []
    n_held = 0
    try:
        for rb in record_batches:
            held.append(rb)
            n_held += rb.num_rows
            while n_held >= size:
                table = pa.Table.from_batches(held)
                yield table.slice(0, size).combine_chunks()
                rest = table.slice(size)
                held, n_held = rest.to_batches(), rest.num_rows
        if n_held:
            yield pa.Table.from_batches(held).combine_chunks()
    finally:
        if hasattr(record_batches, "close"):
            record_batches.close()


def whole_groups(rows, size: int) -> Iterator[list[dict]]:
    """Batches of `size` rows that never split a group (consecutive rows with the same
    non-None row[GROUP]): a batch takes whole groups while they fit, and a group larger than
    size is a batch of its own. Without groups, plain batches of size."""
    batch: list[dict] = []
    try:
        for group in _groups(rows):
            if batch and len(batch) + len(group) > size:
                yield batch
                batch = []
            batch.extend(group)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        if hasattr(rows, "close"):   # the pending rows' file is open
            rows.close()


def _groups(rows) -> Iterator[list[dict]]:
    group: list[dict] = []
    for row in rows:
        key = row.get(GROUP)
        if group and (key is None or key != group[-1].get(GROUP)):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _drain(in_flight: list) -> None:
    """Wait for a commit under way; its error (if any) is not this one's cause."""
    while in_flight:
        fut, _ = in_flight.pop()
        try:
            fut.result()
        except BaseException:
            pass


def _commit_batch(cat: Catalog, stage: RowStage, w: Access, batch: list[dict],
                  result: BatchResult | BaseException) -> tuple[int, int]:
    """One batch's completion (BatchResult.complete), then its writes, its rows' marks and
    its run's counters, in one transaction."""
    keys = stage.keys_of(batch)
    if not isinstance(result, BaseException):
        try:
            result = result.completed()
        except Exception as e:  # e.g. its media could not be written: the batch fails
            result = e
    if isinstance(result, BaseException):  # the whole batch failed: every row, with the error
        err = reason_text(result, typed=True)
        result = BatchResult(failed={k: err for k in keys})
    with cat.transaction():
        stage.write(w, result)
        n_failed = sum(1 for k in keys if k in result.failed)
        if stage.tracks_state:  # as columns: a batch may hold tens of thousands of rows
            import pyarrow as pa
            f = result.failed
            n = len(keys)
            cat.stage_state.insert(pa.table({
                "stage": [stage.name] * n, "key": keys,
                "state": ["failed" if k in f else "done" for k in keys] if f else ["done"] * n,
                "error": [reason_text(f[k]) if f.get(k) else None for k in keys] if f
                else pa.nulls(n, pa.string()),
                "run_id": [w.run_id] * n, "updated_at": [now()] * n}), replace=True)
        n_done = len(keys) - n_failed
        cat.con.execute(named_queries("runs")["count_batch"],
                        [n_done, n_failed, now(), w.run_id])
    return n_done, n_failed


def default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
