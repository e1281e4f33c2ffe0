"""The stage runner: per-batch commits, done/failed marks, resume after SIGKILL (a real
subprocess), --force, selection narrowing, and the Ray engine on a local cluster."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ultracurate.runner import BatchResult, RayEngine, RowStage, run
from ultracurate.selection import Selection


class WidthParity(RowStage):
    """Test stage over anchors: records width parity in `dataset`; raises for anchor 3's batch,
    fails anchor 5 alone."""

    name = "test_parity"
    table = "anchors"
    columns = "anchor_id, width"
    writes = {"anchors": {"dataset"}}
    batch_size = 2

    def process(self, rows, prepared, ctx):
        if any(r["anchor_id"] == 3 for r in rows) and self.params.get("explode", True):
            raise ValueError("boom on anchor 3")
        ok = [r for r in rows if r["anchor_id"] != 5]
        df = pl.DataFrame({"anchor_id": [r["anchor_id"] for r in ok],
                           "dataset": ["even" if r["width"] % 2 == 0 else "odd" for r in ok]},
                          schema={"anchor_id": pl.Int64, "dataset": pl.String})
        return BatchResult(updates={"anchors": df},
                           failed={5: "anchor 5 is unlucky"} if len(ok) < len(rows) else {})


class BatchRecorder(RowStage):
    """Test stage over anchors, grouped by anchor_id // 3 (anchor 5 on its own): writes the
    keys of the batch each row came in into `dataset`."""

    name = "test_groups"
    table = "anchors"
    columns = "anchor_id"
    writes = {"anchors": {"dataset"}}
    group_by = "CASE WHEN anchor_id = 5 THEN NULL ELSE anchor_id // 3 END"

    def process(self, rows, prepared, ctx):
        keys = ",".join(str(r["anchor_id"]) for r in rows)
        return BatchResult(updates={"anchors": pl.DataFrame(
            {"anchor_id": [r["anchor_id"] for r in rows], "dataset": [keys] * len(rows)})})


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100])
def test_a_batch_never_splits_a_group(ingested_ws, size):
    """Groups {1, 2}, {3, 4}, {5} (NULL: alone), {6, 7, 8}, {9}: every group lands in one
    batch whatever the batch size, a batch holds whole groups up to its size, and a group
    larger than the size is a batch of its own."""
    run(ingested_ws, BatchRecorder(), progress=False, batch_size=size)
    with ingested_ws.catalog(read_only=True) as cat:
        batch_of = dict(cat.con.execute("SELECT anchor_id, dataset FROM anchors").fetchall())
    batches = {tuple(int(k) for k in b.split(",")) for b in batch_of.values()}
    assert sorted(k for b in batches for k in b) == list(range(1, 10))  # each row once
    groups = [{1, 2}, {3, 4}, {5}, {6, 7, 8}, {9}]
    for g in groups:
        assert len({batch_of[k] for k in g}) == 1, (g, batch_of)
        if len(g) <= size:
            continue
        assert set(map(int, batch_of[min(g)].split(","))) == g   # alone when too big
    for b in batches:
        whole = [g for g in groups if g & set(b)]
        assert set().union(*whole) == set(b)
        assert len(b) <= size or len(whole) == 1


class ReprRaiser(RowStage):
    """Raises errors whose messages hold object reprs: in a batch, and at the end."""

    name = "test_repr"
    table = "anchors"
    columns = "anchor_id"
    batch_size = 4

    def process(self, rows, prepared, ctx):
        raise ValueError(f"cannot use {object()}\nsecond line")

    def finish(self, w):
        raise RuntimeError(f"gave up on <_io.BytesIO object at 0x{id(self):x}>")


def test_stored_reasons_hold_no_object_reprs(ingested_ws):
    """Every reason the runner stores (a failed batch's rows, a failed run's message) is one
    line without memory addresses, so equal failures group together."""
    with pytest.raises(RuntimeError):
        run(ingested_ws, ReprRaiser(), progress=False)
    with ingested_ws.catalog(read_only=True) as cat:
        errors = {r[0] for r in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'test_repr'").fetchall()}
        message = cat.scalar("SELECT message FROM runs WHERE stage = 'test_repr'")
    assert errors == {"ValueError: cannot use"}
    assert message == "RuntimeError: gave up on"


def _states(ws, stage="test_parity"):
    with ws.catalog(read_only=True) as cat:
        return {r["key"]: (r["state"], r["error"]) for r in cat.query(
            "SELECT key, state, error FROM stage_state WHERE stage = ?", [stage])}


def test_failed_rows_are_recorded_and_retried_done_rows_skipped(ingested_ws):
    ws = ingested_ws
    s = run(ws, WidthParity(), progress=False)
    st = _states(ws)
    # batches of 2 over ids 1..9: [3,4] raised, 5 failed alone
    assert st[3][0] == st[4][0] == "failed" and "boom on anchor 3" in st[3][1]
    assert st[5] == ("failed", "anchor 5 is unlucky")
    assert {k for k, v in st.items() if v[0] == "done"} == {1, 2, 6, 7, 8, 9}
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 6, 3)
    # a rerun only retries the failed rows
    s2 = run(ws, WidthParity(explode=False), progress=False)
    assert s2.rows_in == 3 and s2.rows_done == 2 and s2.rows_failed == 1
    with ws.catalog(read_only=True) as cat:
        got = dict(cat.con.execute("SELECT anchor_id, dataset FROM anchors").fetchall())
        widths = dict(cat.con.execute("SELECT anchor_id, width FROM anchors").fetchall())
        runs = cat.query("SELECT * FROM runs WHERE stage = 'test_parity' ORDER BY run_id")
    for k in (1, 2, 3, 4, 6, 7, 8, 9):
        assert got[k] == ("even" if widths[k] % 2 == 0 else "odd")
    assert got[5] == "demo_anchors"  # never written
    assert [r["state"] for r in runs] == ["completed", "completed"]
    assert runs[0]["rows_done"] == 6 and runs[0]["rows_failed"] == 3
    # --force redoes everything, narrowed by --where
    s3 = run(ws, WidthParity(explode=False), Selection(where="anchor_id <= 4"),
                   force=True, progress=False)
    assert s3.rows_in == 4


def test_undeclared_columns_are_refused(ingested_ws):
    """A stage writing a column it did not declare is a bug: the job stops, its batch is
    rolled back and the run says why."""
    class Sneaky(WidthParity):
        name = "test_sneaky"
        writes = {"anchors": {"width"}}
    with pytest.raises(RuntimeError, match="undeclared columns"):
        run(ingested_ws, Sneaky(explode=False), Selection(limit=2), progress=False)
    with ingested_ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors WHERE dataset <> 'demo_anchors'") == 0
        assert cat.scalar("SELECT state FROM runs WHERE stage = 'test_sneaky'") == "failed"
        assert cat.scalar("SELECT count(*) FROM stage_state") == 0


def _make_images(folder, n):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            folder / f"img_{i:04d}.png")


def _cli(*args, ws):
    env = dict(os.environ, ULTRACURATE_WORKSPACE=str(ws.root), ULTRACURATE_PROGRESS="0")
    return [sys.executable, "-m", "ultracurate.cli", *args], env


@pytest.mark.slow
def test_sigkill_mid_ingest_then_resume_loses_and_duplicates_nothing(ws, tmp_path):
    n = 240
    _make_images(tmp_path / "imgs", n)
    cmd, env = _cli("ingest", str(tmp_path / "imgs"), "--batch-size", "3", ws=ws)
    media = ws.root / "media"
    for threshold in (40, 120):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if sum(1 for p in media.glob("??/*")) >= threshold:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "ingest finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors") == n
        assert cat.scalar("SELECT count(DISTINCT source_path) FROM anchors") == n
        assert cat.scalar("SELECT count(DISTINCT sha256) FROM anchors") == n
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 0
        runs = cat.query("SELECT * FROM runs ORDER BY run_id")
        per_run = dict(cat.con.execute(
            "SELECT ingest_run, count(*) FROM anchors GROUP BY ALL").fetchall())
    assert [r["state"] for r in runs] == ["killed", "killed", "completed"]
    assert all(per_run.get(r["run_id"], 0) == r["rows_done"] for r in runs)
    assert per_run.get(1, 0) > 0 and per_run.get(3, 0) > 0
    assert sum(1 for _ in media.glob("??/*")) == n
    assert not list((media / "tmp").glob("*"))


@pytest.mark.slow
def test_ray_engine_on_a_local_cluster(ingested_ws):
    import ray
    import ray.cloudpickle
    # Workers cannot import this test module: send its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run(ingested_ws, WidthParity(), engine=RayEngine(num_workers=2),
                      progress=False)
    finally:
        ray.shutdown()
    st = _states(ingested_ws)
    assert (s.rows_done, s.rows_failed) == (6, 3)
    assert "boom on anchor 3" in st[3][1] and st[5][1] == "anchor 5 is unlucky"
    with ingested_ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT engine FROM runs WHERE stage = 'test_parity'") == "ray"
        assert cat.scalar("SELECT count(*) FROM anchors WHERE dataset IN ('even', 'odd')") == 6


@pytest.mark.slow
def test_ray_worker_that_cannot_start_stops_the_job_with_a_clear_error(ingested_ws):
    import ray
    import ray.cloudpickle

    from ultracurate.errors import UltracurateError
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class NoModel(WidthParity):
        name = "test_nomodel"

        def setup(self, ctx):
            raise OSError("checkpoint /nowhere/model.safetensors not found")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(UltracurateError, match="Ray worker failed"):
            run(ingested_ws, NoModel(), engine=RayEngine(num_workers=1), progress=False)
    finally:
        ray.shutdown()
    with ingested_ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT state FROM runs WHERE stage = 'test_nomodel'") == "failed"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(ws, tmp_path):
    n = 240
    _make_images(tmp_path / "imgs", n)
    cmd, env = _cli("ingest", str(tmp_path / "imgs"), "--batch-size", "3", ws=ws)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    media = ws.root / "media"
    deadline = time.time() + 120
    while time.time() < deadline and sum(1 for _ in media.glob("??/*")) < 30:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: ingest interrupted")
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT state FROM runs") == "interrupted"
        first = cat.scalar("SELECT count(*) FROM anchors")
    assert 0 < first < n
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(DISTINCT sha256) FROM anchors") == n
        assert cat.scalar("SELECT count(*) FROM anchors") == n


def test_a_batch_that_raises_in_ingest_is_counted_failed_and_retried(ws, demo_photos,
                                                                      monkeypatch):
    from ultracurate.stages import ingest as ingest_mod
    from ultracurate.stages.ingest import IngestStage, discover
    real = ingest_mod.inspect_image
    monkeypatch.setattr(ingest_mod, "inspect_image",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk on fire")))
    s = run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    assert (s.rows_done, s.rows_failed) == (0, 9)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors") == 0
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 0
    monkeypatch.setattr(ingest_mod, "inspect_image", real)
    s = run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    assert (s.rows_in, s.rows_done) == (9, 9)


class Overlapped(RowStage):
    """Test stage over anchors, one row per batch: a batch's `complete` (its writes) waits
    until the next batch's `process` has started, which only happens when the runner
    finishes and commits a batch while the next one computes; every completion is counted."""

    name = "test_overlap"
    table = "anchors"
    columns = "anchor_id"
    writes = {"anchors": {"dataset"}}
    batch_size = 1

    def __init__(self, last=9, fail_complete_of=None):
        super().__init__()
        self.last = last
        import threading
        self.started = {}        # anchor_id -> Event set when its process starts
        self.completed = []      # anchor_ids, in completion order
        self.overlapped = []     # anchor_ids whose completion saw the next batch computing
        self.threads = set()
        self.fail_complete_of = fail_complete_of
        self._event = threading.Event

    def process(self, rows, prepared, ctx):
        import threading
        k = rows[0]["anchor_id"]
        self.started.setdefault(k, self._event()).set()

        def complete():
            self.threads.add(threading.current_thread().name)
            nxt = self.started.setdefault(k + 1, self._event())
            if k < self.last and nxt.wait(timeout=20):
                self.overlapped.append(k)
            self.completed.append(k)
            if k == self.fail_complete_of:
                raise OSError("disk full")
            return BatchResult(updates={"anchors": [{"anchor_id": k, "dataset": f"done {k}"}]})
        return BatchResult(complete=complete)


def test_a_batch_is_completed_and_committed_while_the_next_one_computes(ingested_ws):
    ws = ingested_ws
    stage = Overlapped(fail_complete_of=4)
    s = run(ws, stage, progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 8, 1)
    assert stage.completed == list(range(1, 10))            # each batch exactly once, in order
    assert stage.overlapped == list(range(1, 9))            # all but the last overlapped
    assert stage.threads and all(t.startswith("uc-commit") for t in stage.threads)
    st = _states(ws, "test_overlap")
    assert st[4][0] == "failed" and "disk full" in st[4][1]
    with ws.catalog(read_only=True) as cat:
        got = dict(cat.con.execute("SELECT anchor_id, dataset FROM anchors").fetchall())
    assert all(got[k] == f"done {k}" for k in range(1, 10) if k != 4)
    # a rerun completes only the failed batch
    again = Overlapped(last=4)
    assert run(ws, again, progress=False).rows_done == 1 and again.completed == [4]


class KeyOrder(RowStage):
    """Test stage over anchors in key order: records every row it is given, in order."""

    name = "test_keys"
    table = "anchors"
    columns = "anchor_id"
    batch_size = 2

    def __init__(self, **params):
        super().__init__(**params)
        self.seen: list[int] = []

    def process(self, rows, prepared, ctx):
        self.seen += [r["anchor_id"] for r in rows]
        return BatchResult()


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of a couple of rows: the 9 anchors take several, sized from the last."""
    from ultracurate.runner import Pending
    monkeypatch.setattr(Pending, "FIRST", 2)
    monkeypatch.setattr(Pending, "MAX", 4)


