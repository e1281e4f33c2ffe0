"""Benchmark: mask features + classification for many stored RLE masks, against a naive
decode-to-numpy loop, in one run; and (--real, for a GPU machine) ground throughput.

    .venv/bin/python bench/masks.py                      # 1M masks (CPU)
    .venv/bin/python bench/masks.py --n 200000 --naive-sample 2000 --shape-sample 20000
    .venv/bin/python bench/masks.py --real --device cuda # GroundingDINO Swin-B + SAM ViT-H,
                                                         # random weights: anchors/s batched
                                                         # vs one edit per call
    .venv/bin/python bench/masks.py --real --tiny DIR    # the same code path with tiny models

--real runs the ground stage's compute (ultracurate.grounding.ground_batch) without a catalog:
it imports no DuckDB, polars or LanceDB, so bench/gpu.sh runs it on the device machine.

Masks are synthetic but realistic: a pool of masks at photo sizes (ellipses and blobs of all
sizes, multi-part objects, speckled SAM-like fragments, whole-image and few-pixel masks),
COCO-RLE encoded and repeated to n rows (every row is processed; nothing is cached).

Fast path (ultracurate.masks.features_many + classify_many): area and bbox straight from the
RLEs in pycocotools' C loops; components and contours decoded per mask and counted on the
bbox crop, over all cores; classes vectorised. Naive: for each mask decode to a full numpy
array, np.count_nonzero, np.nonzero for the bbox, scipy.ndimage.label for components,
cv2.findContours on the full mask, Python classify. Rows that a run measures on a sample are
extrapolated linearly to n, and the output says which.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultracurate import masks as M  # noqa: E402

SIZES = [(480, 640), (640, 480), (427, 640), (375, 500), (512, 512), (333, 500)]


def mask_pool(k: int = 600, seed: int = 0) -> list[tuple[str, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[:h, :w]
        kind = i % 20
        if kind == 0:
            m = np.ones((h, w), bool)                               # too large
        elif kind == 1:
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            m[y:y + rng.integers(1, 8), x:x + rng.integers(1, 8)] = True   # too small
        elif kind == 2:                                             # SAM-like speckle:
            m = np.zeros((h, w), bool)                              # a fragmented region
            y, x = rng.integers(0, h - 160), rng.integers(0, w - 160)
            m[y:y + 160, x:x + 160] = rng.random((160, 160)) < 0.2
        else:                                                       # objects, 1-4 parts
            m = np.zeros((h, w), bool)
            for _ in range(1 + kind % 3):
                cy, cx = rng.integers(0, h), rng.integers(0, w)
                ry, rx = rng.integers(5, h // 2), rng.integers(5, w // 2)
                m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            m &= ~(rng.random((h, w)) < 0.002)                      # pinholes
        out.append((M.encode(m), h, w))
    return out


def naive_one(rle: str, h: int, w: int, th: dict) -> tuple:
    from scipy import ndimage
    m = M.decode(rle, h, w, check=False)
    area = np.count_nonzero(m) / (h * w)
    ys, xs = np.nonzero(m)
    bbox = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
             int(ys.max() - ys.min() + 1)] if ys.size else [0, 0, 0, 0])
    _, comps = ndimage.label(m, structure=np.ones((3, 3)))
    contours = M.count_contours(m)
    return area, bbox, comps, contours, M.classify(area, contours, th)


def bench_features(n: int, naive_sample: int, shape_sample: int | None, workers: int) -> None:
    pool = mask_pool()
    rows = [pool[i % len(pool)] for i in range(n)]
    rles = [r[0] for r in rows]
    hs = [r[1] for r in rows]
    ws = [r[2] for r in rows]
    th = M.thresholds()
    print(f"masks: {n:,} RLE rows (pool of {len(pool)} synthetic masks at photo sizes), "
          f"{workers} worker processes, {os.cpu_count()} CPUs")

    # fast: area + bbox + size classes over all n rows
    t = time.perf_counter()
    f = M.features_many(rles, hs, ws, shape=False)
    t_vec = time.perf_counter() - t
    # fast: components + contours (on a sample when asked)
    m = n if shape_sample is None else min(shape_sample, n)
    t = time.perf_counter()
    g = M.features_many(rles[:m], hs[:m], ws[:m], shape=True, workers=workers)
    t_shape_m = time.perf_counter() - t
    t = time.perf_counter()
    contours = np.asarray(g["contours"] * (n // m) + g["contours"][:n % m])
    classes = M.classify_many(f["area"], contours, th)
    t_cls = time.perf_counter() - t
    t_shape = t_shape_m * n / m
    fast_total = t_vec + t_shape + t_cls

    # naive loop on a sample, extrapolated
    k = min(naive_sample, n)
    t = time.perf_counter()
    naive = [naive_one(rles[i], hs[i], ws[i], th) for i in range(k)]
    t_naive = (time.perf_counter() - t) * n / k
    # same answers on the naive sample
    for i, (area, bbox, comps, cont, cls) in enumerate(naive):
        assert abs(area - f["area"][i]) < 1e-12 and bbox == f["bbox"][i], i
        assert (comps, cont) == (g["components"][i], g["contours"][i]), i
        assert cls == classes[i], i
    counts = {c: int((classes == c).sum()) for c in M.MASK_CLASSES}

    print(f"  fast: area+bbox+size from RLE, all {n:,} rows: {t_vec:.2f} s "
          f"({n / t_vec:,.0f} masks/s)")
    print(f"  fast: components+contours, {'all' if m == n else f'{m:,}-row sample'}: "
          f"{t_shape_m:.2f} s ({m / t_shape_m:,.0f} masks/s)"
          + ("" if m == n else f" -> {t_shape:.1f} s extrapolated to {n:,}"))
    print(f"  fast: classify {n:,}: {t_cls:.2f} s")
    print(f"  fast total for {n:,}: {fast_total:.1f} s"
          + ("" if m == n else " (components/contours extrapolated)"))
    print(f"  naive loop: {k:,}-row sample {t_naive * k / n:.2f} s -> "
          f"{t_naive:.1f} s extrapolated to {n:,} ({k / (t_naive * k / n):,.0f} masks/s)")
    print(f"  speed-up: {t_naive / fast_total:.1f}x overall; area/bbox/size classes alone "
          f"{t_naive / (t_vec + t_cls):.0f}x")
    print(f"  classes: {counts}; fast == naive on the {k:,} sampled rows")


class FixedBoxes:
    """The detector, run in full on every item, with its boxes replaced by one fixed box per
    item. Random weights find arbitrary boxes (none, or hundreds), where a real photo's edit
    object gives one or a few: one box keeps SAM's share of the cost that of a typical
    detection, and the same on both sides."""

    def __init__(self, det, box):
        self.det, self.box, self.backend = det, box, det.backend

    def detect(self, images, phrases):
        from ultracurate.models.grounding import Detections
        self.det.detect(images, phrases)
        return [Detections([list(self.box)], [1.0], [p]) for p in phrases]


def bench_real(device: str, n_anchors: int, edits_per_anchor: int, batch: int,
               tiny: str | None, out: str | None = None) -> None:
    """Ground throughput through the ground stage's compute (`ultracurate.grounding.
    ground_batch`: one detector call per batch, SAM's image encoder once per anchor, masks,
    RLE and features), batched as the stage batches against one edit per call (detector,
    SAM, mask per edit, as the released code does). No catalog."""
    import json

    import torch
    from PIL import Image

    from ultracurate.grounding import ground_batch
    from ultracurate.models import grounding, make_tiny, sam
    if tiny:
        refs = make_tiny(tiny, ("grounding", "sam"))
        g_ref, s_ref = refs["grounding"], refs["sam"]
    else:
        g_ref, s_ref = "random:grounding-dino-base", "random:vit_h"
    det = FixedBoxes(grounding.load(g_ref, device), [100.0, 80.0, 400.0, 360.0])
    seg = sam.load(s_ref, device)  # the stage's loads: default dtypes
    rng = np.random.default_rng(0)
    anchors = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
               for _ in range(n_anchors)]
    phrases = ["the red car", "a dog"] * edits_per_anchor
    edits = [(i, phrases[j]) for i in range(n_anchors) for j in range(edits_per_anchor)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(items, per_call):
        found = []
        for s in range(0, len(items), per_call):
            chunk = items[s:s + per_call]
            found += ground_batch(det, seg, [anchors[i] for i, _ in chunk],
                                  [p for _, p in chunk], [i for i, _ in chunk],
                                  sam_batch_size=batch)
        return found

    run(edits[:2], 1); run(edits[:batch], batch); sync()              # warm up
    t = time.perf_counter(); one = run(edits, 1); sync(); t1 = time.perf_counter() - t
    t = time.perf_counter(); many = run(edits, batch); sync(); t2 = time.perf_counter() - t
    assert all(g.rle is not None for g in one + many)
    area = max(abs(a.features.area - b.features.area) for a, b in zip(one, many))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    res = {"date": time.strftime("%Y-%m-%d"), "device": name, "grounding": g_ref, "sam": s_ref,
           "sam_dtype": str(seg.dtype), "anchors": n_anchors,
           "edits_per_anchor": edits_per_anchor, "batch": batch,
           "one_at_a_time_anchors_per_s": round(n_anchors / t1, 3),
           "batched_anchors_per_s": round(n_anchors / t2, 3), "speedup": round(t1 / t2, 2),
           "max_abs_mask_area_diff": float(f"{area:.2e}")}
    print(f"ground throughput on {name} ({g_ref} + {s_ref}, SAM {seg.dtype}), {n_anchors} "
          f"anchors x {edits_per_anchor} edits, 640x480, one fixed box per edit:")
    print(f"  one edit per call: {n_anchors / t1:.2f} anchors/s ({len(edits) / t1:.2f} "
          f"edits/s)")
    print(f"  batched (batch {batch}, one SAM embedding per anchor): {n_anchors / t2:.2f} "
          f"anchors/s ({len(edits) / t2:.2f} edits/s), {t1 / t2:.1f}x; max |mask area "
          f"difference| {area:.1e}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="stored masks")
    ap.add_argument("--naive-sample", type=int, default=2000, help="rows the naive loop runs")
    ap.add_argument("--shape-sample", type=int, default=None,
                    help="rows the fast components/contours pass runs (default: all)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--real", action="store_true", help="ground throughput instead")
    ap.add_argument("--tiny", default=None, help="with --real: tiny models in this folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--edits-per-anchor", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None, help="with --real: write the figures here (JSON)")
    a = ap.parse_args()
    if a.real:
        bench_real(a.device, a.anchors, a.edits_per_anchor, a.batch, a.tiny, a.out)
    else:
        bench_features(a.n, a.naive_sample, a.shape_sample, a.workers)


if __name__ == "__main__":
    main()
