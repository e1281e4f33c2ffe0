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
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .catalog import KEYS, VIEWS, Catalog, JobRun, UndeclaredWrite, named_queries, now
from .errors import UltracurateError, reason_text
from .progress import JobBar
from .selection import Selection, selected_keys_sql
from .workspace import Workspace


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
        return Workspace(self.workspace_root)

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
ORDINALS = "_uc_ordinals"  # how many rows of the selection are numbered
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

    def insert_from(self, sql, params, columns) -> None:
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
    # A stage whose work is arithmetic over columns gets each batch as a pyarrow Table
    # instead of a list of dicts (no Python object per row; no groups, numbering or order
    # of its own): classify-masks over millions of stored mask features.
    columnar: bool = False
    # Resumption, all done by the runner. A row is finished once stage_state marks it done...
    resume_on: tuple[str, ...] = ()   # ...by a run with the same values of these options
    run_column: str | None = None     # ...and the row still carries that run in this column
    # A trusted predicate: the runner numbers the selected rows where it holds, in key order,
    # over the whole selection before finished rows are left out, and hands each row its
    # number (row[ORDINAL]) and the count (row[ORDINALS]); a stage that deals work out over
    # the selection (instruct's edit types) deals the same on a rerun.
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
        what runs.params records as `plan`."""
        return None

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

    def map(self, stage: RowStage, batches, ctx: Context
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
    """One stage replica per Ray actor (one per GPU when there are GPUs), fed batches through
    an ActorPool; results stream back to the driver, which alone writes the catalog. Media is
    written by the workers into the workspace's media store, a path every node must see."""

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None,
                 num_gpus_per_worker: float | None = None):
        self.address = address
        self.num_workers = num_workers
        self.num_gpus_per_worker = num_gpus_per_worker

    def map(self, stage: RowStage, batches, ctx: Context):
        import ray
        from ray.util import ActorPool

        started = False
        if not ray.is_initialized():
            if self.address in (None, "local"):
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            else:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            started = True
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            per = self.num_gpus_per_worker if self.num_gpus_per_worker is not None else (
                1 if gpus else 0)
            n = self.num_workers or (int(gpus // per) if per else 1) or 1
            worker_ctx = Context(ctx.workspace_root, "cuda" if per else "cpu", ctx.run_id,
                                 ctx.config, ctx.force, ctx.batch_size)
            Actor = ray.remote(num_gpus=per, num_cpus=1)(_StageActor)
            actors = [Actor.remote(stage, worker_ctx) for _ in range(n)]
            pool = ActorPool(actors)
            it = iter(batches)

            def submit(k):  # keep at most 2 batches per worker in flight
                for batch in _take(it, k):
                    pool.submit(lambda a, b: a.run.remote(b), batch)
            submit(2 * n)
            while pool.has_next():
                submit(1)
                try:
                    batch, result = pool.get_next()
                except ray.exceptions.RayError as e:
                    # A worker died (or could not start): its batches cannot be told apart,
                    # so stop; what committed stays and a rerun resumes the rest.
                    first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise UltracurateError(f"Ray worker failed: {first}") from None
                yield batch, result
        finally:
            if started:
                ray.shutdown()


class _StageActor:
    def __init__(self, stage: RowStage, ctx: Context):
        self.stage, self.ctx = stage, ctx
        stage.setup(ctx)

    def run(self, batch):
        try:  # completed here: what travels back to the driver is plain rows
            return batch, self.stage.process(batch, self.stage.prepare(batch, self.ctx),
                                             self.ctx).completed()
        except Exception as e:
            return batch, RuntimeError(f"{type(e).__name__}: {e}")


ENGINES = ("local", "ray")


def make_engine(engine: Any = None, address: str | None = None, workers: int | None = None):
    """An engine from its name (local, ray) or as given."""
    if engine is None or engine == "local":
        return LocalEngine()
    if engine == "ray":
        return RayEngine(address=address, num_workers=workers)
    if isinstance(engine, str):
        raise UltracurateError(f"unknown engine '{engine}' (local or ray)")
    return engine


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
        force: bool = False, device: str | None = None, batch_size: int | None = None,
        progress: bool = True, dry_run: bool = False, parent_run: int | None = None,
        cat: Catalog | None = None, **options) -> RunSummary:
    """Run a stage (a registered name with its options, or a Stage) over the selection.

    Row stages commit batch by batch and resume where they stopped; set stages apply one plan
    in one transaction (dry_run: the plan's result, nothing written). engine: 'local', 'ray'
    (address, workers) or an engine object; device and batch_size for row stages."""
    from .stages import make_stage
    stage = make_stage(stage, options)
    selection = selection or Selection()
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size
                                   or batch_size < 1):
        raise UltracurateError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if dry_run and not isinstance(stage, SetStage):
        raise UltracurateError(f"{stage.name} has no dry run")
    started = time.perf_counter()
    if isinstance(stage, StepsStage):
        summary = _run_steps(ws, stage, selection, parent_run, progress)
        summary.seconds = round(time.perf_counter() - started, 3)
        return summary
    own = cat is None
    cat = cat or ws.catalog(read_only=dry_run)
    try:
        # refusals first, before any run (this one's, or those it requires) is recorded
        stage.check(Access(cat, stage, workspace=ws, force=force), selection)
        stage.before = [run(ws, s, device=device, progress=progress, parent_run=parent_run,
                            cat=cat) for s in stage.requires()] if not dry_run else []
        if isinstance(stage, SetStage):
            summary = _run_set(ws, cat, stage, selection, dry_run, parent_run, device,
                               progress, own)
        else:
            summary = _run_rows(ws, cat, stage, selection, make_engine(engine, address, workers),
                                force, device, batch_size, progress, parent_run)
    finally:
        if own:
            cat.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.before = stage.before
    return summary


