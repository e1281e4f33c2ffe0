"""The stage runner: one contract for every stage, and the loop that owns batching, device
placement, per-batch transactions, done/failed marks, resumption, progress and Ctrl-C.

A stage says which rows it needs (its view and default predicate, narrowed by the user's
--where), what it computes for a batch (`process`, which may run in another process or on a
Ray worker and never touches the catalog), and which columns it writes. The driver is the only
writer to the catalog: each batch's results, its rows' stage_state marks and the run's counters
are committed in one transaction, so a job killed at any point and rerun skips what committed
and redoes the rest, with nothing lost and nothing twice.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import polars as pl

from .catalog import KEYS, VIEWS, Catalog
from .errors import UltracurateError, reason_text
from .progress import JobBar
from .selection import Selection, selected_keys_sql
from .workspace import Workspace


@dataclass
class Context:
    """What a stage's `setup`/`prepare`/`process` may use. Picklable (no catalog handle)."""

    workspace_root: str
    device: str = "cpu"
    run_id: int = 0
    config: dict = field(default_factory=dict)
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
    """What `process` returns for one batch. `updates`/`inserts` map a table to a polars
    DataFrame (updates keyed by the table's key column); `failed` maps a row key to its error.
    Keys of the batch neither failed nor listed are marked done."""

    updates: dict[str, pl.DataFrame] = field(default_factory=dict)
    inserts: dict[str, pl.DataFrame] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific, for write()


_STAGES: dict[str, type] = {}
GROUP = "_uc_group"   # the row key holding a row's group (see Stage.group_by)


def stages_over(table: str) -> list[str]:
    """Names of the stages (imported so far) that run over table's rows."""
    from . import stages  # noqa: F401  (stage modules register on import)
    return sorted(n for n, cls in _STAGES.items() if cls.table == table)


class Stage:
    """Base class of every stage. Subclasses set the class attributes and `process`."""

    name: str = ""
    table: str = "edits"            # anchors | edits | candidates: the rows it runs over
    default_where: str | None = None  # trusted predicate over VIEWS[table]
    columns: str = "*"              # what a batch needs from the view
    writes: dict[str, set[str]] = {}  # table -> columns it may set
    batch_size: int = 16
    roles: tuple[str, ...] = ()     # model roles it loads (recorded in runs.models)
    track_state: bool = True        # record done/failed per row in stage_state
    # A trusted SQL expression over the view: rows with the same non-NULL value form a group
    # that no batch splits (NULL: a row on its own). The runner hands it to the stage as
    # row[GROUP], keeps a group's rows together in the batch order, and fills a batch with
    # whole groups (a group larger than the batch size is a batch of its own).
    group_by: str | None = None

    def __init__(self, **params):
        self.params = params

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            _STAGES[cls.name] = cls

    # -- run on the driver ----------------------------------------------------------------
    def items_sql(self, cat: Catalog, selection: Selection, force: bool) -> tuple[str, dict]:
        """SQL for the rows still to do: the selection, narrowed by default_where, without rows
        this stage already finished (unless force). Unordered; see `order_by`."""
        view, key = VIEWS[self.table], KEYS[self.table]
        skip_done = self.track_state and not force
        # An explicit ANTI JOIN: DuckDB plans it as a hash anti-join before the view's joins
        # (NOT EXISTS became a mark join after them, 3-5x slower at 4M rows).
        join = (f"ANTI JOIN (SELECT key FROM stage_state WHERE stage = $_uc_stage "
                f"AND state = 'done') done ON done.key = sel.{key}") if skip_done else None
        columns = self.columns + (f", ({self.group_by}) AS {GROUP}" if self.group_by else "")
        sql, params = selected_keys_sql(cat.con, view, key, selection, self.default_where,
                                        columns, join=join)
        if skip_done:
            params["_uc_stage"] = self.name
        return sql, params

    order_by: str | None = None  # batch order (default: the key); e.g. "anchor_id, edit_id"

    def order_sql(self) -> str:
        """The batch order: the stage's (or the key), with a group's rows kept together."""
        order = self.order_by or KEYS[self.table]
        return f" ORDER BY {GROUP} NULLS FIRST, {order}" if self.group_by else f" ORDER BY {order}"

    def items(self, cat: Catalog, selection: Selection, force: bool) -> pl.DataFrame:
        """The rows still to do, as one DataFrame. Stages whose work items are not catalog
        rows override this; the runner streams the default instead (see `pending_batches`)."""
        sql, params = self.items_sql(cat, selection, force)
        return cat.pl(sql + self.order_sql(), params)

    def key_of(self, row: dict) -> int:
        return row[KEYS[self.table]]

    def models(self, ctx: Context) -> dict:
        from .models import describe
        return describe(ctx.workspace, self.roles)

    def write(self, cat: Catalog, result: BatchResult, run_id: int) -> None:
        """Apply a batch's results (inside the runner's transaction)."""
        for table, df in result.inserts.items():
            self._check_writes(table, df.columns)
            cat.insert_rows(table, df)
        for table, df in result.updates.items():
            self._check_writes(table, [c for c in df.columns if c != KEYS[table]])
            cat.update_rows(table, df)

    def finish(self, cat: Catalog, run_id: int) -> None:
        """Called once after the last batch (in its own transaction)."""

    def report(self, cat: Catalog, run_id: int) -> dict:
        """What the run's summary adds to its counts (after finish): stage-specific figures,
        and `notes`, lines a person should read (also the run's message)."""
        return {}

    def _check_writes(self, table: str, cols) -> None:
        allowed = self.writes.get(table, set())
        extra = set(cols) - allowed - {KEYS.get(table)}
        if extra:
            raise RuntimeError(f"stage {self.name} wrote undeclared columns {sorted(extra)} "
                               f"of {table}")

    # -- run where the work happens (driver thread, another thread, or a Ray worker) -------
    def setup(self, ctx: Context) -> None:
        """Load models once per worker."""

    def prepare(self, rows: list[dict], ctx: Context) -> Any:
        """CPU-side loading (decode images, ...) for a batch; runs ahead on a thread."""
        return None

    def process(self, rows: list[dict], prepared: Any, ctx: Context) -> BatchResult:
        raise NotImplementedError


