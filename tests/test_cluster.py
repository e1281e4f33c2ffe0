"""The Ray engine on a real multi-node cluster (`ray.cluster_utils.Cluster`, two nodes of one
CPU each on this machine), with the tiny editor on the demo's photos: replicas spread over
both nodes, a node lost mid-run with the job finished on the survivor and the catalog
complete, and a placement the cluster cannot meet refused in one line within the timeout."""

from __future__ import annotations

import json
import re

import pytest

from _clirun import one_line_error, run_many
from _s3 import CREDENTIALS, endpoint, objects, use_bucket  # noqa: F401 (a fixture)
from test_generate_stage import add_edits
from ultracurate.errors import UltracurateError
from ultracurate.models import make_tiny
from ultracurate.runner import RayEngine, run
from ultracurate.selection import Selection
from ultracurate.stages.ingest import IngestStage, discover

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def _cluster():
    """A head and one worker node, one CPU each: a replica asking for one CPU fits once per
    node, so two replicas must land on both. Started once for the module."""
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                      "include_dashboard": False})
    c.worker = None
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


@pytest.fixture
def cluster(_cluster):
    """The module's cluster with its two nodes (a test that lost the worker node gets a new
    one)."""
    if _cluster.worker is None or _cluster.worker not in _cluster.list_all_nodes():
        _cluster.worker = _cluster.add_node(num_cpus=1)
    _cluster.wait_for_nodes()
    yield _cluster
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def edits_ws(ingested_ws):
    return ingested_ws, add_edits(ingested_ws)


