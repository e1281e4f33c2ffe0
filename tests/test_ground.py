"""Ground and classify-masks on the demo's real photos, with tiny GroundingDINO / OWLv2 / SAM
checkpoints built by the package and loaded by path."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from ultracurate import masks as M
from ultracurate.catalog import now
from ultracurate.errors import UltracurateError
from ultracurate.models import grounding, make_tiny, sam
from ultracurate.names import BBOX_COLUMNS
from ultracurate.runner import run
from ultracurate.selection import Selection
from ultracurate.stages.ground import no_box_reason
from ultracurate.workspace import Workspace

OBJECTS = ("the cat", "a red helmet")


@pytest.fixture(scope="module")
def tiny_refs(tiny_dir):
    refs = make_tiny(tiny_dir, ("grounding", "sam"))
    owl = tiny_dir / "owlv2"
    if not (owl / "config.json").exists():
        import torch
        torch.manual_seed(0)
        grounding.make_tiny(owl, family="owlv2")
    refs["owlv2"] = str(owl)
    return refs


def add_edits(ws, per_anchor=OBJECTS, extra=True) -> list[dict]:
    """Region edits (one per object per anchor), plus a free edit and a NONE region edit that
    ground must leave alone."""
    with ws.catalog() as cat:
        anchors = cat.query("SELECT anchor_id, captions FROM anchors_v ORDER BY anchor_id")
        eid = cat.edits.next_id()
        rows = []
        for a in anchors:
            for obj in per_anchor:
                rows.append(dict(edit_id=eid, anchor_id=a["anchor_id"], edit_object=obj,
                                 mode="region"))
                eid += 1
        if extra:
            a = anchors[0]["anchor_id"]
            rows.append(dict(edit_id=eid, anchor_id=a, edit_object="the cat", mode="free"))
            rows.append(dict(edit_id=eid + 1, anchor_id=a, edit_object="NONE", mode="region"))
        full = [{**r, "source_caption": "a photo", "instruction": "change it",
                 "target_caption": "a changed photo", "edit_type": "change_local",
                 "created_at": now()} for r in rows]
        cat.con.execute("BEGIN")
        cat.edits.insert(pl.DataFrame(full))
        cat.con.execute("COMMIT")
    return rows


def edits(ws) -> list[dict]:
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT * FROM edits_v ORDER BY edit_id")


def test_ground_end_to_end_with_boxes(ingested_ws, tiny_refs, monkeypatch):
    ws = ingested_ws
    rows = add_edits(ws)
    # Spy on SAM's image encoder input: each anchor is embedded once for all its edits.
    embedded = []
    orig = sam.SamModel.embed

    def spy(self, images, batch_size=8):
        embedded.append(len(images))
        return orig(self, images, batch_size)

    monkeypatch.setattr(sam.SamModel, "embed", spy)
    s = run(ws, "ground", box_threshold=0.0, text_threshold=0.0, batch_size=64, progress=False)
    n_region = sum(1 for r in rows if r["mode"] == "region" and r["edit_object"] != "NONE")
    n_anchors = len({r["anchor_id"] for r in rows})
    assert (s.rows_in, s.rows_done, s.rows_failed) == (n_region, n_region, 0)
    assert embedded == [n_anchors]          # one batch, each anchor once, 2 edits each

    for e in edits(ws):
        if e["mode"] == "free" or e["edit_object"] == "NONE":
            assert e["edit_status"] == "proposed" and e["mask_rle"] is None
            continue
        assert e["edit_status"] == "grounded" and e["ground_run"] == s.run_id
        assert (e["mask_height"], e["mask_width"]) == (e["anchor_height"], e["anchor_width"])
        m = M.decode(e["mask_rle"], e["mask_height"], e["mask_width"])
        f = M.features(m)
        assert e["mask_area"] == pytest.approx(f.area)
        assert list(e["mask_bbox"]) == f.bbox == [e[c] for c in BBOX_COLUMNS]
        assert (e["mask_components"], e["mask_contours"]) == (f.components, f.contours)
        gb = json.loads(e["ground_boxes"])
        assert gb["detector"] == "grounding-dino" and len(gb["boxes"]) == len(gb["scores"]) > 0
        for x0, y0, x1, y1 in gb["boxes"]:
            assert 0 <= x0 < x1 <= e["anchor_width"] and 0 <= y0 < y1 <= e["anchor_height"]

    # The mask is the union of SAM's per-box masks, computed the same way by hand.
    from ultracurate.images import load_rgb
    from ultracurate.models import load
    e = next(e for e in edits(ws) if e["edit_status"] == "grounded")
    im = load_rgb(ws.media.path(e["anchor_media"]))
    model = load(ws, "sam")
    emb = model.embed([np.asarray(im)])
    by_hand = model.masks(emb[0], (im.height, im.width),
                          json.loads(e["ground_boxes"])["boxes"]).any(axis=0)
    got = M.decode(e["mask_rle"], im.height, im.width)
    assert (got ^ by_hand).mean() < 0.001   # same up to the 2-decimal rounding of boxes

    # A rerun skips what is done; --force redoes it and resets the mask's class.
    assert run(ws, "ground", box_threshold=0.0, progress=False).rows_in == 0
    run(ws, "classify-masks", progress=False)
    assert all(e["mask_class"] for e in edits(ws) if e["edit_status"] == "grounded")
    s2 = run(ws, "ground", Selection(where="edit_id = $id", params={"id": rows[0]["edit_id"]}),
                    box_threshold=0.0, force=True, progress=False)
    assert s2.rows_in == 1
    e0 = next(e for e in edits(ws) if e["edit_id"] == rows[0]["edit_id"])
    assert e0["mask_class"] is None and e0["ground_run"] == s2.run_id


def test_ground_no_box_records_the_reason(ingested_ws, tiny_refs):
    ws = ingested_ws
    add_edits(ws, extra=False)
    s = run(ws, "ground", Selection(limit=4), box_threshold=1.0,   # sigmoid scores never reach 1
                   progress=False)
    assert s.rows_done == s.rows_in > 0
    done = [e for e in edits(ws) if e["ground_run"] == s.run_id]
    assert len(done) == 4
    for e in done:
        assert e["edit_status"] == "no_region"
        assert e["edit_reasons"] == [no_box_reason(e["edit_object"])]
        assert e["mask_rle"] is None and e["mask_area"] is None
        assert json.loads(e["ground_boxes"])["boxes"] == []
    # no_region edits have no mask: classify-masks has nothing to do
    assert run(ws, "classify-masks", progress=False).rows_in == 0


def test_ground_with_owlv2_backend(tmp_path, tiny_dir, tiny_refs, demo_photos):
    from ultracurate.stages.ingest import IngestStage, discover
    ws = Workspace.init(tmp_path / "owl", {"models": {"profile": "tiny", "tiny_dir":
                                                      str(tiny_dir),
                                                      "grounding": tiny_refs["owlv2"]}})
    run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    add_edits(ws, per_anchor=("the cat",), extra=False)
    s = run(ws, "ground", Selection(limit=3), box_threshold=0.0, progress=False)
    assert s.rows_done == 3
    done = [e for e in edits(ws) if e["ground_run"] == s.run_id]
    assert len(done) == 3
    for e in done:
        assert json.loads(e["ground_boxes"])["detector"] == "owlv2"
        assert e["edit_status"] == "grounded"
    with ws.catalog(read_only=True) as cat:
        models = json.loads(cat.scalar("SELECT models FROM runs WHERE run_id = ?", [s.run_id]))
    assert models["grounding"] == tiny_refs["owlv2"]


def test_missing_anchor_file_fails_only_its_edits(ingested_ws, tiny_refs):
    ws = ingested_ws
    rows = add_edits(ws, extra=False)
    with ws.catalog() as cat:
        media = cat.scalar("SELECT media FROM anchors WHERE anchor_id = ?",
                           [rows[0]["anchor_id"]])
    ws.media.path(media).unlink()
    # the broken anchor's edits and the next anchor's, in one batch
    s = run(ws, "ground", Selection(limit=2 * len(OBJECTS)), box_threshold=0.0, progress=False)
    assert s.rows_failed == len(OBJECTS) and s.rows_done == s.rows_in - len(OBJECTS)
    with ws.catalog(read_only=True) as cat:
        errs = cat.query("SELECT key, error FROM stage_state WHERE stage = 'ground' AND "
                         "state = 'failed'")
    assert {e["key"] for e in errs} == {r["edit_id"] for r in rows[:len(OBJECTS)]}
    assert all(f"anchor {rows[0]['anchor_id']}" in e["error"] for e in errs)


def _insert_masks(ws, masks: dict[str, np.ndarray], with_features: bool):
    with ws.catalog() as cat:
        a = cat.scalar("SELECT min(anchor_id) FROM anchors")
        eid = cat.edits.next_id()
        rows = []
        for i, (name, m) in enumerate(masks.items()):
            f = M.features(m)
            row = dict(edit_id=eid + i, anchor_id=a, source_caption="a", instruction=name,
                       target_caption="b", edit_object=name, edit_type="change_local",
                       mode="region", edit_status="grounded", mask_rle=M.encode(m),
                       mask_height=m.shape[0], mask_width=m.shape[1])
            if with_features:
                row.update(mask_area=f.area, mask_contours=f.contours)
            rows.append(row)
        cat.con.execute("BEGIN")
        cat.edits.insert(pl.DataFrame(rows))
        cat.con.execute("COMMIT")


def synthetic_masks():
    h = w = 120
    yy, xx = np.mgrid[:h, :w]
    salt = np.zeros((h, w), bool)
    salt[::2, ::2] = True
    few = np.zeros((h, w), bool)
    few[3:5, 3:5] = True
    return {"fine": (yy - 60) ** 2 + (xx - 60) ** 2 <= 30 ** 2,
            "too_large": np.ones((h, w), bool), "too_small": few, "fragmented": salt}


@pytest.mark.parametrize("with_features", [True, False])
def test_classify_masks_and_rerun_with_new_thresholds(ingested_ws, with_features):
    ws = ingested_ws
    masks = synthetic_masks()
    _insert_masks(ws, masks, with_features)
    s = run(ws, "classify-masks", progress=False)
    assert s.rows_done == 4
    got = {e["edit_object"]: e for e in edits(ws)}
    for name, e in got.items():
        assert e["mask_class"] == name and e["classify_run"] == s.run_id
        f = M.features(masks[name])   # what was missing is computed from the RLE
        assert e["mask_bbox"] == f.bbox == [e[c] for c in BBOX_COLUMNS]
        assert (e["mask_components"], e["mask_contours"]) == (f.components, f.contours)
    # same thresholds: nothing to redo
    assert run(ws, "classify-masks", progress=False).rows_in == 0
    # new thresholds: every mask reclassified from the stored features, no SAM involved
    s2 = run(ws, "classify-masks", max_contours=5_000, min_area=0.2, progress=False)
    assert s2.rows_in == 4
    got = {e["edit_object"]: e["mask_class"] for e in edits(ws)}
    assert got == {"fine": "too_small", "too_large": "too_large", "too_small": "too_small",
                   "fragmented": "fine"}
    with ws.catalog(read_only=True) as cat:
        params = json.loads(cat.scalar("SELECT params FROM runs WHERE run_id = ?",
                                       [s2.run_id]))
    assert params["thresholds"] == {"min_area": 0.2, "max_area": 0.9, "max_contours": 5000}
    # back to the defaults: the earlier run's thresholds differ from the latest, so redo
    assert run(ws, "classify-masks", progress=False).rows_in == 4
    with pytest.raises(UltracurateError, match="min_area < max_area"):
        run(ws, "classify-masks", min_area=0.95, progress=False)


def test_cli_ground_and_classify(ingested_ws, tiny_refs):
    from ultracurate.cli import app
    ws = ingested_ws
    rows = add_edits(ws, per_anchor=("the cat",), extra=False)
    r = CliRunner().invoke(app, ["ground", "-w", str(ws.root), "--where", "edit_id <= $n",
                                 "-p", f"n={rows[1]['edit_id']}", "--box-threshold", "0",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["stage"] == "ground" and out["rows_done"] == 2
    r = CliRunner().invoke(app, ["classify-masks", "-w", str(ws.root), "--max-area", "0.95",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows_done"] == 2
    classes = [e["mask_class"] for e in edits(ws) if e["mask_rle"] is not None]
    assert len(classes) == 2 and set(classes) <= set(M.MASK_CLASSES)


def test_sam_loading_forms(tiny_refs, tmp_path):
    import torch
    m = sam.load(tiny_refs["sam"])
    assert m.image_size == 256
    # a .pth state dict loads with weights_only (and a name that names its architecture)
    with pytest.raises(UltracurateError, match="cannot tell the SAM architecture"):
        sam.load(str(tmp_path / "weights.pth"))
    with pytest.raises(UltracurateError, match="not found"):
        sam.load(f"vit_b:{tmp_path / 'nope.pth'}")
    bad = tmp_path / "sam_vit_b_bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(UltracurateError, match="does not match its architecture"):
        sam.load(str(bad))
    with pytest.raises(UltracurateError, match="grounding-dino or owlv2"):
        grounding.load(tiny_refs["sam"], backend="yolo")


# -- classify-masks: stored features in SQL, the others decoded in batches -----------------------
def _classify_state(ws) -> dict:
    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT e.edit_id, e.mask_class, e.classify_run, e.mask_area, "
                         "e.mask_contours, s.state, s.run_id AS mark_run, s.error "
                         "FROM edits e LEFT JOIN stage_state s ON s.key = e.edit_id "
                         "AND s.stage = 'classify-masks' ORDER BY e.edit_id")
    return {r["edit_id"]: r for r in rows}


def _run_row(ws, run_id) -> dict:
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT state, rows_in, rows_done, rows_failed FROM runs "
                         "WHERE run_id = ?", [run_id])[0]


def test_classify_masks_one_run_over_stored_and_decoded_masks(ws):
    """Stored features are classified in SQL, masks without them decoded in batches: one run,
    one set of counts and marks, classes as masks.classify gives them; a rerun retries only
    the failed row, --force and new thresholds redo every row, --limit its first rows."""
    from _masks import add_masks, stored
    disc = np.zeros((40, 40), bool)
    disc[10:30, 10:30] = True
    ids = add_masks(ws, [stored(0.5, 3), stored(0.95, 1), stored(0.5, 900), stored(0.0, 0),
                         {"mask": disc}, {"mask": np.ones((40, 40), bool)},
                         {"rle": "not an rle", "mask": disc}])
    s = run(ws, "classify-masks", progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (7, 6, 1)
    assert _run_row(ws, s.run_id) == {"state": "completed", "rows_in": 7, "rows_done": 6,
                                      "rows_failed": 1}
    got = _classify_state(ws)
    want = ["fine", "too_large", "fragmented", "too_small", "fine", "too_large"]
    for eid, cls in zip(ids, want):
        r = got[eid]   # decoded masks' features are stored now, and give the class
        assert r["mask_class"] == cls == M.classify(r["mask_area"], r["mask_contours"])
        assert (r["classify_run"], r["state"], r["mark_run"]) == (s.run_id, "done", s.run_id)
    bad = got[ids[-1]]
    assert (bad["mask_class"], bad["classify_run"], bad["state"]) == (None, None, "failed")
    assert f"edit {ids[-1]}" in bad["error"]
    # the same thresholds: only the failed row is pending, and nothing else is touched
    s2 = run(ws, "classify-masks", progress=False)
    assert (s2.rows_in, s2.rows_done, s2.rows_failed) == (1, 0, 1)
    assert {k: v for k, v in _classify_state(ws).items() if k != ids[-1]} == {
        k: v for k, v in got.items() if k != ids[-1]}
    # --force redoes every row; marks it had are updated in place, by the new run
    s3 = run(ws, "classify-masks", force=True, progress=False)
    assert (s3.rows_in, s3.rows_done) == (7, 6)
    assert {r["mark_run"] for r in _classify_state(ws).values()} == {s3.run_id}
    # new thresholds redo the rows classified under others, from the stored features
    s4 = run(ws, "classify-masks", max_contours=5000, progress=False)
    assert (s4.rows_in, s4.rows_done) == (7, 6)
    assert _classify_state(ws)[ids[2]]["mask_class"] == "fine"
    # --limit: the first rows of the selection, whichever way they are classified
    s5 = run(ws, "classify-masks", Selection(limit=2), progress=False)
    assert (s5.rows_in, s5.rows_done) == (2, 2)
    assert [_classify_state(ws)[i]["classify_run"] for i in ids[:3]] == [s5.run_id] * 2 + [
        s4.run_id]


@pytest.mark.parametrize("how", ["python", "duckdb"])
def test_ctrl_c_while_classifying_in_sql_leaves_the_catalog_as_it_was(ws, monkeypatch, how):
    """A Ctrl-C during the SQL classification (after its UPDATE ran: Python's
    KeyboardInterrupt, or a SIGINT that DuckDB turns into 'Query interrupted' mid-statement)
    rolls back the classes, the marks and the run; the run is recorded as interrupted, and
    a rerun classifies every row."""
    import os
    import signal
    import threading
    from _masks import add_masks, stored
    from ultracurate.runner import Interrupted
    from ultracurate.stages.classify_masks import ClassifyMasksStage
    ids = add_masks(ws, [stored(0.5, 3), stored(0.95, 1), {}])
    before = _classify_state(ws)
    real = ClassifyMasksStage.apply_set

    def interrupted(self, w, rows):
        real(self, w, rows)   # the classes are written: the rollback must undo them
        if how == "python":
            raise KeyboardInterrupt
        con = w.cat.con
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        safety = threading.Timer(30, con.interrupt)   # never hang if DuckDB missed it
        safety.start()
        try:
            con.execute("SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 7 = 3")
        finally:
            safety.cancel()
    monkeypatch.setattr(ClassifyMasksStage, "apply_set", interrupted)
    with pytest.raises(Interrupted, match="classify-masks interrupted"):
        run(ws, "classify-masks", progress=False)
    assert _classify_state(ws) == before
    with ws.catalog(read_only=True) as cat:
        assert cat.query("SELECT stage, state FROM runs") == [
            {"stage": "classify-masks", "state": "interrupted"}]
        assert cat.scalar("SELECT count(*) FROM stage_state") == 0
    assert not list(ws.scratch.glob("*pending*"))
    monkeypatch.undo()
    s = run(ws, "classify-masks", progress=False)
    assert (s.rows_in, s.rows_done) == (3, 3)
    assert [_classify_state(ws)[i]["mask_class"] for i in ids] == ["fine", "too_large",
                                                                     "fine"]
