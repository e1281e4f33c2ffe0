"""Export: the hf parquet layout loads with `datasets` and carries the media bytes unchanged;
jsonl / ip2p / wds layouts; all-or-nothing on failure; the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ultracurate.errors import UltracurateError
from ultracurate.export import export_dataset
from ultracurate.masks import encode
from ultracurate.selection import Selection

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
        cat.insert_rows("edits", pl.DataFrame(edits))
        cat.insert_rows("candidates", pl.DataFrame(cands))
        cat.con.execute("COMMIT")
    return facts


@pytest.fixture
def cand_ws(ingested_ws):
    return ingested_ws, add_candidates(ingested_ws)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_hf_export_loads_with_datasets_and_keeps_bytes(cand_ws, tmp_path):
    import datasets
    import pyarrow.parquet as pq
    ws, facts = cand_ws
    out = tmp_path / "out"
    s = export_dataset(ws, Selection(), out, "hf", shard_size=3, progress=False)
    accepted = {c: f for c, f in facts.items() if f["status"] == "accepted"}
    assert s.rows == len(accepted) == 16
    assert s.splits == {"free_form": 8, "region_based": 8}
    shards = sorted(p.name for p in (out / "data").iterdir())
    assert shards[0] == "free_form-00000-of-00003.parquet" and len(shards) == 6

    # bytes are the media store's, untouched (sha256 = media name)
    t = pq.read_table(out / "data" / "free_form-00000-of-00003.parquet")
    assert t.num_rows == 3
    for im in t.column("edited_image").to_pylist():
        assert _sha(im["bytes"]) == im["path"].split(".")[0]

    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"free_form", "region_based"}
    assert ds["free_form"].column_names[:8] == [
        "idx", "source_caption", "target_caption", "edit_prompt", "source_image",
        "edited_image", "edit_object", "mask_image"]
    assert isinstance(ds["free_form"].features["source_image"], datasets.Image)
    assert ds["free_form"].features["ssim"].dtype == "float64"
    assert "edit_type" not in ds["free_form"].column_names
    reg = ds["region_based"]
    for row in reg:
        f = facts[row["idx"]]
        assert f["mode"] == "region" and f["status"] == "accepted"
        assert isinstance(row["edited_image"], Image.Image)
        assert row["edited_image"].size == (96, 64)
        assert np.array_equal(np.asarray(row["mask_image"]) > 0, f["mask"])
        assert row["edit_object"] == "the thing"
    for row in ds["free_form"]:
        assert row["mask_image"] is None and row["edit_object"] is None
    assert sorted(list(ds["free_form"]["idx"]) + list(reg["idx"])) == sorted(accepted)

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card and "dataset_info:" in card
    assert "| change_color |" in card or "| add |" in card
    assert "status = 'accepted' AND selected IS NOT FALSE" in card


def test_hf_extra_columns_and_selection(cand_ws, tmp_path):
    import datasets
    ws, facts = cand_ws
    out = tmp_path / "sel"
    s = export_dataset(ws, Selection("mode = $m AND candidate_index = 0", {"m": "region"}), out,
                       extra_columns=True, progress=False)
    assert s.splits == {"region_based": 4}
    ds = datasets.load_dataset(str(out))["region_based"]
    for row in ds:
        f = facts[row["candidate_id"]]
        assert row["edit_type"] == f["edit_type"] and row["mask_class"] == "fine"
        assert row["seed"] == 1000 + row["candidate_id"]
        assert json.loads(row["gen_params"])["strength"] == 0.6


def test_default_selection_skips_unbalanced_and_duplicates(cand_ws, tmp_path):
    ws, facts = cand_ws
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET selected = false WHERE candidate_id = 1")
        cat.con.execute("UPDATE candidates SET duplicate_of = 1 WHERE candidate_id = 2")
        cat.con.execute("UPDATE candidates SET selected = true WHERE candidate_id = 4")
        cat.con.execute("UPDATE candidates SET human_decision = 'accept' WHERE candidate_id = 6")
    s = export_dataset(ws, None, tmp_path / "o", "jsonl", progress=False)
    ids = {json.loads(x)["idx"] for x in (tmp_path / "o" / "train.jsonl").read_text().splitlines()}
    want = {c for c, f in facts.items() if f["status"] == "accepted"} - {1, 2} | {6}
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
    for f in facts.values():
        if f["status"] == "accepted":
            split = "free_form" if f["mode"] == "free" else "region_based"
            want.setdefault(split, {}).setdefault(f["edit_type"], 0)
            want[split][f["edit_type"]] += 1
    assert s.edit_types == want
    card = (tmp_path / "o" / "README.md").read_text()
    for t in want["free_form"]:
        row = f"| {t} | {want['free_form'].get(t, 0)} | {want['region_based'].get(t, 0)} |"
        assert row in card
    assert "### filter (run" in card and '"min_clip_dir": 0.22' in card
    assert "ViT-L-14:openai" in card


def test_missing_media_leaves_nothing(cand_ws, tmp_path):
    ws, facts = cand_ws
    victim = max(c for c, f in facts.items() if f["status"] == "accepted")
    ws.media.path(facts[victim]["edited"]).unlink()
    # content-addressed media: the first accepted candidate using that file is named
    first = min(c for c, f in facts.items()
                if f["status"] == "accepted" and f["edited"] == facts[victim]["edited"])
    out = tmp_path / "out"
    for fmt in ("hf", "jsonl", "ip2p", "wds"):
        with pytest.raises(UltracurateError) as e:
            export_dataset(ws, None, out, fmt, progress=False)
        assert f"candidate {first}:" in str(e.value) and facts[victim]["edited"] in str(e.value)
        assert "\n" not in str(e.value)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [tmp_path / "ws"]  # no hidden partial folder


def test_existing_out_needs_overwrite_and_survives_failure(cand_ws, tmp_path):
    ws, facts = cand_ws
    out = tmp_path / "out"
    export_dataset(ws, Selection("mode = 'free'"), out, "jsonl", progress=False)
    before = (out / "train.jsonl").read_text()
    with pytest.raises(UltracurateError, match="already exists"):
        export_dataset(ws, None, out, "jsonl", progress=False)
    victim = max(c for c, f in facts.items() if f["status"] == "accepted" and f["mode"] == "region")
    ws.media.path(facts[victim]["edited"]).unlink()
    with pytest.raises(UltracurateError):
        export_dataset(ws, None, out, "jsonl", overwrite=True, progress=False)
    assert (out / "train.jsonl").read_text() == before  # the old export is intact
    s = export_dataset(ws, Selection("mode = 'free'"), out, "hf", overwrite=True, progress=False)
    assert s.rows == 12 and not (out / "train.jsonl").exists()  # rejected too


def test_jsonl_mixes_modes_with_paths(cand_ws, tmp_path):
    ws, facts = cand_ws
    out = tmp_path / "j"
    export_dataset(ws, None, out, "jsonl", progress=False)
    recs = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in recs} == {"free", "region"} and len(recs) == 16
    for r in recs:
        f = facts[r["idx"]]
        assert (out / r["input_image"]).read_bytes() == ws.media.path(f["source"]).read_bytes()
        assert (out / r["output_image"]).read_bytes() == ws.media.path(f["edited"]).read_bytes()
        assert r["instruction"] == f"make edit {f['edit_id']}"
        if f["mode"] == "region":
            m = np.asarray(Image.open(out / r["mask_image"])) > 0
            assert np.array_equal(m, f["mask"])
        else:
            assert r["mask_image"] is None


def test_ip2p_layout(cand_ws, tmp_path):
    ws, facts = cand_ws
    out = tmp_path / "ip2p"
    export_dataset(ws, None, out, "ip2p", progress=False)
    seeds = json.loads((out / "seeds.json").read_text())
    assert sum(len(s) for _, s in seeds) == 16
    for name, ss in seeds:
        prompt = json.loads((out / name / "prompt.json").read_text())
        assert set(prompt) >= {"input", "edit", "output"}
        for seed in ss:
            f = facts[seed]
            assert prompt["edit"] == f"make edit {f['edit_id']}"
            im0 = Image.open(out / name / f"{seed}_0.jpg")
            im1 = Image.open(out / name / f"{seed}_1.jpg")
            assert im0.format == im1.format == "JPEG" and im1.size == (96, 64)
            assert (out / name / f"{seed}_mask.png").exists() == (f["mode"] == "region")


def test_wds_shards(cand_ws, tmp_path):
    import webdataset as wds
    ws, facts = cand_ws
    out = tmp_path / "w"
    export_dataset(ws, None, out, "wds", shard_size=5, progress=False)
    tars = sorted(out.glob("shard-*.tar"))
    assert len(tars) == 4
    with tarfile.open(tars[0]) as t:
        assert len({Path(n).name.split(".")[0] for n in t.getnames()}) == 5
    seen = 0
    for sample in wds.WebDataset([str(p) for p in tars], shardshuffle=False):
        meta = json.loads(sample["json"])
        f = facts[meta["idx"]]
        ed = next(v for k, v in sample.items() if k.startswith("edited."))
        assert ed == ws.media.path(f["edited"]).read_bytes()
        assert ("mask.png" in sample) == (f["mode"] == "region")
        seen += 1
    assert seen == 16


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
    data = json.loads(r.output)
    assert data["rows"] == 8 and data["splits"] == {"free_form": 8}
    assert len(list((out / "data").glob("free_form-*.parquet"))) == 2