class TurnGroups(KeyOrder):
    """Groups on a whole-number column of the table: read in windows over the column."""

    name = "test_turns"
    group_by = "turn"


@pytest.mark.parametrize("case", ["fresh", "some done", "force", "sparse where", "limit",
                                  "groups", "group column"])
def test_pending_rows_read_a_key_window_at_a_time_are_the_sorted_rows(ingested_ws,
                                                                     small_windows, case):
    """Read window by window (each its own query, later ones on another connection), the
    pending rows are exactly the single sorted query's rows, in the same order; a --limit
    and a stage with groups get one sorted read at the start."""
    from ultracurate.runner import Pending, order_sql, pending_sql
    ws = ingested_ws
    stage, sel, force = KeyOrder(), Selection(), False
    if case == "some done":
        run(ws, KeyOrder(), Selection(where="anchor_id IN (2, 3, 4, 8)"), progress=False)
    elif case == "force":
        run(ws, KeyOrder(), progress=False)
        force = True
    elif case == "sparse where":
        sel = Selection(where="anchor_id IN (1, 8, 9)")   # a run of keys with none between
    elif case == "limit":
        sel = Selection(limit=3)
    elif case == "groups":
        stage = BatchRecorder()
    elif case == "group column":   # 1-3 without a group; {6, 9}, {4, 7}, {5, 8}
        with ws.catalog() as cat:
            cat.con.execute("UPDATE anchors SET turn = anchor_id % 3 WHERE anchor_id > 3")
        stage = TurnGroups()
    with ws.catalog() as cat:
        sql, params = pending_sql(stage, cat, sel, force)
        want = [r[0] for r in cat.con.execute(sql + order_sql(stage), params).fetchall()]
        pending = Pending.write(stage, cat, sel, force, ws.scratch)
        pending.fill(cat.cursor)
        got = [r["anchor_id"] for b in pending.batches(2) for r in b]
        pending.remove()
    assert got == want and want, case
    assert pending.n == len(want)
    windowed = case not in ("limit", "groups")
    assert (len(pending.counts) > 1) == windowed, (case, pending.counts)
    assert list(ws.scratch.glob("*pending*")) == []   # read files go