@pytest.fixture
def bucket_ws(ws, demo_photos, endpoint, monkeypatch):
    """A workspace whose media store is a bucket: the replicas on both nodes read anchors
    from it and write candidates to it (credentials from the driver's environment)."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    use_bucket(ws, endpoint, "cluster")
    run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    return ws, add_edits(ws)


class LoseNodeAfterFirstBatch(RayEngine):
    """The real engine; once the first batch has come back (and been committed), the worker
    node is removed from the cluster, taking its replica and the batches in flight on it.
    With batch size 1 there are more batches than in flight (2 per replica), so the lost
    replica is always found: a batch in flight on it, or the next one sent to it, fails."""

    def __init__(self, cluster, **kw):
        super().__init__(**kw)
        self.cluster, self.removed = cluster, None

    def map(self, stage, batches, ctx, stop=None):
        for item in super().map(stage, batches, ctx, stop):
            yield item
            if self.removed is None:
                self.removed = self.cluster.worker.node_id
                self.cluster.remove_node(self.cluster.worker)


def _workers(ws, run_id) -> dict:
    with ws.catalog(read_only=True) as cat:
        return json.loads(cat.scalar("SELECT workers FROM runs WHERE run_id = ?", [run_id]))


FREE = Selection(where="mode = 'free'")   # two edits of the demo: 8 candidates at 4 each


def test_generate_then_score_spread_over_both_nodes_and_each_survives_losing_one(
        bucket_ws, cluster, endpoint):
    """generate, then score, each on two replicas (one per node), each losing the worker node
    after its first batch (a new worker node joins between the two)."""
    ws, ids = bucket_ws
    make_tiny(ws.section("models")["tiny_dir"], ("clip", "dino"))
    for stage in ("generate", "score"):
        if cluster.worker not in cluster.list_all_nodes():
            cluster.worker = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
        engine = LoseNodeAfterFirstBatch(cluster, address=cluster.address, num_workers=2,
                                         num_cpus_per_worker=1)
        options = {"candidates": 4, "size": 64, "pairs_per_call": 1} if stage == "generate" \
            else {}
        out = run(ws, stage, FREE, engine=engine, batch_size=1, progress=False, **options)
        assert out.state == "completed"
        assert out.rows_in == 8 and out.rows_done == 8 and out.rows_failed == 0
        with ws.catalog(read_only=True) as cat:
            rows = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
            marks = cat.query("SELECT key, state FROM stage_state WHERE stage = ?", [stage])
        # every row computed exactly once, none missing, none twice
        assert len(rows) == 8
        assert len({(r["edit_id"], r["candidate_index"]) for r in rows}) == 8
        if stage == "generate":
            assert all(r["auto_status"] == "generated" for r in rows)
            keys = set(objects(endpoint, "cluster"))
            assert all(f"media/{r[c][:2]}/{r[c]}" in keys for r in rows
                       for c in ("source_image", "edited_image"))
        else:
            assert all(r["auto_status"] == "scored" and r["score_run"] == out.run_id
                       and r["clip_sim_dir"] is not None and r["ssim"] is not None
                       for r in rows)
        assert sorted(m["key"] for m in marks) == sorted(r["candidate_id"] for r in rows)
        assert {m["state"] for m in marks} == {"done"}
        placed = _workers(ws, out.run_id)
        # the two replicas started on the two nodes, one of them the node that was lost
        assert len(set(placed["placed"])) == 2 and engine.removed in placed["placed"]
        assert placed["lost"] == 1 and placed["retried"] >= 1
        assert sum(placed["nodes"].values()) == 8   # batches, by the node that computed them
        assert any("lost" in n for n in out.extra["notes"])


def test_a_placement_the_cluster_cannot_meet_fails_in_one_line(edits_ws, cluster):
    ws, _ = edits_ws
    ws.set_config("ray", {"placement_timeout": 3})
    res = run_many([["generate", "-w", str(ws.root), "--where", "mode = 'free'",
                     "--candidates", "1", "--size", "64", "--engine", "ray",
                     "--address", cluster.address, "--workers", "3",
                     "--cpus-per-worker", "1"]])[0]
    line = one_line_error(res, "cannot place 3 Ray replica(s) of CPU 1", "within 3 s",
                          "2 node(s) with CPU 2", "--workers")
    assert "traceback" not in res["stderr"].lower(), line
    with ws.catalog(read_only=True) as cat:
        state = cat.query("SELECT state, rows_done FROM runs WHERE stage = 'generate'")
        assert state == [{"state": "failed", "rows_done": 0}]
        assert cat.scalar("SELECT count(*) FROM candidates WHERE auto_status = 'generated'") == 0


def test_the_first_ctrl_c_ends_a_job_waiting_for_placement(edits_ws, cluster):
    """Three replicas on two one-CPU nodes: two start, the third waits (timeout 120 s). One
    SIGINT, sent once the two hold both CPUs, ends the job at once: exit 130, one line, the
    run recorded as interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    ws, _ = edits_ws
    ws.set_config("ray", {"placement_timeout": 120})
    env = dict(os.environ, ULTRACURATE_PROGRESS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ultracurate.cli", "generate", "-w", str(ws.root), "--where",
         "mode = 'free'", "--candidates", "1", "--size", "64", "--engine", "ray",
         "--address", cluster.address, "--workers", "3", "--cpus-per-worker", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        deadline = time.monotonic() + 90
        while ray.available_resources().get("CPU", 0) > 0 and proc.poll() is None:
            assert time.monotonic() < deadline, "the two replicas never started"
            time.sleep(0.5)
        ray.shutdown()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert lines[-1].startswith("error: generate interrupted"), err
    assert "Traceback" not in err
    with ws.catalog(read_only=True) as cat:
        assert cat.query("SELECT state FROM runs WHERE stage = 'generate'") == [
            {"state": "interrupted"}]


def test_a_worker_running_other_code_is_one_clear_error(edits_ws, cluster, tmp_path,
                                                        monkeypatch):
    """The workers get another copy of the package (one comment added): their code differs
    from the driver's, and the job says so before any row is computed."""
    import shutil

    import ultracurate
    import ultracurate.runner as runner
    other = tmp_path / "other" / "ultracurate"
    shutil.copytree(ultracurate.__path__[0], other,
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "names.py", "a") as f:
        f.write("# a change the driver does not have\n")
    monkeypatch.setattr(runner, "_package_dir", lambda: str(other))
    # Ray puts the driver's working directory first on the workers' sys.path: not the
    # checkout, whose package would shadow the shipped one
    monkeypatch.chdir(tmp_path)
    ws, _ = edits_ws
    engine = RayEngine(address=cluster.address, num_workers=1, num_cpus_per_worker=1)
    with pytest.raises(UltracurateError) as e:
        run(ws, "generate", FREE, candidates=1, size=64, engine=engine, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "runs ultracurate" in msg and runner.code_digest() in msg
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT rows_done FROM runs WHERE stage = 'generate'") == 0


@pytest.mark.parametrize("kw, fragment", [
    ({"engine": "local", "workers": 2}, "--workers 2 needs --engine ray"),
    ({"engine": "ray", "config": {"placement_timout": 5}},
     "[ray] placement_timout: unknown setting"),
    ({"engine": "ray", "config": {"placement_timeout": 0}},
     "[ray] placement_timeout must be a number of seconds > 0"),
    ({"engine": "ray", "config": {"retries": -1}}, "[ray] retries must be a whole number >= 0"),
    ({"engine": "spark"}, "unknown engine 'spark'"),
])
def test_engine_settings_are_checked(kw, fragment):
    from ultracurate.runner import make_engine
    with pytest.raises(UltracurateError, match=re.escape(fragment)):
        make_engine(**kw)


def test_a_replica_whose_models_do_not_load_fails_the_job_in_one_line(edits_ws, cluster,
                                                                      tmp_path):
    """A replica's models load on its first batch; when they cannot (here the editor's
    checkpoint folder does not exist), every batch would fail the same way: the job stops
    with the loader's own reason, once, naming the node."""
    ws, _ = edits_ws
    ws.set_config("models", {"editor": str(tmp_path / "no-editor")})
    engine = RayEngine(address=cluster.address, num_workers=1, num_cpus_per_worker=1)
    with pytest.raises(UltracurateError) as e:
        run(ws, "generate", FREE, candidates=1, size=64, engine=engine, progress=False)
    msg = str(e.value)
    assert msg.startswith("Ray worker failed on node ") and "\n" not in msg
    assert "no-editor" in msg and "ray::" not in msg, msg
    with ws.catalog(read_only=True) as cat:
        assert cat.query("SELECT state, rows_done FROM runs WHERE stage = 'generate'") == [
            {"state": "failed", "rows_done": 0}]


class ReplaceNodeAfterFirstBatch(RayEngine):
    """The real engine, its one replica pinned by a custom resource to a node that has it;
    after the first batch that node goes and another with the resource joins."""

    def __init__(self, cluster, node, **kw):
        super().__init__(**kw)
        self.cluster, self.node, self.nodes = cluster, node, [node.node_id]

    def map(self, stage, batches, ctx, stop=None):
        for item in super().map(stage, batches, ctx, stop):
            yield item
            if len(self.nodes) == 1:
                self.cluster.remove_node(self.node)
                self.node = self.cluster.add_node(num_cpus=1, resources={"uc_pin": 1})
                self.nodes.append(self.node.node_id)


def test_a_lost_replica_is_replaced_when_the_cluster_has_room(edits_ws, cluster):
    """One replica, on the only node with the resource it asks for; that node is lost after
    the first batch and a new one joins: the job waits for the replacement (none is left
    meanwhile) and finishes every row on it."""
    ws, _ = edits_ws
    pinned = cluster.add_node(num_cpus=1, resources={"uc_pin": 1})
    cluster.wait_for_nodes()
    engine = ReplaceNodeAfterFirstBatch(cluster, pinned, address=cluster.address,
                                        num_workers=1, num_cpus_per_worker=1,
                                        resources_per_worker={"uc_pin": 1})
    try:
        out = run(ws, "generate", FREE, candidates=2, size=64, pairs_per_call=1,
                  engine=engine, batch_size=1, progress=False)
    finally:
        cluster.remove_node(engine.node)
    assert out.rows_in == 4 and out.rows_done == 4 and out.rows_failed == 0
    workers = _workers(ws, out.run_id)
    assert workers["placed"] == engine.nodes      # the first replica, then its replacement
    assert workers["lost"] == 1 and workers["spec"]["uc_pin"] == 1
    assert workers["nodes"] == {engine.nodes[0]: 1, engine.nodes[1]: 3}
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(DISTINCT candidate_id) FROM candidates "
                          "WHERE auto_status = 'generated'") == 4


ROW_COMMANDS = [["caption"], ["instruct"], ["ground"], ["classify-masks"],
                ["generate", "--size", "64"], ["score"], ["judge"], ["dedup"]]


def test_every_row_stage_command_passes_workers_to_the_engine(ingested_ws):
    """--workers reaches the engine from every command that runs a row stage (dedup: its
    anchors' embedding pass): with the local engine, more than one is refused in one line."""
    ws = ingested_ws
    make_tiny(ws.section("models")["tiny_dir"], ("judge",))  # judge plans before it runs
    results = run_many([[*cmd, "-w", str(ws.root), "--workers", "2", "--cpus-per-worker", "1"]
                        for cmd in ROW_COMMANDS])
    for cmd, res in zip(ROW_COMMANDS, results):
        if cmd == ["judge"]:   # judge says on stderr first what it would request
            res = {**res, "stderr": res["stderr"].splitlines()[-1]}
        one_line_error(res, "--workers 2 needs --engine ray", code=1)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage <> 'ingest'") == 0
