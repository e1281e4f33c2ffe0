"""The ground stage's compute: the region of an edit object phrase in its anchor photo, as the
union of SAM's masks of every box the detector finds (docs/regions.md). No catalog here:
`stages.ground.GroundStage` runs `ground_batch` on each batch and writes what it returns, and
`bench/masks.py --real` runs the same function alone, on the device machine.

One detector call covers the batch's (image, phrase) items; SAM's image embedding, its costly
part, is computed once per distinct anchor that has a box, and shared by all its items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from . import masks as M


@dataclass
class Grounded:
    """One item's result: the detections, and with a box the mask (COCO RLE at the image's
    size) and its features; no box: rle and features None."""

    detections: Any                       # models.grounding.Detections
    height: int
    width: int
    rle: str | None = None
    features: M.MaskFeatures | None = None


def ground_batch(detector, sam, images: Sequence, phrases: Sequence[str],
                 anchors: Sequence[Hashable], sam_batch_size: int = 8) -> list[Grounded]:
    """Ground phrases[i] in images[i] (PIL RGB); anchors[i] names the image, so that items of
    one anchor share its SAM embedding. detector: a loaded `models.grounding` model; sam: a
    loaded `models.sam` model."""
    dets = detector.detect(list(images), list(phrases))
    first: dict[Hashable, int] = {}           # anchor -> its first item with a box
    for i, d in enumerate(dets):
        if d.boxes:
            first.setdefault(anchors[i], i)
    emb = sam.embed([np.asarray(images[i]) for i in first.values()],
                    batch_size=sam_batch_size) if first else None
    index = {a: k for k, a in enumerate(first)}
    out = []
    for im, a, d in zip(images, anchors, dets):
        g = Grounded(d, im.height, im.width)
        if d.boxes:
            union = sam.masks(emb[index[a]], (im.height, im.width), d.boxes).any(axis=0)
            g.rle, g.features = M.encode(union), M.features(union)
        out.append(g)
    return out