def test_a_job_over_windows_gets_each_row_once_in_key_order_and_records_the_total(
        ingested_ws, small_windows):
    ws = ingested_ws
    run(ws, KeyOrder(), Selection(where="anchor_id IN (4, 5)"), progress=False)
    stage = KeyOrder()
    s = run(ws, stage, progress=False)
    assert stage.seen == [1, 2, 3, 6, 7, 8, 9] and s.rows_in == s.rows_done == 7
    with ws.catalog(read_only=True) as cat:
        rows_in = cat.scalar("SELECT rows_in FROM runs WHERE run_id = ?", [s.run_id])
    assert rows_in == 7


def test_a_window_that_cannot_be_read_fails_the_batches_that_need_it(ingested_ws,
                                                                   small_windows):
    """The first window is read at the start; a later one that fails (the catalog gone, a
    full disk) raises its error where the batches reach it, not a silent short job."""
    import contextlib

    from ultracurate.runner import Pending
    ws = ingested_ws
    with ws.catalog() as cat:
        pending = Pending.write(KeyOrder(), cat, Selection(), False, ws.scratch)
    assert not pending.complete and pending.known >= 2

    @contextlib.contextmanager
    def broken():
        raise OSError("No space left on device")
        yield
    pending.fill(broken)
    with pytest.raises(OSError, match="No space left"):
        [r["anchor_id"] for b in pending.batches(2) for r in b]
    pending.remove()
    assert list(ws.scratch.glob("*pending*")) == []


