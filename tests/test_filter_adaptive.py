"""Adaptive candidate rounds: the scheme comparison on known scores, and the real loop
(generate -> score -> filter per round) with tiny models."""

from __future__ import annotations

import pytest

from ultracurate.models import make_tiny
from ultracurate.runner import run
from ultracurate.stages.adaptive import compare_schemes
from ultracurate.thresholds import Thresholds

from _scoring import add_candidates, set_scores

GOOD = dict(clip_sim_source=0.3, clip_sim_target=0.3, clip_sim_dir=0.3, clip_sim_image=0.8,
            dinov2_sim=0.6, ssim=0.7, l1=0.05, l2=0.01)
BAD = dict(GOOD, clip_sim_dir=0.0)


def test_compare_fixed_and_adaptive_schemes(ingested_ws):
    ws = ingested_ws
    c = add_candidates(ws, n_edits=3, per_edit=30, modes=("free",), size=16)
    ids = c["candidate_id"].to_list()
    a, b, d = ids[:30], ids[30:60], ids[60:]
    scores = {cid: dict(GOOD) for cid in a}                        # all pass
    scores |= {cid: dict(GOOD if 20 <= i < 24 else BAD) for i, cid in enumerate(b)}
    scores |= {cid: dict(GOOD if i < 2 else BAD) for i, cid in enumerate(d)}  # only 2 pass
    set_scores(ws, scores)
    out = compare_schemes(ws, until_accepted=4, max_candidates=30, round_size=8)
    assert out["edits"] == 3
    assert out["fixed"] == {"generated": 90, "succeeded": 2, "candidates_per_success": 45.0,
                            "mean_kept_clip_sim_dir": pytest.approx(0.3)}
    # adaptive: A stops after round 1 (8), B after round 3 (24), C runs to 30 and fails
    assert out["adaptive"]["generated"] == 8 + 24 + 30
    assert out["adaptive"]["succeeded"] == 2
    assert out["adaptive"]["candidates_per_success"] == 31.0


def test_run_adaptive_generates_in_rounds(ingested_ws, tiny_dir):
    make_tiny(tiny_dir, ("editor", "clip", "dino"))
    ws = ingested_ws
    add_candidates(ws, n_edits=2, per_edit=0, modes=("free",))
    # tiny random models: loose thresholds so that candidates pass (scores are meaningless)
    loose = Thresholds.preset().override(clip_sim_image_min=-1, clip_sim_dir_min=-1,
                                         clip_min=-1, dinov2_sim_min=-1)
    res = run(ws, "adaptive", until_accepted=2, max_candidates=6, round_size=3,
              thresholds=loose, generate={"size": 64}, progress=False).result
    assert res.edits == 2 and res.succeeded == 2
    assert res.rounds == [{"candidates": 3, "open_edits": 2, "closed": 2}]
    assert res.generated == 6 and res.candidates_per_success == 3.0
    with ws.catalog() as cat:
        rows = cat.query("SELECT edit_id, status, reject_reasons FROM candidates_v "
                         "ORDER BY candidate_id")
    assert [r["status"] for r in rows].count("accepted") == 4
    assert all(r["reject_reasons"] in (None, ["not in top 2 by clip_sim_dir"]) for r in rows)
    # a threshold nothing passes: every round runs, up to max_candidates
    strict = Thresholds.preset().override(clip_sim_dir_min=1.0)
    res = run(ws, "adaptive", until_accepted=2, max_candidates=6, round_size=3,
              thresholds=strict, generate={"size": 64}, progress=False).result
    assert [r["candidates"] for r in res.rounds] == [3, 6] and res.succeeded == 0
    assert res.generated == 12


def test_generate_until_accepted_from_the_cli(ingested_ws, tiny_dir):
    """`generate --until-accepted K --max-candidates M` runs the rounds: with UltraEdit's
    thresholds nothing made by random tiny models passes, so every open edit gets rounds of
    --round-size until --max-candidates, and the catalog shows it."""
    import json
    import os
    import subprocess
    import sys
    make_tiny(tiny_dir, ("editor", "clip", "dino"))
    ws = ingested_ws
    add_candidates(ws, n_edits=2, per_edit=0, modes=("free",))
    env = dict(os.environ, ULTRACURATE_WORKSPACE=str(ws.root), ULTRACURATE_PROGRESS="0")
    res = subprocess.run([sys.executable, "-m", "ultracurate.cli", "generate",
                          "--until-accepted", "2", "--max-candidates", "4", "--round-size", "2",
                          "--size", "64", "--json"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["edits"] == 2 and [r["candidates"] for r in out["rounds"]] == [2, 4]
    with ws.catalog(read_only=True) as cat:
        per_edit = dict(cat.con.execute(
            "SELECT edit_id, count(*) FROM candidates WHERE edited_image IS NOT NULL "
            "GROUP BY ALL").fetchall())
        statuses = {r[0] for r in cat.con.execute(
            "SELECT DISTINCT auto_status FROM candidates").fetchall()}
    assert sorted(per_edit.values()) == [4, 4] and out["generated"] == 8
    assert statuses <= {"accepted", "rejected"}
    bad = subprocess.run([sys.executable, "-m", "ultracurate.cli", "generate",
                          "--until-accepted", "5", "--max-candidates", "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: adaptive rounds need")
