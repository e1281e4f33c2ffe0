"""Export: the hf layout loads with `datasets` as train (and validation) and carries the media
bytes unchanged; one vocabulary across hf / jsonl / ip2p / wds, each read as its trainer reads
it; shards and splits; the published UltraEdit layout; a truthful card; the CLI."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ultracurate.errors import UltracurateError
from ultracurate.names import EXPORT_FORMATS as FORMATS
from ultracurate.export import (PUBLISHED_COLUMNS, ExportOptions, column_names,
                                export_dataset, hf_features)
from ultracurate.masks import encode
from ultracurate.selection import Selection

from _exports import by_idx, read_export

EDIT_TYPES = ("add", "replace", "change_color", "turn")


def add_candidates(ws, n_anchors: int = 4, statuses=("accepted", "accepted", "rejected")) -> dict:
    """Insert one free-form and one region edit per anchor, and a candidate per status for each,
    with real images in the media store (edited = the anchor mirrored, as JPEG) and a
    rectangular region mask. Returns {candidate_id: row facts} for the tests to compare with."""
    facts = {}
    with ws.catalog() as cat:
        anchors = cat.query("SELECT anchor_id, media, width, height, captions FROM anchors_v "
                            f"ORDER BY anchor_id LIMIT {n_anchors}")
        edits, cands = [], []
        eid = cid = 1
        for a in anchors:
            src = Image.open(ws.media.path(a["media"])).convert("RGB").resize((96, 64))
            buf = io.BytesIO()
            src.save(buf, format="JPEG", quality=90)
            src_name = ws.media.put_bytes(buf.getvalue(), "jpg")
            for mode in ("free", "region"):
                et = EDIT_TYPES[eid % len(EDIT_TYPES)]
                mask = np.zeros((64, 96), bool)
                mask[10:40, 20:70] = True
                edits.append({
                    "edit_id": eid, "anchor_id": a["anchor_id"],
                    "source_caption": a["captions"][0], "instruction": f"make edit {eid}",
                    "target_caption": f"{a['captions'][0]} edited {eid}",
                    "edit_object": "the thing" if mode == "region" else "NONE",
                    "edit_type": et, "mode": mode, "edit_status": "grounded",
                    "mask_rle": encode(mask) if mode == "region" else None,
                    "mask_height": 64 if mode == "region" else None,
                    "mask_width": 96 if mode == "region" else None,
                    "mask_class": "fine" if mode == "region" else None})
                for k, status in enumerate(statuses):
                    edited = src.transpose(Image.FLIP_LEFT_RIGHT).rotate(k * 5 + eid)
                    b = io.BytesIO()
                    edited.save(b, format="PNG" if k % 2 else "JPEG")
                    ed_name = ws.media.put_bytes(b.getvalue(), "png" if k % 2 else "jpg")
                    cands.append({"candidate_id": cid, "edit_id": eid, "candidate_index": k,
                                  "seed": 1000 + cid, "source_image": src_name,
                                  "edited_image": ed_name, "source_is_anchor": False,
                                  "clip_sim_source": 0.3, "clip_sim_target": 0.31,
                                  "clip_sim_dir": 0.25 + cid / 1000, "clip_sim_image": 0.8,
                                  "dinov2_sim": 0.7, "ssim": 0.5, "l1": 0.1, "l2": 0.02,
                                  "auto_status": status,
                                  "gen_params": json.dumps({"strength": 0.6, "steps": 3})})
                    facts[cid] = {"mode": mode, "status": status, "edit_type": et,
                                  "source": src_name, "edited": ed_name, "mask": mask,
                                  "edit_id": eid}
                    cid += 1
                eid += 1
        cat.con.execute("BEGIN")
        cat.edits.insert(pl.DataFrame(edits))
        cat.candidates.insert(pl.DataFrame(cands))
        cat.con.execute("COMMIT")
    return facts


@pytest.fixture
def cand_ws(ingested_ws):
    return ingested_ws, add_candidates(ingested_ws)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def cand_ws(ingested_ws):
    return ingested_ws, add_candidates(ingested_ws)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _accepted(facts):
    return {c: f for c, f in facts.items() if f["status"] == "accepted"}


def test_hf_export_loads_as_train_and_keeps_bytes(cand_ws, tmp_path):
    import datasets
    import pyarrow.parquet as pq
    ws, facts = cand_ws
    out = tmp_path / "out"
    s = export_dataset(ws, Selection(), out, "hf", shard_size=3, progress=False)
    accepted = _accepted(facts)
    assert s.rows == len(accepted) == 16 and s.splits == {"train": 16}
    assert sorted(p.relative_to(out).as_posix() for p in (out / "data").rglob("*.parquet")) == [
        f"data/{mode}/train-0000{i}-of-00003.parquet"
        for mode in ("free_form", "region_based") for i in range(3)]

    # bytes are the media store's, untouched (sha256 = media name)
    t = pq.read_table(out / "data" / "free_form" / "train-00000-of-00003.parquet")
    assert t.num_rows == 3
    for im in t.column("edited_image").to_pylist():
        assert _sha(im["bytes"]) == im["path"].split(".")[0]

    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train"}  # what diffusers' InstructPix2Pix script reads
    assert ds["train"].column_names == list(PUBLISHED_COLUMNS)
    assert isinstance(ds["train"].features["source_image"], datasets.Image)
    assert ds["train"].features["ssim"].dtype == "float64"
    for row in ds["train"]:
        f = facts[row["idx"]]
        assert f["status"] == "accepted"
        assert row["edited_image"].size == (96, 64)
        if f["mode"] == "region":
            assert np.array_equal(np.asarray(row["mask_image"]) > 0, f["mask"])
            assert row["edit_object"] == "the thing"
        else:
            assert row["mask_image"] is None and row["edit_object"] is None
    assert sorted(ds["train"]["idx"]) == sorted(accepted)
    # one mode per config
    region = datasets.load_dataset(str(out), "region_based")["train"]
    assert sorted(region["idx"]) == sorted(c for c, f in accepted.items()
                                           if f["mode"] == "region")


def test_hf_extra_columns_and_selection(cand_ws, tmp_path):
    import datasets
    ws, facts = cand_ws
    out = tmp_path / "sel"
    s = export_dataset(ws, Selection("mode = $m AND candidate_index = 0", {"m": "region"}), out,
                       extra_columns=True, progress=False)
    assert s.splits == {"train": 4}
    ds = datasets.load_dataset(str(out))["train"]
    for row in ds:
        f = facts[row["candidate_id"]]
        assert row["edit_type"] == f["edit_type"] and row["mask_class"] == "fine"
        assert row["seed"] == 1000 + row["candidate_id"]
        assert json.loads(row["gen_params"])["strength"] == 0.6


def test_default_selection_is_the_balanced_deduplicated_set(cand_ws, tmp_path):
    ws, facts = cand_ws
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET selected = false WHERE candidate_id = 1")
        cat.con.execute("UPDATE candidates SET duplicate_of = 1 WHERE candidate_id = 2")
        cat.con.execute("UPDATE candidates SET selected = true WHERE candidate_id = 4")
        cat.con.execute("UPDATE candidates SET human_decision = 'accept' WHERE candidate_id = 6")
        # the second anchor is a near-duplicate of the first: its candidates are left out
        dup_anchor = cat.scalar("SELECT anchor_id FROM edits WHERE edit_id = 3")
        first_anchor = cat.scalar("SELECT anchor_id FROM edits WHERE edit_id = 1")
        cat.con.execute("UPDATE anchors SET duplicate_of = ? WHERE anchor_id = ?",
                        [first_anchor, dup_anchor])
    s = export_dataset(ws, None, tmp_path / "o", "jsonl", progress=False)
    ids = {r["idx"] for r in by_idx(read_export(tmp_path / "o", "jsonl")).values()}
    want = ({c for c, f in _accepted(facts).items() if f["edit_id"] not in (3, 4)} - {1, 2}
            | {6})
    assert ids == want and s.rows == len(want)


def test_counts_per_edit_type_in_card(cand_ws, tmp_path):
    ws, facts = cand_ws
    with ws.catalog() as cat:
        run = cat.start_run("filter", {"min_clip_dir": 0.22, "top_k": 4}, None,
                            {"clip": "ViT-L-14:openai"})
        cat.end_run(run, "completed")
        cat.con.execute("UPDATE candidates SET filter_run = ?", [run])
    s = export_dataset(ws, None, tmp_path / "o", progress=False)
    want: dict = {}
    for f in _accepted(facts).values():
        want[f["edit_type"]] = want.get(f["edit_type"], 0) + 1
    assert s.edit_types == {"train": dict(sorted(want.items()))}
    card = (tmp_path / "o" / "README.md").read_text()
    for t, n in want.items():
        assert f"| {t} | {n} | {n} |" in card
    assert "### filter (run" in card and '"min_clip_dir": 0.22' in card
    assert "| filter | clip | `ViT-L-14:openai` |" in card


def test_missing_media_leaves_nothing(cand_ws, tmp_path):
    ws, facts = cand_ws
    victim = max(_accepted(facts))
    ws.media.path(facts[victim]["edited"]).unlink()
    # content-addressed media: the first accepted candidate using that file is named
    first = min(c for c, f in _accepted(facts).items() if f["edited"] == facts[victim]["edited"])
    out = tmp_path / "out"
    for fmt in ("hf", "jsonl", "ip2p", "wds"):
        with pytest.raises(UltracurateError) as e:
            export_dataset(ws, None, out, fmt, progress=False)
        assert f"candidate {first}:" in str(e.value) and facts[victim]["edited"] in str(e.value)
        assert "\n" not in str(e.value)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [tmp_path / "ws"]  # no hidden partial folder
    with ws.catalog(read_only=True) as cat:
        runs = cat.query("SELECT state, message FROM runs WHERE stage = 'export'")
    assert [r["state"] for r in runs] == ["failed"] * 4
    assert all(f"candidate {first}:" in r["message"] for r in runs)


def test_existing_out_needs_overwrite_and_survives_failure(cand_ws, tmp_path):
    ws, facts = cand_ws
    out = tmp_path / "out"
    export_dataset(ws, Selection("mode = 'free'"), out, "jsonl", progress=False)
    before = (out / "train-00000-of-00001.jsonl").read_text()
    with pytest.raises(UltracurateError, match="already exists"):
        export_dataset(ws, None, out, "jsonl", progress=False)
    victim = max(c for c, f in _accepted(facts).items() if f["mode"] == "region")
    ws.media.path(facts[victim]["edited"]).unlink()
    with pytest.raises(UltracurateError):
        export_dataset(ws, None, out, "jsonl", overwrite=True, progress=False)
    assert (out / "train-00000-of-00001.jsonl").read_text() == before  # the old one is intact
    s = export_dataset(ws, Selection("mode = 'free'"), out, "hf", overwrite=True, progress=False)
    assert s.rows == 12 and not list(out.glob("*.jsonl"))  # rejected too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ws"]


def test_one_vocabulary_in_every_format(cand_ws, tmp_path):
    """Every format, read the way its trainer reads it, has the same columns with the same
    values and the same image bytes (ip2p's .jpg files aside, which must be JPEG)."""
    ws, facts = cand_ws
    opts = dict(soft_masks=True, extra_columns=True, progress=False)
    want_cols = column_names(ExportOptions(soft_masks=True, extra_columns=True))
    got = {}
    for fmt in FORMATS:
        export_dataset(ws, None, tmp_path / fmt, fmt, **opts)
        got[fmt] = by_idx(read_export(tmp_path / fmt, fmt))
    assert all(set(g) == set(_accepted(facts)) for g in got.values())
    for idx, ref in got["hf"].items():
        f = facts[idx]
        assert ref["edit_prompt"] == f"make edit {f['edit_id']}"
        assert ref["edited_image"] == ws.media.path(f["edited"]).read_bytes()
        for fmt in ("jsonl", "wds", "ip2p"):
            row = got[fmt][idx]
            assert set(want_cols) <= set(row), fmt
            for c in want_cols:
                if fmt == "ip2p" and c in ("source_image", "edited_image"):
                    assert Image.open(io.BytesIO(row[c])).format == "JPEG"
                    continue
                assert row[c] == ref[c], (fmt, c)
        assert got["ip2p"][idx]["_prompt"] == {
            "input": ref["source_caption"], "edit": ref["edit_prompt"],
            "output": ref["target_caption"], "edit_object": ref["edit_object"]}


@pytest.mark.parametrize("fmt,pattern,per_split", [
    ("hf", "data/*/train-*.parquet", {"free_form": 3, "region_based": 3}),
    ("jsonl", "train-*.jsonl", {"": 4}),
    ("wds", "train-*.tar", {"": 4}),
])
def test_shard_size_applies_to_every_sharded_format(cand_ws, tmp_path, fmt, pattern, per_split):
    ws, _ = cand_ws
    out = tmp_path / fmt
    export_dataset(ws, None, out, fmt, shard_size=3 if fmt == "hf" else 5, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.glob(pattern))
    assert len(files) == sum(per_split.values())
    for group, n in per_split.items():
        mine = [p for p in files if group in p]
        assert [p.rsplit("/", 1)[-1].split(".")[0] for p in mine] == [
            f"train-{i:05d}-of-{n:05d}" for i in range(n)]
    assert sum(len(r) for r in read_export(out, fmt).values()) == 16


@pytest.mark.parametrize("fmt", FORMATS)
def test_validation_split_is_cut_by_anchor(cand_ws, tmp_path, fmt):
    ws, facts = cand_ws
    with ws.catalog() as cat:  # a near-duplicate anchor goes with its original
        a = [r[0] for r in cat.con.execute("SELECT DISTINCT anchor_id FROM edits "
                                           "ORDER BY 1").fetchall()]
        cat.con.execute("UPDATE anchors SET duplicate_of = ? WHERE anchor_id = ?", [a[0], a[1]])
    out = tmp_path / fmt
    sel = Selection("status = 'accepted'")  # keep the duplicate's rows in this export
    s = export_dataset(ws, sel, out, fmt, val_fraction=0.25, seed=3, progress=False)
    splits = read_export(out, fmt)
    assert set(splits) == {"train", "validation"} and s.splits == {
        k: len(v) for k, v in splits.items()}
    with ws.catalog(read_only=True) as cat:
        anchor = dict(cat.con.execute("SELECT candidate_id, anchor_id FROM candidates_v")
                      .fetchall())
    anchors = {k: {anchor[r["idx"]] for r in v} for k, v in splits.items()}
    assert not anchors["train"] & anchors["validation"]
    assert {a[0], a[1]} <= anchors["train"] or {a[0], a[1]} <= anchors["validation"]
    assert 0 < len(splits["validation"]) < 16
    again = export_dataset(ws, sel, tmp_path / "again", fmt, val_fraction=0.25, seed=3,
                           progress=False)
    assert again.splits == s.splits  # seeded


def test_ultraedit_layout(cand_ws, tmp_path, tiny_dir):
    """The published layout: the free-form dataset's splits FreeForm_0..N (edit_object and
    mask_image typed null) and the region subset as its own dataset with split RegionBase;
    published column order; and ultracurate's importer reads it back."""
    import datasets
    import pyarrow.parquet as pq

    from ultracurate.runner import run
    from ultracurate.workspace import Workspace
    ws, facts = cand_ws
    out = tmp_path / "ue"
    s = export_dataset(ws, None, out, "hf", layout="ultraedit", shard_size=3, progress=False)
    assert s.splits == {"FreeForm_0": 3, "FreeForm_1": 3, "FreeForm_2": 2, "RegionBase": 8}
    free, region = out / "UltraEdit", out / "UltraEdit_Region_Based_100k"
    assert sorted(p.name for p in (free / "data").iterdir()) == [
        f"FreeForm_{i}-00000-of-00001.parquet" for i in range(3)]
    assert sorted(p.name for p in (region / "data").iterdir()) == [
        f"RegionBase-{i:05d}-of-00003.parquet" for i in range(3)]
    schema = pq.read_schema(free / "data" / "FreeForm_0-00000-of-00001.parquet")
    assert schema.names == list(PUBLISHED_COLUMNS)
    assert str(schema.field("mask_image").type) == str(schema.field("edit_object").type) == "null"
    dfree = datasets.load_dataset(str(free))
    assert list(dfree) == ["FreeForm_0", "FreeForm_1", "FreeForm_2"]
    assert dfree["FreeForm_0"].features["mask_image"] == datasets.Value("null")
    dreg = datasets.load_dataset(str(region))
    assert list(dreg) == ["RegionBase"] and dreg["RegionBase"].column_names == list(
        PUBLISHED_COLUMNS)
    assert isinstance(dreg["RegionBase"].features["mask_image"], datasets.Image)
    ws2 = Workspace.init(tmp_path / "ws2", {"models": {"profile": "tiny",
                                                       "tiny_dir": str(tiny_dir)}})
    assert run(ws2, "import-ultraedit", paths=[out], progress=False).rows_done == 16
    with ws2.catalog(read_only=True) as cat:
        modes = dict(cat.con.execute("SELECT mode, count(*) FROM edits GROUP BY ALL").fetchall())
    assert modes == {"free": 8, "region": 8}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def test_card_tells_the_truth_and_validates(cand_ws, tmp_path, tiny_dir):
    """The card is huggingface_hub's DatasetCard with license, language and citation in its
    YAML; datasets reads its features and splits; the models are the runs' own (a tiny model
    is named so, never CLIP ViT-L/14); no local path is in the card or the data."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    from ultracurate.models import describe, make_tiny
    ws, facts = cand_ws
    make_tiny(tiny_dir, ("clip", "dino"))
    with ws.catalog() as cat:
        run = cat.start_run("score", {"batch": 8}, None, describe(ws, ("clip", "dino")))
        cat.end_run(run, "completed")
        cat.con.execute("UPDATE candidates SET score_run = ?, gen_params = ?",
                        [run, json.dumps({"source": "x", "file": str(tmp_path / "a.parquet")})])
    (tmp_path / "cite.bib").write_text("@misc{mine, title={My edits}}")
    out = tmp_path / "card"
    from ultracurate.cli import main
    main(["export", "-w", str(ws.root), "--license", "cc-by-4.0", "--language", "en,de",
          "--citation", str(tmp_path / "cite.bib"), "--extra-columns", "--val-fraction",
          "0.25", str(out)])
    card = DatasetCard.load(out / "README.md")
    assert isinstance(card.data, DatasetCardData)
    meta = card.data.to_dict()
    assert meta["license"] == "cc-by-4.0" and meta["language"] == ["en", "de"]
    assert meta["citation"] == "@misc{mine, title={My edits}}"
    assert "task_categories" in meta and meta["size_categories"] == ["n<1K"]
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    assert infos["default"].features == hf_features(extra_columns=True)
    assert {k: v.num_examples for k, v in infos["default"].splits.items()} == {
        k: len(v) for k, v in read_export(out, "hf").items()}
    assert DatasetCard(str(card)).data.to_dict() == meta  # round trip
    text = (out / "README.md").read_text()
    assert "tiny random-weight" in text and "ViT-L" not in text
    # no path of this machine, in the card or in any string of the data
    local = {str(tmp_path), str(ws.root), str(tiny_dir), str(Path.home())}
    assert not any(p in text for p in local)
    for row in by_idx(read_export(out, "hf")).values():
        for s in _strings({k: v for k, v in row.items() if not isinstance(v, bytes)}):
            assert not s.startswith("/") and not any(p in s for p in local), s
    assert json.loads(row["gen_params"])["file"] == "…/a.parquet"


def test_docs_table_lists_every_column_of_every_format(cand_ws, tmp_path):
    """docs/export.md's column table names every column each format writes."""
    ws, _ = cand_ws
    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    table = {}
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6:
            table[cells[0]] = dict(zip(FORMATS, cells[1:5]))
    for fmt in FORMATS:
        export_dataset(ws, None, tmp_path / fmt, fmt, soft_masks=True, extra_columns=True,
                       progress=False)
        cols = {c for r in by_idx(read_export(tmp_path / fmt, fmt)).values() for c in r
                if not c.startswith("_")}
        assert cols <= set(table), (fmt, cols - set(table))
        assert all(table[c][fmt] not in ("", "-") for c in cols), fmt


def test_push_to_hub_offline_is_one_line_error_and_keeps_export(cand_ws, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws, _ = cand_ws
    out = tmp_path / "hub"
    with pytest.raises(UltracurateError) as e:
        export_dataset(ws, None, out, push_to_hub="someone/data", progress=False)
    assert "someone/data" in str(e.value) and "\n" not in str(e.value)
    assert (out / "README.md").exists()


def test_cli_export(cand_ws, tmp_path):
    from typer.testing import CliRunner
    from ultracurate.cli import app, join_param_pairs
    ws, _ = cand_ws
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, join_param_pairs([
        "export", "-w", str(ws.root), "--where", "mode = :m AND status = 'accepted'",
        "-p", "m", "free",
        "--format", "hf", "--shard-size", "4", "--json", str(out)]))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["rows"] == 8 and data["splits"] == {"train": 8}
    assert len(list((out / "data" / "free_form").glob("train-*.parquet"))) == 2
    with ws.catalog(read_only=True) as cat:
        run = cat.query("SELECT * FROM runs WHERE stage = 'export'")[0]
    assert run["run_id"] == data["run_id"] and run["state"] == "completed"
    assert run["rows_done"] == 8 and json.loads(run["params"])["out"] == str(out)