def resume_key(stage: Stage) -> str | None:
    """The digest of the options a row stage's output depends on (RowStage.resume_on)."""
    on = getattr(stage, "resume_on", ())
    if not on:
        return None
    text = json.dumps({k: stage.params.get(k) for k in on}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _start(cat: Catalog, stage: Stage, selection: Selection, models: dict, engine: str,
           parent_run: int | None) -> int:
    # We hold the catalog's write lock, so a run still marked running (and not one this
    # process holds open) has died (SIGKILL, power loss): close it, its batches stand.
    cat.con.execute(named_queries("runs")["close_dead"], [sorted(_OPEN_RUNS) or [-1]])
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


def _run_rows(ws: Workspace, cat: Catalog, stage: RowStage, selection: Selection, engine,
              force: bool, device: str | None, batch_size: int | None, progress: bool,
              parent_run: int | None) -> RunSummary:
    ws.media.clean_tmp()
    ctx = Context(str(ws.root), device or default_device(), 0, ws.config, force,
                  show_progress=progress)
    items = stage.items()
    if items is not None:
        cat.con.register(ITEMS, items)
    try:
        scoped = selection
        if stage.selects:  # a child selection: the rows of the parent rows the user picks
            pview, pkey = VIEWS[stage.selects], KEYS[stage.selects]
            psql, pparams = selected_keys_sql(cat.con, pview, pkey, selection, None, pkey)
            with cat.transaction():
                plan = stage.plan(Access(cat, stage, writable=True, workspace=ws), selection,
                                  psql, pparams)
            if plan is not None:
                stage.params["plan"] = plan
            scoped = Selection(parent=selection, parent_table=stage.selects)
        elif stage.table and not stage.items_relation:
            selection.checked(cat.con, VIEWS[stage.table])
        size = ctx.batch_size = batch_size or stage.batch_size
        n_rows, batches = pending_batches(stage, cat, scoped, force, size, items)
        models = stage.models(ctx) if stage.roles else {}
        run_id = _start(cat, stage, selection, models, getattr(engine, "name", "local"),
                        parent_run)
        ctx.run_id = run_id
        cat.runs.update([{"run_id": run_id, "rows_in": n_rows}])
        done = failed = 0
        state = "completed"
        bar = JobBar(n_rows, stage.name) if progress else None
        ctx.on_progress = bar
        ctrl_c = _DeferredInterrupt()
        w = Access(cat, stage, JobRun(run_id), writable=True, workspace=ws, force=force)
        results = None
        # A batch is committed on this thread while the engine computes the next one (at
        # most one commit in flight): the model never waits for writes and commits.
        committer = ThreadPoolExecutor(1, thread_name_prefix="uc-commit")
        in_flight: list = []

        def settle() -> None:
            nonlocal done, failed
            while in_flight:
                fut, n = in_flight.pop()
                n_done, n_failed = fut.result()
                done += n_done
                failed += n_failed
                if bar:
                    bar.advance(n)
        try:
            ctrl_c.install()
            if bar:
                bar.start()
            results = engine.map(stage, batches, ctx) if n_rows else iter(())
            for batch, result in results:
                settle()
                in_flight.append((committer.submit(_commit_batch, cat, stage, w, batch,
                                                   result), len(batch)))
                if ctrl_c.requested:
                    settle()
                    raise KeyboardInterrupt
            settle()
            with cat.transaction():
                stage.finish(w)
            extra = stage.report(w)
        except (KeyboardInterrupt, RuntimeError) as e:
            _drain(in_flight)  # a commit under way finishes (or fails) before the run ends
            # DuckDB turns a Ctrl-C during a query into RuntimeError('Query interrupted')
            if isinstance(e, RuntimeError) and not ctrl_c.requested:
                _end(cat, run_id, "failed", f"{type(e).__name__}: {e}")
                raise
            state = "interrupted"
            _end(cat, run_id, state, "interrupted by the user")
            raise Interrupted(f"{stage.name} interrupted: {done} rows done, {failed} failed; "
                              "rerun the same command to resume") from None
        except BaseException as e:
            _drain(in_flight)
            _end(cat, run_id, "failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            committer.shutdown(wait=True)
            ctrl_c.restore()
            # close the generators now: the selection stream holds a DuckDB cursor
            for gen in (results, batches):
                if hasattr(gen, "close"):
                    gen.close()
            if bar:
                bar.stop()
        _end(cat, run_id, state, "; ".join(extra.get("notes", [])) or None)
        return RunSummary(run_id, stage.name, n_rows, done, failed, state, extra)
    finally:
        if items is not None:
            cat.con.unregister(ITEMS)


def _run_set(ws: Workspace, cat: Catalog, stage: SetStage, selection: Selection,
             dry_run: bool, parent_run: int | None, device: str | None, progress: bool,
             own: bool) -> RunSummary:
    r = Access(cat, stage, workspace=ws)
    if stage.table:
        selection.checked(cat.con, VIEWS[stage.table])
    plan = stage.plan(r, selection)
    if dry_run:
        return RunSummary(None, stage.name, 0, 0, 0, "dry-run", result=stage.preview(plan))
    if not stage.record_empty and stage.empty(plan):
        return RunSummary(None, stage.name, 0, 0, 0, "empty", result=stage.preview(plan))
    ctx = Context(str(ws.root), device or "cpu", 0, ws.config, show_progress=progress)
    models = stage.models(ctx) if stage.roles else {}
    if not stage.has_produce:
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
    # produce: the run is recorded first (running); what lies outside the catalog is made
    # with no catalog connection held, then applied in one transaction with the run's end.
    with cat.transaction():
        run_id = _start(cat, stage, selection, models, "local", parent_run)
    ctx.run_id = run_id
    if own:
        cat.close()
    try:
        produced = stage.produce(plan, ctx)
    except BaseException as e:
        stage.failed(plan, e)
        with _reopened(ws, cat, own) as c:
            _end(c, run_id, *_failure_state(e))
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{stage.name} interrupted") from None
        raise
    with _reopened(ws, cat, own) as c:
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


class _reopened:
    """The catalog again after produce (the runner's own connection was closed meanwhile): a
    writer holding it now is waited for a little."""

    def __init__(self, ws: Workspace, cat: Catalog, own: bool, wait: float = 10.0):
        self.ws, self.cat, self.own, self.wait = ws, cat, own, wait

    def __enter__(self) -> Catalog:
        if not self.own:
            return self.cat
        from .errors import CatalogBusyError
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.c = self.ws.catalog()
                return self.c
            except CatalogBusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.own:
            self.c.close()


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
def pending_sql(stage: RowStage, cat: Catalog, selection: Selection, force: bool
                ) -> tuple[str, dict]:
    """SQL for the rows a row stage still has to do, unordered (see `order_sql`): the
    selection (the user's, scoped), numbered when the stage deals over it, without the rows
    the stage finished (unless force), narrowed by the stage's trusted predicate."""
    key = stage.row_key
    view = ITEMS if stage.items_relation else VIEWS[stage.table]
    params = dict(stage.sql_params())
    columns = stage.columns + (f", ({stage.group_by}) AS {GROUP}" if stage.group_by else "")
    where = stage.force_where if force and stage.force_where else stage.default_where
    join = None
    if not force and stage.tracks_state:
        # An explicit ANTI JOIN: DuckDB plans it as a hash anti-join before the view's joins
        # (NOT EXISTS became a mark join after them, 3-5x slower at 4M rows).
        done = "SELECT key, run_id FROM stage_state WHERE stage = $_uc_stage AND state = 'done'"
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
        numbered = (f"*, CASE WHEN ({stage.ordinal_where}) THEN count(*) FILTER "
                    f"(WHERE {stage.ordinal_where}) OVER (ORDER BY {key} ROWS UNBOUNDED "
                    f"PRECEDING) - 1 END AS {ORDINAL}, count(*) FILTER "
                    f"(WHERE {stage.ordinal_where}) OVER () AS {ORDINALS}")
        inner, p = selected_keys_sql(cat.con, view, key, selection, None, numbered)
        columns += f", {ORDINAL}, {ORDINALS}"
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


def order_sql(stage: RowStage) -> str:
    """The batch order: the stage's (or the key), with a group's rows kept together."""
    order = stage.order_by or stage.row_key
    return f" ORDER BY {GROUP} NULLS FIRST, {order}" if stage.group_by else f" ORDER BY {order}"


# Key-ordered stages read their pending rows a key range at a time: the first range is
# small, so that the first batch starts without sorting every pending row; ranges double in
# rows up to the last size (bench/scale.py).
FIRST_RANGE_ROWS = 16_384
MAX_RANGE_ROWS = 1_048_576


def pending_batches(stage: RowStage, cat: Catalog, selection: Selection, force: bool,
                    size: int, items=None) -> tuple[int, Iterator[list[dict]]]:
    """How many rows are pending, and their batches, streamed from DuckDB (a second cursor),
    so a job over 41M rows never holds them all in Python. A stage in key order reads them
    a key range at a time (each range sorted on its own, its first one small); one whose
    batches follow groups, numbering or its own order gets one sorted stream."""
    sql, params = pending_sql(stage, cat, selection, force)
    key = stage.row_key
    by_range = (items is None and not (stage.group_by or stage.ordinal_where or stage.identity)
                and stage.order_by in (None, key))
    if by_range:
        n, lo, hi = cat.con.execute(f"SELECT count(*), min({key}), max({key}) "
                                    f"FROM ({sql}) counted", params).fetchone()
        n = int(n)
    else:
        n = int(cat.scalar(f"SELECT count(*) FROM ({sql}) counted", params))

    def ranges() -> Iterator[str]:
        # Each range is its own query, after the batches before it committed: rows of this
        # run lie in earlier ranges, so none comes twice.
        start, rows = int(lo), FIRST_RANGE_ROWS
        while start <= hi:
            end = start + max(1, int((hi - lo + 1) * rows / n))
            yield (f"SELECT * FROM ({sql}) pending WHERE {key} >= {start} AND {key} < {end} "
                   f"ORDER BY {key}")
            start, rows = end, min(rows * 2, MAX_RANGE_ROWS)

    def stream() -> Iterator:
        cur = cat.con.cursor()
        try:
            if items is not None:  # a cursor does not see its connection's registrations
                cur.register(ITEMS, items)
            for query in (ranges() if by_range else [sql + order_sql(stage)]):
                reader = cur.sql(query, params=params).to_arrow_reader(max(size, 2048))
                for rb in reader:
                    if stage.columnar:
                        yield rb
                    else:
                        yield from rb.to_pylist()
        finally:
            cur.close()
    if stage.columnar:
        if not by_range:
            raise ValueError(f"stage {stage.name}: a columnar stage has no groups, numbering "
                             "or order of its own")
        return n, table_batches(stream() if n else iter(()), size)
    return n, whole_groups(stream() if n else iter(()), size)


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
        if hasattr(rows, "close"):   # the selection stream holds a DuckDB cursor
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
        cat.con.execute(named_queries("runs")["count_batch"], [n_done, n_failed, w.run_id])
    return n_done, n_failed


def default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
