"""Import of UltraEdit's published parquet layout: anchors, edits, candidates with the published
scores and masks; resumable; bad rows recorded; an export round-trips through it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from _snapshot import catalog_rows
from ultracurate.errors import UltracurateError
from ultracurate.importers.ultraedit import guess_edit_type, is_ultraedit_layout
from ultracurate.masks import decode
from ultracurate.runner import run
from ultracurate.selection import Selection
from ultracurate.workspace import Workspace


def import_ultraedit(ws, paths, limit=None, **kw):
    """The import stage over paths (limit: the first rows of the files)."""
    return run(ws, "import-ultraedit", Selection(limit=limit), paths=paths, **kw)


def _jpeg(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", quality=95)
    return b.getvalue()


def _png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


SCORE_COLUMNS = ("clip_sim_source", "clip_sim_target", "clip_sim_dir", "clip_sim_image",
                 "dinov2_sim", "ssim")


def published_schema(region: bool):
    """The hub's schema: `datasets` features; in the free-form dataset edit_object and
    mask_image are typed null (no value in any row)."""
    import datasets
    import pyarrow as pa
    feats = datasets.Features({
        "idx": datasets.Value("int64"), "source_caption": datasets.Value("string"),
        "target_caption": datasets.Value("string"), "edit_prompt": datasets.Value("string"),
        "source_image": datasets.Image(), "edited_image": datasets.Image(),
        "edit_object": datasets.Value("string"), "mask_image": datasets.Image(),
        **{s: datasets.Value("float64") for s in SCORE_COLUMNS}})
    schema = feats.arrow_schema
    if not region:
        for name in ("edit_object", "mask_image"):
            schema = schema.set(schema.get_field_index(name), pa.field(name, pa.null()))
    return schema


def write_published(folder, n_free=5, n_region=3, bad_row=None, repeat=None):
    """UltraEdit's published layout under folder: the free-form dataset (UltraEdit/data/
    FreeForm_0-0000K-of-0000N.parquet) and the region-based one, a separate dataset
    (UltraEdit_Region_Based_100k/data/RegionBase-0000K-of-0000N.parquet), chunks of three rows
    in small row groups. bad_row: that row's source image is not an image. repeat: that row is
    written a second time, right after itself, in the same file (a repeated idx)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    facts = {}
    rows = {"FreeForm_0": [], "RegionBase": []}
    for i in range(n_free + n_region):
        split = "FreeForm_0" if i < n_free else "RegionBase"
        src = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        ed = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        mask = None
        if split == "RegionBase":
            m = np.zeros((48, 64), bool)
            m[5:20 + i, 10:40] = True
            mask = m
        src_b = _jpeg(src) if i != bad_row else b"not an image"
        row = {
            "idx": 100 + i, "source_caption": f"a photo {i}", "target_caption": f"a photo {i}!",
            "edit_prompt": ["Add a hat", "Replace the dog with a cat", "Make it blue",
                            "Turn the car into a boat"][i % 4],
            "source_image": {"bytes": src_b, "path": None},
            "edited_image": {"bytes": _jpeg(ed), "path": None},
            "edit_object": "the hat" if mask is not None else None,
            "mask_image": ({"bytes": _png(Image.fromarray(mask.astype(np.uint8) * 255)),
                            "path": None} if mask is not None else None),
            "clip_sim_source": 0.3, "clip_sim_target": 0.31, "clip_sim_dir": 0.2 + i / 100,
            "clip_sim_image": 0.8, "dinov2_sim": 0.7, "ssim": 0.5}
        rows[split] += [row, row] if i == repeat else [row]
        facts[100 + i] = {"split": split, "src": src_b, "ed": row["edited_image"]["bytes"],
                          "mask": mask, "dir": 0.2 + i / 100}
    for split, rs in rows.items():
        data = folder / ("UltraEdit" if split.startswith("FreeForm") else
                         "UltraEdit_Region_Based_100k") / "data"
        data.mkdir(parents=True)
        chunks = [rs[k:k + 3] for k in range(0, len(rs), 3)]
        for k, chunk in enumerate(chunks):
            t = pa.Table.from_pylist(chunk, schema=published_schema(split == "RegionBase"))
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
    # the two done rows and the rejected one are skipped
    assert (s2.rows_in, s2.rows_done, s2.rows_failed) == (5, 5, 0)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM edits") == 7
        assert cat.scalar("SELECT count(DISTINCT external_id) FROM edits") == 7
        rejects = cat.query("SELECT * FROM ingest_rejects")
    assert len(rejects) == 1
    assert rejects[0]["source_path"].endswith("FreeForm_0-00000-of-00002.parquet#1")
    assert "source_image" in rejects[0]["reason"] and len(rejects[0]["sha256"]) == 64


# -- idempotency: a row is one edit, whatever the runs and files it comes in -------------------
def test_a_second_import_of_the_published_layout_changes_nothing(ws, tmp_path):
    """The published layout with a repeated idx and a corrupt row: 8 distinct rows in 9, one
    of them corrupt."""
    write_published(tmp_path / "pub", repeat=1, bad_row=3)
    s1 = import_ultraedit(ws, [tmp_path / "pub"], progress=False, batch_size=2)
    assert (s1.rows_in, s1.rows_done, s1.rows_failed) == (8, 7, 1)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM edits") == 7
        assert cat.scalar("SELECT count(DISTINCT external_id) FROM candidates_v") == 7
        assert cat.scalar("SELECT count(*) FROM candidates") == 7
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 1
    before = catalog_rows(ws)
    assert before["edits"] and before["ingest_rejects"] and before["media files"]
    s2 = import_ultraedit(ws, [tmp_path / "pub"], progress=False, batch_size=2)
    assert (s2.rows_in, s2.rows_done, s2.rows_failed) == (0, 0, 0)
    assert catalog_rows(ws) == before


