"""A live catalog: readers and a second job beside a running job (real subprocesses), a SIGKILL
of one of two concurrent jobs, `runs` (its figures, --json, --watch), and which processes
count as alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import polars as pl
import pytest
from PIL import Image

from _clirun import run_many
from ultracurate import procs
from ultracurate.catalog import now
from ultracurate.models import make_tiny
from ultracurate.runner import run

MINUTES = 240  # a deadline for waits on subprocesses: a hung job fails the test


def _env(ws, **extra) -> dict:
    env = dict(os.environ, ULTRACURATE_WORKSPACE=str(ws.root), ULTRACURATE_PROGRESS="0")
    env.update(extra)
    return env


def _start(ws, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ultracurate.cli", *args], env=_env(ws),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ledger(ws) -> dict[int, dict]:
    """The runs as a plain read-only DuckDB connection (a user's own) sees them."""
    con = _connect_read_only(ws)
    try:
        rows = con.execute("SELECT run_id, stage, state, rows_in, rows_done, rows_failed, "
                           "pid, started_at, ended_at FROM runs").fetchall()
    finally:
        con.close()
    names = ("run_id", "stage", "state", "rows_in", "rows_done", "rows_failed", "pid",
             "started_at", "ended_at")
    return {r[0]: dict(zip(names, r)) for r in rows}


def _connect_read_only(ws, wait: float = 30.0):
    """duckdb.connect(path, read_only=True), retried while a job's commit holds the file (a
    commit is short: a reader's turn comes within its wait)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(ws.catalog_path), read_only=True)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _wait_for(what, proc: subprocess.Popen | None = None, timeout: float = MINUTES):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended first (rc {proc.returncode}): "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=MINUTES)
    assert proc.returncode == 0, err[-3000:]
    return out


# -- a generate job with readers and a score job beside it --------------------------------------
def _free_edits(ws, n: int) -> None:
    make_tiny(ws.section("models")["tiny_dir"], ("editor", "clip", "dino"))
    with ws.catalog() as cat:
        an = cat.query("SELECT anchor_id, captions FROM anchors_v ORDER BY anchor_id LIMIT ?",
                       [n])
        cat.edits.insert(pl.DataFrame([{
            "edit_id": i + 1, "anchor_id": a["anchor_id"], "source_caption": a["captions"][0],
            "instruction": "make it snowy", "target_caption": a["captions"][0] + " in snow",
            "edit_object": "NONE", "edit_type": "change_global", "mode": "free",
            "edit_status": "proposed", "created_at": now()} for i, a in enumerate(an)]))


def _hold_when(ws, ready, proc: subprocess.Popen):
    """A read-only connection of the test's own, returned open once ready(ledger) holds on
    what it reads. While it is open no job commits (a writer waits for readers), so what it
    saw stays true, whatever the machine's speed. Meanwhile the test says it is a reader
    waiting (catalog.readers_dir), so that the jobs make way after each commit and the test
    sees every step of their progress."""
    from ultracurate.catalog import readers_dir
    marker = readers_dir(ws.catalog_path) / f"{procs.tag()}~test"
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    try:
        deadline = time.monotonic() + MINUTES
        while time.monotonic() < deadline:
            con = _connect_read_only(ws)
            rows = con.execute("SELECT run_id, state, rows_done, pid FROM runs").fetchall()
            ledger = {r[0]: {"state": r[1], "rows_done": r[2], "pid": r[3]} for r in rows}
            if ready(ledger):
                return con, ledger
            con.close()
            if proc.poll() is not None:
                raise AssertionError(f"the job ended first (rc {proc.returncode})")
            time.sleep(0.02)
        raise AssertionError("timed out")
    finally:
        marker.unlink()


@pytest.mark.slow
def test_readers_and_a_second_job_work_beside_a_generate_job(ingested_ws):
    ws = ingested_ws
    _free_edits(ws, 3)
    gen = _start(ws, "generate", "--mode", "free", "--candidates", "3", "--size", "64",
                 "--pairs-per-call", "1", "--batch-size", "1")

    def first_commit(ledger):
        return any(r["pid"] == gen.pid and r["state"] == "running" and r["rows_done"] >= 1
                   for r in ledger.values())
    # generate, caught mid-run, is stopped: alive, and holding no connection (our reader is
    # open, and a job's connections are read-write), so nothing below waits on it, and what
    # the readers and the second job see cannot depend on the machine's speed
    held, ledger = _hold_when(ws, first_commit, gen)
    os.kill(gen.pid, signal.SIGSTOP)
    held.close()
    try:
        g = next(dict(r, run_id=k) for k, r in _ledger(ws).items() if r["pid"] == gen.pid)
        assert g["state"] == "running" and g["rows_in"] == 9 and 1 <= g["rows_done"] < 9
        got = run_many([["runs", "--json"], ["stats", "--json"],
                        ["select", "--from", "candidates", "-f", "json",
                         "--where", "auto_status = 'generated'"],
                        ["show", "1", "--json"], ["sql", "SELECT count(*) AS n FROM runs",
                                                  "-f", "json"]], env=_env(ws))
        # a second job on disjoint rows: score takes the candidates generate has finished
        first_score = json.loads(_finish(_start(ws, "score", "--json")))
    finally:
        os.kill(gen.pid, signal.SIGCONT)
    _finish(gen)
    assert all(r["rc"] == 0 for r in got), [r["stderr"][-500:] for r in got]
    live = {r["run_id"]: r for r in json.loads(got[0]["stdout"])}[g["run_id"]]
    assert (live["stage"], live["state"], live["rows_total"]) == ("generate", "running", 9)
    assert live["rows_done"] == g["rows_done"]
    generated = json.loads(got[2]["stdout"])
    assert len(generated) == g["rows_done"]          # up to the last committed batch
    assert json.loads(got[1]["stdout"])["candidates_by_status"]["generated"] == len(generated)
    assert json.loads(got[3]["stdout"])["candidate_id"] == 1
    assert json.loads(got[4]["stdout"]) == [{"n": len(json.loads(got[0]["stdout"]))}]

    runs = _ledger(ws)
    score_run = runs[first_score["run_id"]]
    assert g["started_at"] < score_run["started_at"] < score_run["ended_at"] \
        < runs[g["run_id"]]["ended_at"]
    assert first_score["rows_done"] == g["rows_done"]
    # then the rest is scored, and filter (one transaction) runs after both
    assert run(ws, "score", progress=False).rows_done == 9 - first_score["rows_done"]
    assert run(ws, "filter", progress=False).state == "completed"
    with ws.catalog(read_only=True) as cat:
        cands = cat.query("SELECT edit_id, candidate_index, auto_status, clip_sim_dir "
                          "FROM candidates")
        states = dict(cat.con.execute(
            "SELECT stage, count(*) FROM stage_state WHERE state = 'done' GROUP BY stage"
        ).fetchall())
        per_run = dict(cat.con.execute(
            "SELECT run_id, count(*) FROM stage_state GROUP BY run_id").fetchall())
        ledger = cat.query("SELECT run_id, stage, state, rows_done FROM runs")
    assert len(cands) == 9 and len({(c["edit_id"], c["candidate_index"]) for c in cands}) == 9
    assert all(c["clip_sim_dir"] is not None for c in cands)
    assert all(c["auto_status"] in ("accepted", "rejected") for c in cands)
    assert states == {"generate": 9, "score": 9}
    assert all(r["state"] == "completed" for r in ledger), ledger
    for r in ledger:  # each row counted once, by the run that marked it
        if r["stage"] in ("generate", "score"):
            assert per_run.get(r["run_id"], 0) == r["rows_done"]


# -- SIGKILL one of two concurrent jobs ---------------------------------------------------------
def _images(folder, n: int, seed: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"img_{i:04d}.png")


@pytest.mark.slow
def test_sigkill_one_of_two_concurrent_jobs_loses_and_duplicates_nothing(ws, tmp_path):
    _images(tmp_path / "a", 150, seed=1)
    _images(tmp_path / "b", 60, seed=2)
    a = _start(ws, "ingest", str(tmp_path / "a"), "--batch-size", "1")
    b = _start(ws, "ingest", str(tmp_path / "b"), "--batch-size", "1")

    def run_of(ledger, proc):
        return next((k for k, r in ledger.items() if r["pid"] == proc.pid), None)

    def mid_run(proc, rows):
        def ready(ledger):
            k = run_of(ledger, proc)
            return k is not None and ledger[k]["state"] == "running" and \
                ledger[k]["rows_done"] >= rows
        return ready
    # a, caught mid-run, is stopped (alive, holding no lock: our reader is open)
    held, ledger = _hold_when(ws, mid_run(a, 2), a)
    run_a = run_of(ledger, a)
    os.kill(a.pid, signal.SIGSTOP)
    held.close()
    try:
        held, ledger = _hold_when(ws, mid_run(b, 4), b)   # b, caught mid-run
        run_b = run_of(ledger, b)
        try:
            listed = _runs_json(ws)       # while b lives, nobody takes its run for dead
            assert listed[run_b]["state"] == listed[run_a]["state"] == "running"
            os.killpg(b.pid, signal.SIGKILL)
            b.wait()
            listed = _runs_json(ws)
            assert listed[run_b]["state"] == "killed"  # dead, though the ledger says running
            assert listed[run_a]["state"] == "running"
            assert held.execute("SELECT state FROM runs WHERE run_id = ?",
                                [run_b]).fetchall() == [("running",)]
        finally:
            held.close()
        # b's rerun: its start closes b's run, never a's (alive, if stopped)
        c = _start(ws, "ingest", str(tmp_path / "b"), "--batch-size", "1")
        _finish(c)
        ledger = _ledger(ws)
        run_c = next(k for k, r in ledger.items() if r["pid"] == c.pid)
        assert (ledger[run_b]["state"], ledger[run_a]["state"]) == ("killed", "running")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _finish(a)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors") == 210
        assert cat.scalar("SELECT count(DISTINCT sha256) FROM anchors") == 210
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 0
        per_run = dict(cat.con.execute(
            "SELECT ingest_run, count(*) FROM anchors GROUP BY ALL").fetchall())
        runs = {r["run_id"]: r for r in cat.query("SELECT * FROM runs")}
    assert {k: runs[k]["state"] for k in (run_a, run_b, run_c)} == {
        run_a: "completed", run_b: "killed", run_c: "completed"}
    assert all(per_run.get(k, 0) == runs[k]["rows_done"] for k in runs)
    assert per_run[run_b] > 0 and per_run[run_a] == 150
    assert sum(1 for _ in (ws.root / "media").glob("??/*")) == 210
    assert not list((ws.root / "media" / "tmp").glob("*"))
    assert not list(ws.scratch.glob("*"))


def _runs_json(ws) -> dict[int, dict]:
    res = subprocess.run([sys.executable, "-m", "ultracurate.cli", "runs", "--json",
                          "--limit", "100"], env=_env(ws), capture_output=True, text=True,
                         timeout=MINUTES)
    assert res.returncode == 0, res.stderr
    return {r["run_id"]: r for r in json.loads(res.stdout)}


# -- runs -------------------------------------------------------------------------------------
def test_runs_lists_the_ledger_with_its_figures(ws):
    """--json holds only JSON; --state and --limit narrow; figures come from the ledger; a run
    marked running whose process is gone is listed as killed (and closed by the next job, a
    live one's never); gc refuses while a job lives; --watch --json prints one object per
    refresh and ends cleanly on Ctrl-C."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    t0 = now().replace(microsecond=0)
    from datetime import timedelta
    with ws.catalog() as cat:
        cat.runs.insert([
            {"run_id": 1, "stage": "ingest", "state": "completed", "started_at": t0,
             "ended_at": t0 + timedelta(seconds=10), "rows_in": 20, "rows_done": 19,
             "rows_failed": 1, "selection": '{"where": null}', "params": '{"batch_size": 2}'},
            {"run_id": 2, "stage": "generate", "state": "running", "started_at": t0,
             "heartbeat_at": t0 + timedelta(seconds=4), "rows_in": 100, "rows_done": 8,
             "rows_failed": 0, "pid": os.getpid(), "host": procs.host(),
             "proc_start": procs.identity()[2],
             "selection": '{"where": "edit_type = \'add\'"}', "params": '{"candidates": 4}'},
            {"run_id": 3, "stage": "score", "state": "running", "started_at": t0,
             "heartbeat_at": t0, "rows_in": 5, "pid": dead_pid, "host": procs.host(),
             "proc_start": "1"}])
    got = run_many([["runs", "--json"], ["runs", "--json", "--state", "killed"],
                    ["runs", "--json", "--limit", "1"], ["runs"],
                    ["runs", "--state", "nope"], ["gc", "--dry-run"]], env=_env(ws))
    every = {r["run_id"]: r for r in json.loads(got[0]["stdout"])}
    assert list(every) == [3, 2, 1]
    assert every[1]["rate"] == 2.0 and every[1]["elapsed_s"] == 10.0
    assert every[1]["eta_s"] is None and every[1]["options"] == {"batch_size": 2}
    # running: 8 rows in the 4 s up to its last commit, 92 to go
    assert every[2]["state"] == "running" and every[2]["rate"] == 2.0
    assert every[2]["eta_s"] == 46.0 and every[2]["selection"]["where"] == "edit_type = 'add'"
    assert every[3]["state"] == "killed"
    assert [r["run_id"] for r in json.loads(got[1]["stdout"])] == [3]
    assert [r["run_id"] for r in json.loads(got[2]["stdout"])] == [3]
    assert "generate" in got[3]["stdout"] and "edit_type = 'add'" in got[3]["stdout"]
    assert got[4]["rc"] == 2
    # gc never removes media a live job wrote but has not committed yet
    assert got[5]["rc"] == 1 and "run 2 is still running" in got[5]["stderr"]
    # a reader never closes a run; the next job does, for the dead process's only
    assert _ledger(ws)[3]["state"] == "running"
    from ultracurate.runs import close_dead
    with ws.catalog() as cat:
        with cat.transaction():
            assert close_dead(cat, own={2}) == [3]
    assert {k: r["state"] for k, r in _ledger(ws).items()} == {
        1: "completed", 2: "running", 3: "killed"}

    watch = _start(ws, "runs", "--watch", "--json", "--interval", "0.2")
    lines = [watch.stdout.readline(), watch.stdout.readline()]
    assert all(lines), watch.stderr.read()
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=MINUTES)
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    for line in lines + [ln for ln in out.splitlines() if ln.strip()]:
        assert [r["run_id"] for r in json.loads(line)["runs"]] == [3, 2, 1]


# -- liveness ---------------------------------------------------------------------------------
def _zombie():
    """A child killed and not yet reaped."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p.kill()
    time.sleep(0.3)
    return p


@pytest.mark.parametrize("case", ["self", "self-reused-pid", "exited", "zombie",
                                  "other-host", "other-host-stale", "no-pid"])
def test_which_processes_count_as_alive(case):
    from datetime import timedelta
    pid, host, started = procs.identity()
    t = now()
    child = None
    if case == "self":
        args, expect = (pid, host, started), True
    elif case == "self-reused-pid":  # the pid, since given to another process
        args, expect = (pid, host, "1"), False
    elif case == "exited":
        p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
        args, expect = (int(p.stdout), host, None), False
    elif case == "zombie":
        child = _zombie()
        args, expect = (child.pid, host, None), False
    elif case == "other-host":
        args, expect = (1, "elsewhere", None, t - timedelta(minutes=5)), True
    elif case == "other-host-stale":
        args, expect = (1, "elsewhere", None, t - timedelta(seconds=procs.STALE_AFTER + 1)), \
            False
    else:
        args, expect = (None, host, None), False
    try:
        assert procs.alive(*args, now=t) is expect
    finally:
        if child is not None:
            child.wait()


def test_media_tmp_files_of_live_processes_are_kept(tmp_path):
    from ultracurate.workspace import remove_dead_files
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    mine = tmp_path / f"{procs.tag()}~x.part"
    other_host = tmp_path / f"elsewhere~{os.getpid()}~1~x.part"
    dead = tmp_path / f"{procs.tag().split('~')[0]}~{int(gone.stdout)}~0~x.part"
    untagged = tmp_path / "0123abcd.part"
    for p in (mine, other_host, dead, untagged):
        p.write_bytes(b"x")
    assert remove_dead_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name])
