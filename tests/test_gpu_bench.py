"""bench/gpu.sh, the one device call that runs the generate, score and ground benchmarks, run
as CI can: SMOKE=1 on the CPU, in interpreters that import only what the device machine has
(the distributions of its image, bench/device-image.txt, and the wheels the call carries,
bench/device-wheels.txt): no DuckDB, polars or LanceDB."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheels_module():
    spec = importlib.util.spec_from_file_location("bench_wheels", ROOT / "bench" / "wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def device_env(tmp_path: Path) -> dict:
    """The environment of an interpreter that finds only the device's modules and
    distributions (and the standard library): tests/_device_site/sitecustomize.py hides the
    rest."""
    w = _wheels_module()
    dists = set(w.names(ROOT / "bench" / "device-image.txt"))
    dists |= set(w.names(ROOT / "bench" / "device-wheels.txt"))
    dists.add("ultracurate")
    modules = {"ultracurate"}
    for top, of in importlib.metadata.packages_distributions().items():
        if any(w.norm(d) in dists for d in of):
            modules.add(top)
    only = tmp_path / "device-only.json"
    only.write_text(json.dumps({"modules": sorted(modules), "distributions": sorted(dists)}))
    return dict(os.environ, UC_DEVICE_ONLY=str(only),
                PYTHONPATH=str(ROOT / "tests" / "_device_site"))


# module -> importable on the device (the catalog's packages, and modules that import them,
# are not; the stages' compute and the model loaders are)
IMPORTS = {
    "duckdb": False, "polars": False, "lancedb": False, "lance": False,
    "ultracurate.catalog": False, "ultracurate.stages.score": False,
    "torch": True, "PIL": True,
    "ultracurate.generation": True, "ultracurate.scoring": True, "ultracurate.grounding": True,
    "ultracurate.models.editor": True, "ultracurate.models.clip": True,
    "ultracurate.models.dino": True, "ultracurate.models.grounding": True,
    "ultracurate.models.sam": True, "ultracurate.workspace": True,
}

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        out[name] = "ok"
    except ImportError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_the_device_interpreter_refuses_the_catalog_and_imports_the_compute(tmp_path):
    """The blocker really blocks (the catalog's packages, installed here, cannot be imported,
    nor modules that need them), and the stages' compute imports without them."""
    for name in ("duckdb", "polars", "lancedb"):
        assert importlib.util.find_spec(name) is not None, f"{name} is not installed here"
    r = subprocess.run([sys.executable, "-c", PROBE, *IMPORTS], env=device_env(tmp_path),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for name, importable in IMPORTS.items():
        if importable:
            assert got[name] == "ok", (name, got[name])
        else:
            assert got[name].startswith("No module named"), (name, got[name])


def test_gpu_sh_smoke_runs_every_benchmark_where_only_the_device_packages_are(tmp_path):
    out = tmp_path / "out"
    env = dict(device_env(tmp_path), SMOKE="1", OUT=str(out), PY=sys.executable)
    r = subprocess.run(["bash", "bench/gpu.sh"], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    logs = {p.name: p.read_text()[-3000:] for p in out.glob("*.log")}
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], logs)
    for name in ("generate", "score", "ground"):
        assert f"== {name}:" in r.stdout and f"   exit 0 (log: {out}/{name}.log)" in r.stdout
    gen = json.loads((out / "generate.json").read_text())
    assert gen["pairs"] == 2 and gen["pairs_per_s"] > 0 and gen["stock_pairs_per_s"] > 0
    assert gen["one_pair_per_call_pairs_per_s"] > 0
    score = json.loads((out / "score.json").read_text())
    assert score["path"] == "scorer, no catalog"
    assert score["batched_pairs"] == 4 and score["naive_pairs"] == 2
    assert score["batched_pairs_per_s"] > 0 and score["naive_pairs_per_s"] > 0
    # the batched compute gives the naive loop's scores
    assert score["max_abs_score_diff_batched_vs_naive"] < 1e-4
    ground = json.loads((out / "ground.json").read_text())
    assert ground["batched_anchors_per_s"] > 0 and ground["one_at_a_time_anchors_per_s"] > 0
    assert ground["max_abs_mask_area_diff"] < 1e-3
    assert "pairs/s" in logs["generate.log"] and "pairs/s" in logs["score.log"]
    assert "anchors/s" in logs["ground.log"]


def test_gpu_sh_exits_1_and_names_the_benchmarks_that_failed(tmp_path):
    """A benchmark that fails (here: an interpreter that exits 1) fails the call."""
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu.sh"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=dict(os.environ, SMOKE="1", OUT=str(out), PY="false"))
    assert r.returncode == 1
    assert "FAILED: generate score ground" in r.stdout
    assert r.stdout.count("   exit 1 (log:") == 3