class CandidateKeys(RowStage):
    """Test stage over candidates, reading a column of their anchors (the view's joins)."""

    name = "test_candidate_keys"
    table = "candidates"
    columns = "candidate_id, anchor_id, anchor_media"


def test_windows_over_a_joined_view_narrow_its_parents_without_losing_rows(ingested_ws,
                                                                           small_windows):
    """A window of candidates binds the ranges of edit and anchor ids its rows imply
    (selection.key_window); with edits cycling over the anchors (a window's anchors are not
    contiguous), the windowed rows are still exactly the view's rows, in key order."""
    from _scoring import add_candidates

    from ultracurate.runner import Pending, order_sql, pending_sql
    ws = ingested_ws
    add_candidates(ws, n_edits=12, per_edit=1, size=16)   # edits 10-12 go back to anchors 1-3
    stage = CandidateKeys()
    with ws.catalog() as cat:
        sql, params = pending_sql(stage, cat, Selection(), False)
        want = cat.con.execute(sql + order_sql(stage), params).fetchall()
        pending = Pending.write(stage, cat, Selection(), False, ws.scratch)
        pending.fill(cat.cursor)
        got = [(r["candidate_id"], r["anchor_id"], r["anchor_media"])
               for b in pending.batches(2) for r in b]
        pending.remove()
    assert got == want and len(want) == 12 and len(pending.counts) > 1