# -- engines -------------------------------------------------------------------------------
class LocalEngine:
    """In-process: `prepare` runs on worker threads up to `prefetch` batches ahead of
    `process`, so decoding overlaps the model."""

    name = "local"

    def __init__(self, prefetch: int = 2, threads: int = 2):
        self.prefetch = prefetch
        self.threads = threads

    def map(self, stage: Stage, batches: list[list[dict]], ctx: Context
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

    def map(self, stage: Stage, batches, ctx: Context):
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
                                 ctx.config)
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
    def __init__(self, stage: Stage, ctx: Context):
        self.stage, self.ctx = stage, ctx
        stage.setup(ctx)

    def run(self, batch):
        try:
            return batch, self.stage.process(batch, self.stage.prepare(batch, self.ctx),
                                             self.ctx)
        except Exception as e:
            return batch, RuntimeError(f"{type(e).__name__}: {e}")


def make_engine(name: str, address: str | None = None, workers: int | None = None):
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine(address=address, num_workers=workers)
    raise UltracurateError(f"unknown engine '{name}' (local or ray)")


# -- the run loop --------------------------------------------------------------------------
@dataclass
class RunSummary:
    run_id: int
    stage: str
    rows_in: int
    rows_done: int
    rows_failed: int
    state: str
    extra: dict = field(default_factory=dict)  # Stage.report's figures and notes

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


class Interrupted(UltracurateError):
    pass


