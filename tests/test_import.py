"""Import of UltraEdit's published parquet layout: anchors, edits, candidates with the published
scores and masks; resumable; bad rows recorded; an export round-trips through it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ultracurate.errors import UltracurateError
from ultracurate.importers.ultraedit import guess_edit_type, import_ultraedit, is_ultraedit_layout
from ultracurate.masks import decode
from ultracurate.workspace import Workspace


def _jpeg(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=95)
    return b.getvalue()


def _png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def write_published(folder, n_free=5, n_region=3, bad_row=None):
    """Chunks named as on the hub (<split>-NNNNN-of-NNNNN.parquet), written with `datasets`
    features and small row groups, in the published schema."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    feats = datasets.Features({
        "idx": datasets.Value("int64"), "source_caption": datasets.Value("string"),
        "target_caption": datasets.Value("string"), "edit_prompt": datasets.Value("string"),
        "source_image": datasets.Image(), "edited_image": datasets.Image(),
        "edit_object": datasets.Value("string"), "mask_image": datasets.Image(),
        **{s: datasets.Value("float64") for s in ("clip_sim_source", "clip_sim_target",
                                                   "clip_sim_dir", "clip_sim_image",
                                                   "dinov2_sim", "ssim")}})
    rng = np.random.default_rng(0)
    facts = {}
    rows = {"FreeForm_0": [], "RegionBased": []}
    for i in range(n_free + n_region):
        split = "FreeForm_0" if i < n_free else "RegionBased"
        src = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        ed = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        mask = None
        if split == "RegionBased":
            m = np.zeros((48, 64), bool)
            m[5:20 + i, 10:40] = True
            mask = m
        src_b = _jpeg(src) if i != bad_row else b"not an image"
        rows[split].append({
            "idx": 100 + i, "source_caption": f"a photo {i}", "target_caption": f"a photo {i}!",
            "edit_prompt": ["Add a hat", "Replace the dog with a cat", "Make it blue",
                            "Turn the car into a boat"][i % 4],
            "source_image": {"bytes": src_b, "path": None},
            "edited_image": {"bytes": _jpeg(ed), "path": None},
            "edit_object": "the hat" if mask is not None else None,
            "mask_image": ({"bytes": _png(Image.fromarray(mask.astype(np.uint8) * 255)),
                            "path": None} if mask is not None else None),
            "clip_sim_source": 0.3, "clip_sim_target": 0.31, "clip_sim_dir": 0.2 + i / 100,
            "clip_sim_image": 0.8, "dinov2_sim": 0.7, "ssim": 0.5})
        facts[100 + i] = {"split": split, "src": src_b, "ed": rows[split][-1]["edited_image"]["bytes"],
                          "mask": mask, "dir": 0.2 + i / 100}
    data = folder / "data"
    data.mkdir(parents=True)
    for split, rs in rows.items():
        chunks = [rs[:3], rs[3:]] if len(rs) > 3 else [rs]
        for k, chunk in enumerate(chunks):
            t = pa.Table.from_pylist(chunk, schema=feats.arrow_schema)
            pq.write_table(t, data / f"{split}-{k:05d}-of-{len(chunks):05d}.parquet",
                           row_group_size=2)
    return facts


def test_import_published_layout(ws, tmp_path):
    facts = write_published(tmp_path / "UltraEdit")
    assert is_ultraedit_layout(tmp_path / "UltraEdit")
    s = import_ultraedit(ws, [tmp_path / "UltraEdit"], progress=False, batch_size=3)
    assert (s.rows_done, s.rows_failed) == (8, 0)
    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT * FROM candidates_v ORDER BY candidate_id")
    assert len(rows) == 8
    for r in rows:
        idx = json.loads(r["gen_params"])["idx"]
        f = facts[idx]
        assert r["external_id"] == f"ultraedit:{f['split']}:{idx}"
        assert ws.media.path(r["source_image"]).read_bytes() == f["src"]
        assert ws.media.path(r["edited_image"]).read_bytes() == f["ed"]
        assert r["source_image"] == r["anchor_media"] and r["dataset"] == f"ultraedit:{f['split']}"
        assert r["clip_sim_dir"] == pytest.approx(f["dir"])
        assert r["auto_status"] == "scored" and r["instruction"]
        if f["mask"] is None:
            assert r["mode"] == "free" and r["mask_rle"] is None and r["edit_object"] == "NONE"
        else:
            assert r["mode"] == "region" and r["edit_object"] == "the hat"
            assert np.array_equal(decode(r["mask_rle"], r["mask_height"], r["mask_width"]),
                                  f["mask"])
            assert r["mask_area"] == pytest.approx(f["mask"].mean())
    assert {r["edit_type"] for r in rows} == {"add", "replace", "change_color", "turn"}