class Numbered(KeyOrder):
    """Numbers the anchors whose turn is above 2 (NULL: not numbered) over the whole
    selection, done ones included."""

    name = "test_numbered"
    columns = "anchor_id, turn"
    ordinal_where = "turn > $_uc_t"

    def sql_params(self):
        return {"_uc_t": 2}


@pytest.mark.parametrize("case", ["all", "where", "some done", "nulls"])
def test_numbering_counts_the_whole_selection_in_key_order(ingested_ws, small_windows, case):
    """A stage's ordinal (ORDINAL: its number among the rows of the selection its predicate
    holds for, in key order, done rows included; None where it does not hold) is the one a
    plain count gives, for every case: read in one query, and a key window at a time (each
    window numbered on from those before)."""
    from ultracurate.runner import ORDINAL, Pending, order_sql, pending_sql
    ws = ingested_ws
    sel = Selection(where="anchor_id <> 4") if case == "where" else Selection()
    with ws.catalog() as cat:
        cat.con.execute("UPDATE anchors SET turn = anchor_id")
        if case == "nulls":
            cat.con.execute("UPDATE anchors SET turn = NULL WHERE anchor_id IN (3, 6)")
        rows = cat.query("SELECT anchor_id, turn FROM anchors ORDER BY anchor_id")
    if case == "some done":
        run(ws, Numbered(), Selection(where="anchor_id IN (2, 5, 7)"), progress=False)
    picked = [r for r in rows if case != "where" or r["anchor_id"] != 4]
    numbered = [r["anchor_id"] for r in picked if r["turn"] is not None and r["turn"] > 2]
    done = {2, 5, 7} if case == "some done" else set()
    want = [(r["anchor_id"], numbered.index(r["anchor_id"]) if r["anchor_id"] in numbered
             else None) for r in picked if r["anchor_id"] not in done]
    stage = Numbered()
    with ws.catalog() as cat:
        sql, params = pending_sql(stage, cat, sel, False)
        got = [(r["anchor_id"], r[ORDINAL]) for r in cat.query(sql + order_sql(stage), params)]
        assert got == want and len(numbered) > 2
        pending = Pending.write(stage, cat, sel, False, ws.scratch)
        pending.fill(cat.cursor)
        windowed = [(r["anchor_id"], r[ORDINAL]) for b in pending.batches(2) for r in b]
        pending.remove()
    assert len(pending.counts) > 1 and windowed == want


