"""The CPU benchmarks the issues' figures come from still run (their figures are theirs to
print: no timing is asserted here), on the smallest input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