def _rewrite(path, change):
    """Rewrite a parquet chunk's rows through change(rows) -> rows, same schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = pq.read_table(path)
    pq.write_table(pa.Table.from_pylist(change(t.to_pylist()), schema=t.schema), path,
                   row_group_size=2)


FREE_0 = "pub/UltraEdit/data/FreeForm_0-00000-of-00002.parquet"   # idx 100, 101, 102
FREE_1 = "pub/UltraEdit/data/FreeForm_0-00001-of-00002.parquet"   # idx 103, 104


def _corrupt_copy_first(tmp):
    """idx 101 twice in a row: a corrupt copy, then the good one."""
    def change(rows):
        bad = {**rows[1], "source_image": {"bytes": b"broken", "path": None}}
        return rows[:1] + [bad] + rows[1:]
    _rewrite(tmp / FREE_0, change)


def _fix_corrupt_row(tmp):
    """The corrupt row (idx 103, FREE_1's first) gets real image bytes."""
    def change(rows):
        return [{**rows[0], "source_image": rows[1]["source_image"]}] + rows[1:]
    _rewrite(tmp / FREE_1, change)


def _null_idx(tmp):
    """Free-form chunks whose idx is null in every row."""
    for f in (tmp / "pub/UltraEdit/data").glob("*.parquet"):
        _rewrite(f, lambda rows: [{**r, "idx": None} for r in rows])


def _drop_idx(tmp):
    """Free-form chunks without an idx column: row numbers restart in every chunk."""
    import pyarrow.parquet as pq
    for f in (tmp / "pub/UltraEdit/data").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop(["idx"]), f, row_group_size=2)


def _copy_download(tmp):
    import shutil
    shutil.copytree(tmp / "pub", tmp / "pub2")


# Each case: how the published files are made (write_published's options, then a change), and
# the runs: (paths relative to tmp_path, --force, run from tmp_path with relative paths, what
# to do to the files first, (rows_in, rows_done, rows_failed)). Then the edits and rejects the
# catalog holds; then the last run again must change no table.
CASES = {
    "repeated idx in one file": (dict(repeat=1), None, [
        (["pub"], False, False, None, (8, 8, 0))], 8, 0),
    "a corrupt row": (dict(bad_row=3), None, [
        (["pub"], False, False, None, (8, 7, 1))], 7, 1),
    "a file and its folder in one call": ({}, None, [
        (["pub", FREE_0], False, False, None, (8, 8, 0))], 8, 0),
    "the same chunks in a second download": ({}, None, [
        (["pub"], False, False, None, (8, 8, 0)),
        (["pub2"], False, False, _copy_download, (0, 0, 0))], 8, 0),
    "a relative path from another folder": (dict(bad_row=3), None, [
        (["pub"], False, False, None, (8, 7, 1)),
        (["pub"], False, True, None, (0, 0, 0))], 7, 1),
    "re-ingest with --force": (dict(bad_row=3, repeat=1), None, [
        (["pub"], False, False, None, (8, 7, 1)),
        (["pub"], True, False, None, (1, 0, 1))], 7, 1),
    "a corrupt copy of an idx, then a good one": ({}, _corrupt_copy_first, [
        (["pub"], False, False, None, (8, 7, 1)),
        (["pub"], False, False, None, (1, 1, 0))], 8, 1),
    "both copies of a repeated idx corrupt": (dict(repeat=3, bad_row=3), None, [
        (["pub"], False, False, None, (8, 7, 1)),
        (["pub"], False, False, None, (1, 0, 1))], 7, 2),
    "a fixed file, retried with --force": (dict(bad_row=3), None, [
        (["pub"], False, False, None, (8, 7, 1)),
        (["pub"], False, False, _fix_corrupt_row, (0, 0, 0)),
        (["pub"], True, False, None, (1, 1, 0))], 8, 1),
    "chunks without an idx column": ({}, _drop_idx, [
        (["pub"], False, False, None, (8, 8, 0))], 8, 0),
    "chunks whose idx is null": ({}, _null_idx, [
        (["pub"], False, False, None, (8, 8, 0))], 8, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_is_idempotent(ws, tmp_path, monkeypatch, case):
    options, change, runs, n_edits, n_rejects = CASES[case]
    write_published(tmp_path / "pub", **options)
    if change:
        change(tmp_path)
    for paths, force, relative, before, want in runs:
        if before:
            before(tmp_path)
        if relative:
            monkeypatch.chdir(tmp_path)
        s = import_ultraedit(ws, [p if relative else tmp_path / p for p in paths], force=force,
                             progress=False, batch_size=2)
        assert (s.rows_in, s.rows_done, s.rows_failed) == want, (paths, force)
        monkeypatch.chdir(ws.root.parent)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM edits") == n_edits
        assert cat.scalar("SELECT count(DISTINCT external_id) FROM edits") == n_edits
        assert cat.scalar("SELECT count(*) FROM candidates") == n_edits
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == n_rejects
    snapshot = catalog_rows(ws)
    paths, force, relative, _, _ = runs[-1]
    if relative:
        monkeypatch.chdir(tmp_path)
    again = import_ultraedit(ws, [p if relative else tmp_path / p for p in paths], force=force,
                             progress=False, batch_size=2)
    assert again.rows_done == 0
    assert catalog_rows(ws) == snapshot


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