class LocalOrder(KeyOrder):
    """An order that only gathers a batch's rows (turn, here the reverse of the key)."""

    name = "test_local_order"
    columns = "anchor_id, turn"
    order_by = "turn, anchor_id"
    order_in_windows = True


@pytest.mark.parametrize("in_windows", [True, False])
def test_an_order_of_a_stages_own_holds_within_each_window_or_over_all(ingested_ws,
                                                                       small_windows,
                                                                       in_windows):
    """order_in_windows: the rows come a key window at a time (ascending, disjoint key
    ranges), each window in the stage's order; without it, one read in that order."""
    from ultracurate.runner import Pending
    ws = ingested_ws
    stage = LocalOrder()
    stage.order_in_windows = in_windows
    with ws.catalog() as cat:
        cat.con.execute("UPDATE anchors SET turn = 100 - anchor_id")
        pending = Pending.write(stage, cat, Selection(), False, ws.scratch)
        pending.fill(cat.cursor)
        rows = [(r["anchor_id"], r["turn"]) for b in pending.batches(2) for r in b]
        pending.remove()
    assert sorted(rows) == [(a, 100 - a) for a in range(1, 10)]
    chunks, at = [], 0
    for n in pending.counts:
        chunks.append(rows[at:at + n])
        at += n
    assert (len(chunks) > 2) == in_windows
    for chunk in chunks:
        assert chunk == sorted(chunk, key=lambda r: (r[1], r[0]))
    for a, b in zip(chunks, chunks[1:]):
        assert max(r[0] for r in a) < min(r[0] for r in b)
