"""Test helper: region edits with stored masks (and, where given, their features) inserted
directly, on one anchor row of their own (classify-masks never reads the anchor's pixels)."""

from __future__ import annotations

import numpy as np
import polars as pl

from ultracurate import masks as M
from ultracurate.catalog import now
from ultracurate.names import FEATURE_COLUMNS

# a mask whose RLE is real (what a decoding batch reads), unrelated to the features stored
SMALL = np.zeros((8, 8), bool)
SMALL[2:5, 2:6] = True


def add_masks(ws, rows: list[dict]) -> list[int]:
    """One region edit per row: row['mask'] (a boolean array; default SMALL) or row['rle']
    (a string stored as it is, e.g. a corrupt one) with the mask's size, and the feature
    columns the row names (mask_area, mask_contours, ...; a feature not named is NULL, so a
    row naming none is decoded by classify-masks). Returns the edit ids, in order."""
    with ws.catalog() as cat:
        aid = cat.anchors.next_id()
        eid = cat.edits.next_id()
        out, edits = [], []
        for i, r in enumerate(rows):
            mask = r.get("mask", SMALL)
            h, w = mask.shape
            edits.append({"edit_id": eid + i, "anchor_id": aid, "source_caption": "a",
                          "instruction": "change it", "target_caption": "b",
                          "edit_object": "it", "edit_type": "change_local", "mode": "region",
                          "edit_status": "grounded", "mask_rle": r.get("rle", M.encode(mask)),
                          "mask_height": h, "mask_width": w, "created_at": now(),
                          **{c: r[c] for c in FEATURE_COLUMNS if c in r}})
            out.append(eid + i)
        cat.con.execute("BEGIN")
        cat.anchors.insert([{"anchor_id": aid, "sha256": f"test-{aid}", "media": f"{aid:064x}.png",
                             "width": 8, "height": 8}])
        cat.edits.insert(pl.DataFrame(edits, infer_schema_length=None))
        cat.con.execute("COMMIT")
    return out


def stored(area: float | None, contours: int | None) -> dict:
    """Every feature column stored, with this area and these contours (None: NULL)."""
    return {"mask_area": area, "mask_contours": contours, "mask_components": 1,
            "mask_bbox_x": 0, "mask_bbox_y": 0, "mask_bbox_w": 1, "mask_bbox_h": 1}
