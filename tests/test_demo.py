"""The main job: `ultracurate demo` runs every stage on the bundled photos with tiny models (some
photos ingested without captions, captioned by the tiny captioner) and ends in a loadable
Hugging Face export and an HTML report."""

import json
import os
import subprocess
import sys

import pytest

from ultracurate.demo import DEMO_UNCAPTIONED, format_demo, run_demo
from ultracurate.errors import UltracurateError
from ultracurate.workspace import Workspace


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    """Through the CLI, as a user runs it: with --json, stdout is the JSON of every step and
    nothing else; stderr only the demo's own narration (`== ...`), whatever the libraries
    under it print; the text summary names what a person looks at next."""
    import datasets
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-c", "from ultracurate.cli import main; main()",
                          "demo", str(out), "--json"], capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, ULTRACURATE_PROGRESS="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads(res.stdout)
    assert [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("== ")] \
        == [], res.stderr[-3000:]
    summary = format_demo(steps)
    assert f"export: {steps['export']['rows']} rows (hf) in {out}" in summary
    assert f"report: {out}" in summary and len(summary.splitlines()) <= 8
    for stage in ("ingest", "caption", "instruct", "ground", "classify_masks", "score"):
        assert steps[stage]["state"] == "completed" and steps[stage]["rows_failed"] == 0, stage
    # photos ingested without captions got theirs from the tiny captioner ...
    assert steps["ingest"]["anchors_without_caption"] == len(DEMO_UNCAPTIONED)
    assert steps["caption"]["rows_done"] == steps["caption"]["captions_added"] == \
        len(DEMO_UNCAPTIONED)
    assert steps["caption"]["anchors_without_caption"] == 0
    assert steps["generate"]["rows_done"] > 0
    ws = Workspace(out)
    with ws.catalog(read_only=True) as cat:
        counts = dict(cat.con.execute("SELECT status, count(*) FROM candidates_v "
                                      "GROUP BY ALL").fetchall())
        types = cat.scalar("SELECT count(DISTINCT edit_type) FROM edits")
        stages = {r[0] for r in cat.con.execute("SELECT DISTINCT stage FROM runs").fetchall()}
        # ... and flow through the whole pipeline: their model captions became edits whose
        # candidates were generated, scored and decided by the filter
        flow = cat.query(
            "SELECT a.external_id, c.caption, c.model, c.prompt, count(DISTINCT e.edit_id) AS "
            "edits, count(cv.candidate_id) FILTER (WHERE cv.status IN ('accepted', "
            "'rejected')) AS decided FROM anchors a JOIN anchor_captions c USING (anchor_id) "
            "JOIN edits e ON e.anchor_id = a.anchor_id AND e.source_caption = c.caption "
            "LEFT JOIN candidates_v cv ON cv.edit_id = e.edit_id "
            "WHERE c.source = 'caption:captioner' GROUP BY ALL ORDER BY 1")
    assert sorted(r["external_id"] for r in flow) == sorted(DEMO_UNCAPTIONED)
    for r in flow:
        assert r["edits"] == 2 and r["decided"] > 0, r
        assert r["model"].endswith("models/tiny/captioner")
        assert r["prompt"] == "caption-v1+grammar:tiny-caption"
    assert counts.get("accepted", 0) > 0 and counts.get("rejected", 0) > 0  # the filter decided
    assert types == 9
    assert {"ingest", "caption", "instruct", "ground", "classify-masks", "generate", "score",
            "filter", "judge", "chain", "balance", "dedup", "review", "export"} <= stages
    # the tiny judge rated the rows CLIP passed (JSON under its grammar); chains grew 3-turn
    # sessions, exported in MagicBrush's layout beside their flat rows
    assert steps["judge"]["rows_done"] == steps["judge"]["judged"] > 0
    assert steps["judge"]["rows_failed"] == 0
    assert steps["chain"]["by_length"].get("3", 0) > 0  # JSON: keys are text
    assert steps["export_sessions"]["sessions"] == steps["chain"]["by_length"]
    assert (out / "exports" / "sessions" / "sessions" / "edit_sessions.json").exists()
    ds = datasets.load_dataset(str(out / "exports" / "hf"))
    rows = sum(len(split) for split in ds.values())
    assert rows == steps["export"]["rows"] > 0
    split = next(iter(ds.values()))
    assert {"source_caption", "target_caption", "edit_prompt", "source_image", "edited_image",
            "clip_sim_dir", "dinov2_sim", "ssim"} <= set(split.column_names)
    assert split[0]["edited_image"].size[0] > 0
    html = (out / "reports" / "report.html").read_text()
    assert "Acceptance funnel" in html and "data:image/png;base64" in html
    with pytest.raises(UltracurateError, match="--force"):
        run_demo(out, progress=False)