def run_stage(ws: Workspace, stage: Stage, selection: Selection | None = None, *,
              force: bool = False, engine: Any = None, device: str | None = None,
              batch_size: int | None = None, progress: bool = True,
              cat: Catalog | None = None) -> RunSummary:
    """Run stage over the selection's pending rows, committing batch by batch."""
    selection = selection or Selection()
    engine = engine or LocalEngine()
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size
                                   or batch_size < 1):
        raise UltracurateError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    own = cat is None
    cat = cat or ws.catalog()
    try:
        ws.media.clean_tmp()
        # We hold the catalog's write lock, so a run still marked running has died (SIGKILL,
        # power loss): close it, its committed batches stand.
        cat.con.execute("UPDATE runs SET state = 'killed', message = 'the process ended "
                        "without closing the run' WHERE state = 'running'")
        size = batch_size or stage.batch_size
        n_rows, batches = pending_batches(stage, cat, selection, force, size)
        ctx = Context(str(ws.root), device or default_device(), 0, ws.config)
        models = stage.models(ctx) if stage.roles else {}
        run_id = cat.start_run(stage.name, stage.params, selection.to_json(), models,
                               engine=getattr(engine, "name", "local"))
        ctx.run_id = run_id
        cat.con.execute("UPDATE runs SET rows_in = ? WHERE run_id = ?", [n_rows, run_id])
        done = failed = 0
        state = "completed"
        bar = JobBar(n_rows, stage.name) if progress else None
        ctx.on_progress = bar
        ctrl_c = _DeferredInterrupt()
        try:
            ctrl_c.install()
            if bar:
                bar.start()
            results = engine.map(stage, batches, ctx) if n_rows else iter(())
            for batch, result in results:
                n_done, n_failed = _commit_batch(cat, stage, batch, result, run_id)
                done += n_done
                failed += n_failed
                if bar:
                    bar.advance(len(batch))
                if ctrl_c.requested:
                    raise KeyboardInterrupt
            cat.con.execute("BEGIN")
            stage.finish(cat, run_id)
            cat.con.execute("COMMIT")
            extra = stage.report(cat, run_id)
        except (KeyboardInterrupt, RuntimeError) as e:
            # DuckDB turns a Ctrl-C during a query into RuntimeError('Query interrupted')
            if isinstance(e, RuntimeError) and not ctrl_c.requested:
                _rollback(cat)
                cat.end_run(run_id, "failed", f"{type(e).__name__}: {e}")
                raise
            state = "interrupted"
            _rollback(cat)
            cat.end_run(run_id, state, "interrupted by the user")
            raise Interrupted(f"{stage.name} interrupted: {done} rows done, {failed} failed; "
                              "rerun the same command to resume") from None
        except BaseException as e:
            _rollback(cat)
            cat.end_run(run_id, "failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            ctrl_c.restore()
            # close the generators now: the selection stream holds a DuckDB cursor
            for gen in (locals().get("results"), batches):
                if hasattr(gen, "close"):
                    gen.close()
            if bar:
                bar.stop()
        cat.end_run(run_id, state, "; ".join(extra.get("notes", [])) or None)
        return RunSummary(run_id, stage.name, n_rows, done, failed, state, extra)
    finally:
        if own:
            cat.close()


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


def pending_batches(stage: Stage, cat: Catalog, selection: Selection, force: bool,
                    size: int) -> tuple[int, Iterator[list[dict]]]:
    """How many rows are pending, and their batches. The default selection is streamed from
    DuckDB (a second cursor, sorted inside DuckDB, which spills to disk), so a job over 41M
    rows never holds them all in Python; a stage that overrides `items` gives a DataFrame."""
    if type(stage).items is not Stage.items:
        rows = stage.items(cat, selection, force).to_dicts()
        return len(rows), whole_groups(rows, size)
    sql, params = stage.items_sql(cat, selection, force)
    n = int(cat.scalar(f"SELECT count(*) FROM ({sql}) counted", params))

    def stream() -> Iterator[dict]:
        cur = cat.con.cursor()
        try:
            reader = cur.sql(sql + stage.order_sql(),
                             params=params).to_arrow_reader(max(size, 2048))
            for rb in reader:
                yield from rb.to_pylist()
        finally:
            cur.close()
    return n, whole_groups(stream(), size)


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


def _rollback(cat: Catalog) -> None:
    try:
        cat.con.execute("ROLLBACK")
    except Exception:
        pass


def _commit_batch(cat: Catalog, stage: Stage, batch: list[dict],
                  result: BatchResult | BaseException, run_id: int) -> tuple[int, int]:
    keys = [stage.key_of(r) for r in batch] if stage.track_state else []
    n_all = len(batch)
    if isinstance(result, BaseException):  # the whole batch failed: every row, with the error
        err = reason_text(result, typed=True)
        result = BatchResult(failed={k: err for k in (keys or range(n_all))})
    cat.con.execute("BEGIN")
    try:
        stage.write(cat, result, run_id)
        failed_keys = [k for k in keys if k in result.failed]
        done_keys = [k for k in keys if k not in result.failed]
        if stage.track_state:
            cat.mark_state(stage.name, done_keys, "done", run_id)
            cat.mark_state(stage.name, failed_keys, "failed", run_id,
                           [result.failed[k] for k in failed_keys])
        n_failed = len(failed_keys) if stage.track_state else len(result.failed)
        n_done = n_all - n_failed
        cat.con.execute(
            "UPDATE runs SET rows_done = rows_done + ?, rows_failed = rows_failed + ? "
            "WHERE run_id = ?", [n_done, n_failed, run_id])
        cat.con.execute("COMMIT")
    except BaseException:
        _rollback(cat)
        raise
    return n_done, n_failed


def default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
