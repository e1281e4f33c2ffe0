"""Helpers for the scoring/filter/balance/report tests: edits and candidate rows with real
images in the media store, inserted directly (without running generation)."""

from __future__ import annotations

import numpy as np
import polars as pl
from PIL import Image, ImageEnhance

from ultracurate.catalog import now
from ultracurate.names import EDIT_TYPES
from ultracurate.images import load_rgb, resize_center_crop, to_png_bytes

SIZE = 64


def add_candidates(ws, n_edits: int = 6, per_edit: int = 4, modes=("free", "region"),
                   types=EDIT_TYPES, size: int = SIZE, status: str = "generated") -> pl.DataFrame:
    """n_edits edits over the workspace's anchors (cycling), each with per_edit candidate pairs:
    source = the anchor at size x size, edited = a brightness/contrast-changed copy (candidate
    index 0 of each edit is identical to its source). Returns the candidate rows."""
    with ws.catalog() as cat:
        anchors = cat.query("SELECT anchor_id, media, captions FROM anchors_v ORDER BY anchor_id")
        eid0 = cat.edits.next_id()
        cid0 = cat.candidates.next_id()
        edits, cands = [], []
        for e in range(n_edits):
            a = anchors[e % len(anchors)]
            src = resize_center_crop(load_rgb(ws.media.path(a["media"])), size)
            src_name = ws.media.put_bytes(to_png_bytes(src), "png")
            eid = eid0 + e
            cap = a["captions"][0]
            edits.append({"edit_id": eid, "anchor_id": a["anchor_id"], "source_caption": cap,
                          "instruction": "make it brighter",
                          "target_caption": cap + f", brighter version {e}",
                          "edit_object": "NONE", "edit_type": types[e % len(types)],
                          "mode": modes[e % len(modes)], "edit_status": "grounded",
                          "mask_class": None if modes[e % len(modes)] == "free" else
                          ("fine", "too_small")[e % 2],
                          "created_at": now()})
            for k in range(per_edit):
                if k == 0:
                    edt = src
                else:
                    edt = ImageEnhance.Brightness(src).enhance(1.0 + 0.15 * k)
                    edt = ImageEnhance.Contrast(edt).enhance(1.0 - 0.05 * k)
                cands.append({"candidate_id": cid0 + len(cands), "edit_id": eid,
                              "candidate_index": k, "seed": k, "source_image": src_name,
                              "edited_image": ws.media.put_bytes(to_png_bytes(edt), "png"),
                              "auto_status": status, "created_at": now()})
        cat.con.execute("BEGIN")
        cat.edits.insert(pl.DataFrame(edits))
        cat.candidates.insert(pl.DataFrame(cands))
        cat.con.execute("COMMIT")
    return pl.DataFrame(cands)


def set_scores(ws, scores: dict[int, dict]) -> None:
    """Write score columns directly (filter tests need controlled values), status 'scored'."""
    rows = [{"candidate_id": cid, "auto_status": "scored", **vals} for cid, vals in
            scores.items()]
    df = pl.DataFrame(rows)
    with ws.catalog() as cat:
        cat.con.execute("BEGIN")
        cat.candidates.update(df)
        cat.con.execute("COMMIT")


def noise_image(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
