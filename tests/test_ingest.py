"""Ingest of real photos and of the bad-input corpus: every bad file is recorded with a one-line
reason naming it, usable odd formats are converted and say so, nothing is half-written."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from _snapshot import catalog_rows
from ultracurate.errors import UltracurateError
from ultracurate.images import load_rgb
from ultracurate.runner import run
from ultracurate.stages.ingest import IngestStage, discover


def _ingest(ws, paths, **kw):
    return run(ws, IngestStage(items=discover(paths), **kw), progress=False)


@pytest.fixture
def corpus(tmp_path, demo_photos):
    """A folder of good photos in awkward formats and bad files, with a captions table."""
    d = tmp_path / "corpus"
    d.mkdir()
    photo = Image.open(demo_photos.parent / "chelsea.jpg")
    photo.save(d / "plain.jpg", quality=90)
    # EXIF orientation 6: stored landscape, shown portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(d / "rotated.jpg", exif=exif)
    photo.convert("CMYK").save(d / "cmyk.jpg")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    arr16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(d / "sixteen.png")
    assert Image.open(d / "sixteen.png").mode.startswith("I")
    # bad ones
    (d / "zero.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image")
    good = (demo_photos.parent / "coffee.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    # a decompression bomb: 20000 x 20000 pixels, tiny on disk
    Image.new("1", (20000, 20000)).save(d / "bomb.png")
    assert (d / "bomb.png").stat().st_size < 200_000
    # the same bytes twice: one anchor
    (d / "z_copy_of_plain.jpg").write_bytes((d / "plain.jpg").read_bytes())
    # a symbolic link whose target is gone, and one that points at itself
    (d / "dangling.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    table = tmp_path / "table.jsonl"
    rows = [{"path": str(d / "plain.jpg"), "caption": "a cat"},
            {"path": str(tmp_path / "missing.jpg"), "caption": "gone"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, table


def test_bad_input_corpus(ws, corpus):
    folder, table = corpus
    summary = _ingest(ws, [folder, table])
    with ws.catalog(read_only=True) as cat:
        anchors = {r["source_path"].split("/")[-1]: r for r in cat.query("SELECT * FROM anchors_v")}
        rejects = {r["source_path"].split("/")[-1]: r["reason"]
                   for r in cat.query("SELECT * FROM ingest_rejects")}
    assert set(anchors) == {"plain.jpg", "rotated.jpg", "cmyk.jpg", "palette.png",
                            "alpha.png", "sixteen.png"}
    assert set(rejects) == {"zero.jpg", "notes.png", "truncated.jpg", "garbage.jpg",
                            "bomb.png", "z_copy_of_plain.jpg", "missing.jpg",
                            "dangling.jpg", "loop.jpg"}
    for name, reason in rejects.items():
        assert name in reason and "\n" not in reason
        assert " at 0x" not in reason and "object" not in reason, reason
    assert rejects["dangling.jpg"].endswith("dangling.jpg: broken symbolic link")
    assert "loop.jpg: cannot read (" in rejects["loop.jpg"]
    # equal reasons group in `stats` (no per-process object address in them)
    from ultracurate.stats import catalog_stats
    with ws.catalog(read_only=True) as cat:
        by_reason = catalog_stats(cat)["ingest_reject_reasons"]
    assert by_reason["not a readable image (cannot identify image file)"] == 2
    assert "empty file" in rejects["zero.jpg"]
    assert "pixel limit" in rejects["bomb.png"]
    assert "file not found" in rejects["missing.jpg"]
    assert "duplicate of anchor" in rejects["z_copy_of_plain.jpg"]
    assert "not a readable image" in rejects["truncated.jpg"]
    # conversions are recorded, and load_rgb gives RGB of the recorded size
    assert anchors["rotated.jpg"]["conversion"] == "exif_transpose:6"
    assert (anchors["rotated.jpg"]["width"], anchors["rotated.jpg"]["height"]) == (300, 451)
    assert anchors["cmyk.jpg"]["conversion"] == "cmyk->rgb"
    assert anchors["palette.png"]["conversion"] == "p->rgb"
    assert anchors["alpha.png"]["conversion"].startswith("rgba->rgb")
    assert "->rgb" in anchors["sixteen.png"]["conversion"]
    assert anchors["plain.jpg"]["conversion"] == ""
    assert anchors["plain.jpg"]["captions"] == ["a cat"]  # folder file + table row: one item
    for a in anchors.values():
        im = load_rgb(ws.media.path(a["media"]))
        assert im.mode == "RGB" and im.size == (a["width"], a["height"])
    # 16-bit data is scaled, not clipped to white
    assert 30 < np.asarray(load_rgb(ws.media.path(anchors["sixteen.png"]["media"]))).mean() < 220
    assert summary.rows_in == 15 and summary.rows_failed == 9
    assert not list((ws.root / "media" / "tmp").glob("*"))


@pytest.mark.parametrize("force", [False, True])
def test_a_second_ingest_changes_nothing(ws, corpus, force):
    """A rerun skips every recorded source; a forced one looks at them all again and records
    nothing new: no file is a duplicate of its own anchor, no reject is recorded twice for the
    same bytes."""
    folder, table = corpus
    _ingest(ws, [folder, table])
    before = catalog_rows(ws)
    assert len(before["anchors"]) == 6 and len(before["ingest_rejects"]) == 9
    s = run(ws, IngestStage(items=discover([folder, table])), force=force, progress=False)
    assert s.rows_in == (15 if force else 0) and s.rows_failed == (9 if force else 0)
    assert catalog_rows(ws) == before


def test_a_fixed_file_is_ingested_by_a_forced_rerun(ws, corpus, demo_photos):
    folder, table = corpus
    _ingest(ws, [folder, table])
    (folder / "truncated.jpg").write_bytes((demo_photos.parent / "coffee.jpg").read_bytes())
    assert _ingest(ws, [folder, table]).rows_in == 0  # rejected sources wait for --force
    s = run(ws, IngestStage(items=discover([folder, table])), force=True, progress=False)
    assert s.rows_failed == 8  # the eight other bad files, the same bytes: no new reject rows
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors WHERE source_path LIKE "
                          "'%truncated.jpg'") == 1
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 9  # the old one stays


def test_captions_and_rerun_skips_what_was_done(ws, demo_photos):
    s1 = _ingest(ws, [demo_photos])
    s2 = _ingest(ws, [demo_photos])
    assert (s1.rows_done, s2.rows_in) == (9, 0)
    with ws.catalog(read_only=True) as cat:
        row = cat.query("SELECT * FROM anchors_v WHERE external_id = 'astronaut'")[0]
        assert len(row["captions"]) == 3 and "astronaut" in row["captions"][0]
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'ingest'") == 2
        assert cat.scalar("SELECT count(DISTINCT sha256) FROM anchors") == 9


def test_coco_captions_json(ws, demo_photos, tmp_path):
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        (coco / "images" / name).write_bytes((demo_photos.parent / name).read_bytes())
    doc = {"images": [{"id": 11, "file_name": "chelsea.jpg"}, {"id": 12, "file_name": "coffee.jpg"}],
           "annotations": [{"image_id": 11, "caption": "a cat"},
                           {"image_id": 11, "caption": "an orange cat "},
                           {"image_id": 12, "caption": "a cup"}]}
    (coco / "captions_val.json").write_text(json.dumps(doc))
    _ingest(ws, [coco / "captions_val.json"])
    with ws.catalog(read_only=True) as cat:
        rows = {r["external_id"]: r["captions"] for r in cat.query("SELECT * FROM anchors_v")}
    assert rows == {"11": ["a cat", "an orange cat"], "12": ["a cup"]}


def test_hf_dataset_folder_and_parquet(ws, demo_photos, tmp_path):
    import datasets
    buf = io.BytesIO()
    Image.open(demo_photos.parent / "rocket.jpg").save(buf, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}], "caption": ["a rocket"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    s = _ingest(ws, [tmp_path / "hf", tmp_path / "rows.parquet"])
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors") == 1  # same bytes twice
        assert cat.query("SELECT captions FROM anchors_v")[0]["captions"] == ["a rocket"]
    assert s.rows_in == 2


def test_missing_source_is_a_clear_error(ws, tmp_path):
    with pytest.raises(UltracurateError, match="no such file"):
        discover([tmp_path / "nope"])


@pytest.mark.parametrize("error, reason", [
    (OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>"),
     "cannot identify image file"),
    (ValueError("bad <function load at 0x7f00deadbeef> value"), "bad <function load> value"),
    (RuntimeError("first line\nsecond line"), "first line"),
    (RuntimeError("\n\n  late first line  \n"), "late first line"),
    (ValueError(), "ValueError"),
    ("x" * 600, "x" * 497 + "..."),
    ("already clean", "already clean"),
])
def test_reason_text(error, reason):
    from ultracurate.errors import reason_text
    assert reason_text(error) == reason


def test_reason_text_typed():
    from ultracurate.errors import reason_text
    assert reason_text(ValueError("at <_io.BytesIO object at 0x1234abcd>"), typed=True) == \
        "ValueError: at"
