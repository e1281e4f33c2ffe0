"""The CPU benchmarks the issues' figures come from still run (their figures are theirs to
print: no timing is asserted here), on the smallest input."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generate_overlap_renders_the_same_pairs_with_and_without_writes(tmp_path):
    """bench/generate_overlap.py: the stage's rendering alone and the whole job (the runner,
    writes, commits) each render every planned pair."""
    env = dict(os.environ, ULTRACURATE_PROGRESS="0", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "bench/generate_overlap.py", "--size", "64",
                        "--edits", "2", "--candidates", "1", "--batch", "2", "--repeat", "1",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "generate_overlap.json").read_text())
    (run,) = out["runs"]
    assert run["render_only"][0] == run["with_writes"][0] == 2
    assert out["render_only_pairs_s"] > 0 and out["with_writes_pairs_s"] > 0
    assert "pairs/s" in r.stdout


def _bench(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """bench/<script> run as a person runs it, from the repository root; its temporary
    folders under tmp_path."""
    env = dict(os.environ, ULTRACURATE_PROGRESS="0", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _json(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name).read_text())


def _catalog(tmp_path, r):
    out = _json(tmp_path, "catalog-1000.json")
    assert set(out["ultracurate"]["seconds"]) >= {"stats", "where", "pending",
                                                  "pending_first_batch", "anchor_lookup",
                                                  "anchor_lookup_scan", "where_guard", "open"}
    # the script checks that pandas selects the same rows; they must be some
    assert out["ultracurate"]["where_rows"] == out["pandas"]["where_rows"] > 0
    assert out["ultracurate"]["pending_rows"] == out["pandas"]["pending_rows"] > 0


def _masks(tmp_path, r):
    classes = re.search(r"classes: (\{.*\}); fast == naive on the 50 sampled rows", r.stdout)
    assert classes, r.stdout
    assert sum(ast.literal_eval(classes.group(1)).values()) == 200


def _cluster(tmp_path, r):
    media = _json(tmp_path, "cluster.json")["media"]
    assert set(media) == {"folder", "s3 (moto)"}
    assert all(m["put_per_s"] > 0 and m["read_per_s"] > 0 for m in media.values())


def _http(part: dict, requests: int) -> None:
    """A back-end against the loopback server, 1 request at a time and 2 in flight: every
    answer valid, and the concurrent run had 2 requests in flight."""
    assert part["concurrency_1"]["valid"] == part["concurrency_2"]["valid"] == requests
    assert part["concurrency_2"].get("max_in_flight", 2) >= 2


def _caption(tmp_path, r):
    out = _json(tmp_path, "caption.json")
    _http(out["http"], 4)
    cat = out["catalog"]
    assert cat["captions"] == 5 * cat["anchors"] == 5000
    assert len(cat["where"]) == 5 and set(cat["merge_batch_16"]) == {
        "without_range_hint_s", "with_range_hint_s", "old_list_update_s"}


def _judge(tmp_path, r):
    out = _json(tmp_path, "judge.json")
    _http(out["http"], 4)
    assert out["stage"]["judged"] == out["stage"]["candidates"] == 4


def _instruct(tmp_path, r):
    out = _json(tmp_path, "instruct.json")
    assert out["rule"]["valid"] == out["rule"]["edits"] == 20
    _http(out["http"], 4)


def _export(tmp_path, r):
    import pyarrow.parquet as pq
    results = _json(tmp_path, "export.json")["results"]
    assert [x["method"] for x in results] == [
        "ultracurate hf", "ultracurate hf --soft-masks", "datasets from_dict (bytes)",
        "datasets from_dict (PIL, re-encoded)", "ultracurate jsonl", "ultracurate wds",
        "ultracurate ip2p"]
    outs = tmp_path / "keep" / "outs"
    for name in ("hf", "hfs", "ds_bytes", "ds_pil"):   # every timed export wrote every row
        assert sum(pq.read_metadata(f).num_rows for f in (outs / name).rglob("*.parquet")) == 4
    assert len((outs / "jsonl" / "train-00000-of-00001.jsonl").read_text().splitlines()) == 4


def _review(tmp_path, r):
    out = _json(tmp_path, "review.json")
    assert [(x["step"], x["groups_written"]) for x in out["results"]] == [
        ("full build", 4), ("no-op update", 0), ("1% changed", 1),
        ("full rebuild (baseline)", 4), ("pull 5% tagged", 1)]


# (script, its smallest input, what its figures must show). Not here: adaptive.py, live.py,
# cluster.py's node loss, caption/judge/instruct's local models, score.py --catalog (each
# 15-50 s on 2 cores); generate.py, score.py and masks.py --real run in tests/test_gpu_bench.py
BENCHES = [
    ("catalog.py", ["--rows", "1000"], _catalog),
    ("masks.py", ["--n", "200", "--naive-sample", "50", "--shape-sample", "100",
                  "--workers", "1"], _masks),
    ("cluster.py", ["--files", "4", "--kb", "4", "--skip-loss"], _cluster),
    ("caption.py", ["--skip", "local", "--photos", "2", "--requests", "4", "--concurrency", "2",
                    "--anchors", "1000"], _caption),
    ("judge.py", ["--skip", "local", "--pairs", "2", "--requests", "4", "--concurrency", "2"],
     _judge),
    ("instruct.py", ["--skip", "transformers", "--n", "20", "--requests", "4",
                     "--concurrency", "2"], _instruct),
    ("export.py", ["--rows", "4", "--size", "64", "--repeat", "1", "--keep", "{tmp}/keep"],
     _export),
    ("review.py", ["--rows", "4", "--size", "32"], _review),
]


@pytest.mark.parametrize("script, args, check", BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_measures_what_it_claims_on_its_smallest_input(tmp_path, script, args, check):
    r = _bench(tmp_path, script, *[a.format(tmp=tmp_path) for a in args],
               "--out", str(tmp_path / "out"))
    check(tmp_path, r)


def test_scale_and_guard_run_every_command_over_a_kept_catalog(tmp_path):
    """bench/scale.py builds a catalog and measures commands in children of their own (a
    child that fails is an exit 1, not a blank figure); bench/guard.py times the --where
    guard and scale.py's children over that catalog."""
    _bench(tmp_path, "scale.py", "--sizes", "40000", "--only", "stats,score",
           "--keep", str(tmp_path / "cat"), "--out", str(tmp_path / "out"))
    rows = _json(tmp_path, "scale-40000.json")["sizes"]["40000"]["commands"]
    assert set(rows) == {"stats", "score"}
    assert all(c["seconds"] > 0 and "error" not in c for c in rows.values())
    assert rows["score"]["rows"] > 0                  # the first batch of the pending rows
    r = _bench(tmp_path, "guard.py", "--ws", str(tmp_path / "cat" / "ws-40000"),
               "--repeat", "1")
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(figures) == 9 and {"select", "export --limit 100"} <= set(figures)
    assert all(wall > 0 and cpu > 0 for wall, cpu in figures.values())