def test_import_resumes_and_records_bad_rows(ws, tmp_path):
    write_published(tmp_path / "u", bad_row=1)
    s1 = import_ultraedit(ws, [tmp_path / "u"], limit=3, progress=False, batch_size=2)
    assert s1.rows_in == 3 and s1.rows_failed == 1 and s1.rows_done == 2
    s2 = import_ultraedit(ws, [tmp_path / "u"], progress=False)
    # the bad row is tried again (not an edit), the two done rows are skipped
    assert s2.rows_in == 6 and s2.rows_done == 5 and s2.rows_failed == 1
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM edits") == 7
        assert cat.scalar("SELECT count(DISTINCT external_id) FROM edits") == 7
        reasons = [r[0] for r in cat.con.execute("SELECT reason FROM ingest_rejects").fetchall()]
    assert len(reasons) == 2 and all("#1" in x and "source_image" in x for x in reasons)


def test_export_round_trips_through_import(tmp_path, ingested_ws, tiny_dir):
    """What ultracurate exports is the published layout: importing it back gives the same
    rows, bytes, masks and scores."""
    import test_export
    from ultracurate.export import export_dataset
    facts = test_export.add_candidates(ingested_ws)
    export_dataset(ingested_ws, None, tmp_path / "hf", progress=False, shard_size=3)
    ws2 = Workspace.init(tmp_path / "ws2", {"models": {"profile": "tiny",
                                                       "tiny_dir": str(tiny_dir)}})
    s = import_ultraedit(ws2, [tmp_path / "hf"], progress=False)
    assert s.rows_done == 16
    with ws2.catalog(read_only=True) as cat:
        rows = cat.query("SELECT * FROM candidates_v")
    for r in rows:
        cid = json.loads(r["gen_params"])["idx"]
        f = facts[cid]
        assert r["edited_image"] == f["edited"] and r["mode"] == f["mode"]
        assert r["clip_sim_dir"] == pytest.approx(0.25 + cid / 1000)
        if f["mode"] == "region":
            assert np.array_equal(decode(r["mask_rle"], r["mask_height"], r["mask_width"]),
                                  f["mask"])


def test_cli_ingest_routes_published_layout(ws, tmp_path):
    from typer.testing import CliRunner
    from ultracurate.cli import app
    write_published(tmp_path / "pub", n_free=2, n_region=1)
    r = CliRunner().invoke(app, ["ingest", "-w", str(ws.root), "--json", str(tmp_path / "pub")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["rows_done"] == 3
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM candidates WHERE auto_status = 'scored'") == 3


def test_not_the_layout(ws, tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"junk")
    with pytest.raises(UltracurateError, match="not UltraEdit's published parquet layout"):
        import_ultraedit(ws, [tmp_path / "x.parquet"], progress=False)


@pytest.mark.parametrize("text,obj,want", [
    ("Add a red hat to the man", "hat", "add"),
    ("Replace the dog with a cat", "dog", "replace"),
    ("Turn the car into a boat", "car", "turn"),
    ("Make the sky purple", "sky", "change_color"),
    ("Make it look like a watercolor painting", None, "change_global"),
    ("Move the cup to the left", "cup", "transform_local"),
    ("Change the shirt to a sweater", "shirt", "change_local"),
    ("What if there were two of them?", None, "others"),
])
def test_guess_edit_type(text, obj, want):
    assert guess_edit_type(text, obj) == want
