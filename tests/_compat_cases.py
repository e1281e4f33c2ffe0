"""Inputs of the ultraedit-compat golden cases at 512 px, built from code (nothing stored):
the demo's real photos (scikit-image) cropped as the generator crops them, their captions, and
region masks. Shared by tests/test_generate.py and scripts/make_compat_golden.py, which feeds
the same inputs to the released UltraEdit pipelines."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ultracurate.demo import _skimage_photo, examples_dir
from ultracurate.images import resize_center_crop
from ultracurate.masks import hull_mask, resize_nearest

# name -> (mode, seed, pairs): the golden file's cases. The seeds' released draws: free_7 has
# 8 total steps (4 real) and fraction 0.76; region_6 has 14 steps (4 real, so the last blend is
# clean), fraction 0.53 and the soft mask (value 0.5).
GOLDEN_CASES = {"free_7": ("free", 5, 7), "region_6": ("region", 7, 6)}
LATENT_STRIDE = 4    # the file keeps every 4th latent row and column (all rows of the batch)
IMAGE_STRIDE = 32    # and every 32nd pixel of the decoded images (both ways)


def _specs() -> list[dict]:
    lines = (examples_dir() / "demo_anchors.jsonl").read_text().splitlines()
    return [json.loads(s) for s in lines if s.strip()]


def anchors(n: int, size: int = 512):
    """n distinct real photos, short side to size and centre-cropped (PIL bicubic)."""
    from PIL import Image
    return [resize_center_crop(Image.fromarray(_skimage_photo(s["image"])).convert("RGB"), size)
            for s in _specs()[:n]]


def captions(n: int) -> list[tuple[str, str]]:
    """(source, target) per pair: two real captions of the same photo."""
    return [(s["captions"][0], s["captions"][1]) for s in _specs()[:n]]


def edit_masks(n: int, size: int = 512) -> list[tuple[np.ndarray, np.ndarray]]:
    """(edit mask, outer mask) per pair at image size: a crescent (non-convex, so its convex
    hull, the outer mask, differs from it), placed differently in each pair."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for k in range(n):
        cy, cx, r = 0.35 + 0.04 * k, 0.3 + 0.06 * k, 0.22
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        bite = (yy - cy + 0.08) ** 2 + (xx - cx - 0.1) ** 2 < (0.8 * r) ** 2
        edit = disc & ~bite
        out.append((edit, hull_mask(edit)))
    return out


def mask_fn(edit: np.ndarray, outer: np.ndarray, latent: int):
    """The pair's M as a function of the sampled soft value, built as the released pipeline
    builds it: both masks nearest-resized to latent size, the soft value where they differ."""
    edit_l = resize_nearest(edit, (latent, latent))
    outer_l = resize_nearest(outer, (latent, latent))

    def fn(soft):
        m = edit_l.astype(np.float32)
        if soft is not None:
            m[edit_l != outer_l] = np.float32(soft)
        return m
    return fn


def input_digest(n: int, size: int = 512) -> str:
    """A digest of the inputs, stored with the golden file: a change of photos, crop or masks
    shows up as 'inputs changed', not as a numerical mismatch."""
    h = hashlib.sha256()
    for im in anchors(n, size):
        h.update(np.asarray(im).tobytes())
    for s, t in captions(n):
        h.update(f"{s}\0{t}\0".encode())
    for e, o in edit_masks(n, size):
        h.update(np.packbits(e).tobytes() + np.packbits(o).tobytes())
    return h.hexdigest()
