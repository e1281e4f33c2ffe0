"""Exported masks line up with their pair: real generation (tiny editor) from non-square
anchors (landscape, portrait, one smaller than the crop) at two sizes, exported in all four
formats and read back as each trainer reads them. The source is the cropped anchor
(keep_anchor_source), so the drawn object is visible in it: the exported mask must cover
exactly the object's pixels in the crop, and the soft mask must be the one generation blended
with."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ultracurate import masks
from ultracurate.catalog import now
from ultracurate.names import EXPORT_FORMATS as FORMATS
from ultracurate.export import export_dataset
from ultracurate.models import make_tiny
from ultracurate.runner import run
from ultracurate.selection import Selection
from ultracurate.stages.ingest import IngestStage, discover

from _exports import by_idx, read_export

SIZES = {"replace": 64, "add": 96}       # edit type -> generation size
ANCHORS = {                               # name -> (width, height)
    "landscape": (200, 120),
    "portrait": (90, 150),
    "small": (40, 52),                    # smaller than either crop: upscaled
}


def object_mask(w: int, h: int) -> np.ndarray:
    """An L-shaped object around the centre (non-convex, so its hull leaves a soft band)."""
    m = np.zeros((h, w), bool)
    x0, x1, y0, y1 = int(w * 0.38), int(w * 0.62), int(h * 0.3), int(h * 0.7)
    m[y0:y1, x0:x0 + (x1 - x0) // 3] = True          # the upright
    m[y1 - (y1 - y0) // 3:y1, x0:x1] = True           # the foot
    return m


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_dir):
    """A workspace with two region edits per anchor (one per size), two candidates each,
    generated with the tiny editor and accepted."""
    from ultracurate.workspace import Workspace
    root = tmp_path_factory.mktemp("geometry")
    ws = Workspace.init(root / "ws", {"models": {"profile": "tiny", "tiny_dir": str(tiny_dir)}})
    make_tiny(tiny_dir, ("editor",))
    photos = root / "photos"
    photos.mkdir()
    for name, (w, h) in ANCHORS.items():
        arr = np.full((h, w, 3), 90, np.uint8)
        arr[object_mask(w, h)] = (230, 20, 20)
        Image.fromarray(arr).save(photos / f"{name}.png")
    run(ws, IngestStage(items=discover([photos])), progress=False)
    with ws.catalog() as cat:
        anchors = cat.query("SELECT anchor_id, width, height FROM anchors ORDER BY anchor_id")
        rows = []
        for a in anchors:
            m = object_mask(a["width"], a["height"])
            for etype in SIZES:
                rows.append({"edit_id": len(rows) + 1, "anchor_id": a["anchor_id"],
                             "source_caption": "a red shape on grey",
                             "instruction": "make the shape blue",
                             "target_caption": "a blue shape on grey",
                             "edit_object": "the red shape", "edit_type": etype,
                             "mode": "region", "edit_status": "grounded",
                             "mask_rle": masks.encode(m), "mask_height": a["height"],
                             "mask_width": a["width"], "mask_class": "fine",
                             "created_at": now()})
        cat.edits.insert(pl.DataFrame(rows))
    for etype, size in SIZES.items():
        out = run(ws, "generate", Selection("edit_type = $t", {"t": etype}), candidates=2,
                           size=size, keep_anchor_source=True, progress=False)
        assert out.rows_done == 6 and out.rows_failed == 0
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET auto_status = 'accepted'")
        rows = cat.query("SELECT candidate_id, edit_type, gen_params, mask_rle, mask_height, "
                         "mask_width FROM candidates_v")
    return ws, {r["candidate_id"]: r for r in rows}


def _gray(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _red(data: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    return (rgb[..., 0] > 160) & (rgb[..., 1] < 110)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_line_up_with_the_pair(generated, tmp_path, fmt):
    ws, cands = generated
    out = tmp_path / fmt
    export_dataset(ws, None, out, fmt, soft_masks=True, val_fraction=0.3, progress=False)
    rows = by_idx(read_export(out, fmt))
    assert set(rows) == set(cands)
    soft_seen = 0
    for idx, row in rows.items():
        c = cands[idx]
        size = SIZES[c["edit_type"]]
        gp = json.loads(c["gen_params"])
        assert gp["size"] == size
        for col in ("source_image", "edited_image", "mask_image", "soft_mask_image"):
            assert Image.open(io.BytesIO(row[col])).size == (size, size), (col, idx)
        hard = _gray(row["mask_image"])
        assert set(np.unique(hard)) <= {0, 255}
        # the very mask generation blended with, at the images' size
        want = masks.crop_mask(masks.decode(c["mask_rle"], c["mask_height"], c["mask_width"]),
                               size)
        assert np.array_equal(hard > 0, want)
        # ... and it lands where the object is in the cropped source
        obj = _red(row["source_image"])
        iou = (obj & want).sum() / (obj | want).sum()
        assert iou > 0.85, (idx, iou)
        # the soft mask: generation's own, before its nearest-neighbour step to latent size
        soft = _gray(row["soft_mask_image"]).astype(np.float32) / 255
        latent = masks.soft_mask(c["mask_rle"], c["mask_height"], c["mask_width"],
                                 (size // 8, size // 8), soft_value=gp["mask"]["soft_value"],
                                 crop=(size,))
        assert np.allclose(masks.resize_nearest(soft, (size // 8, size // 8)), latent,
                           atol=1 / 255)
        assert np.array_equal(soft == 1.0, want)  # full strength exactly on the mask
        value = gp["mask"]["soft_value"]
        band = (soft > 0) & (soft < 1)
        if value not in (None, 0.0, 1.0):
            assert band.any() and np.allclose(soft[band], round(value * 255) / 255)
            soft_seen += 1
        else:
            assert not band.any()
    assert soft_seen > 0  # some candidate drew a soft value (seeded)


def test_masks_are_not_the_anchor_geometry(generated, tmp_path):
    """What the export fixed: a mask at the anchor's size, or squashed into the square without
    the crop, would not line up with a landscape anchor's crop."""
    ws, cands = generated
    export_dataset(ws, Selection("status = 'accepted' AND anchor_width > anchor_height"),
                   tmp_path / "o", "hf", progress=False)
    for idx, row in by_idx(read_export(tmp_path / "o", "hf")).items():
        c = cands[idx]
        size = SIZES[c["edit_type"]]
        full = masks.decode(c["mask_rle"], c["mask_height"], c["mask_width"])
        squashed = masks.resize_nearest(full, (size, size))
        hard = _gray(row["mask_image"]) > 0
        obj = _red(row["source_image"])
        assert (obj & squashed).sum() / (obj | squashed).sum() < 0.8
        assert (obj & hard).sum() / (obj | hard).sum() > 0.85
