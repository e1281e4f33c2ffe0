"""Scoring throughput: pairs/s of the score stage (batched, each image and caption embedded
once, decoding on CPU threads ahead of the models, pixel scores batched on the GPU) against a
naive loop that scores one pair at a time with the same models (each image and caption encoded
alone, SSIM with scikit-image), in the same run, from images stored in a workspace's media store.

    python bench/score.py                        # CPU, tiny models (what CI can run)
    python bench/score.py --real --device cuda   # CLIP ViT-L/14 + DINOv2-L/14-reg @ 518,
                                                 # the real architectures with random weights
                                                 # (cost does not depend on the weights)

Target (one H100/H200, --real): at least 150 pairs/s; the models' floor is about 5.6 ms per
pair (two CLIP-L/14 images at 224 and two DINOv2-L at 518). The pairs are 512x512 JPEGs with
unique source and edited images (the free-form case: the source is regenerated per candidate);
captions are shared by 30 candidates per edit, as in UltraEdit's free-form scheme.
Prints a table and writes bench/out/score.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402


def build_workspace(root: Path, pairs: int, size: int, per_edit: int, models: dict):
    from PIL import Image

    from ultracurate.catalog import now
    from ultracurate.images import resize_center_crop, to_jpeg_bytes
    from ultracurate.workspace import Workspace
    from ultracurate.demo import _skimage_photo
    ws = Workspace.init(root, {"models": models})
    photos = [resize_center_crop(Image.fromarray(_skimage_photo(n)).convert("RGB"), size + 32)
              for n in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")]
    rng = np.random.default_rng(0)

    def variant(i: int) -> bytes:
        im = photos[i % len(photos)]
        x, y = rng.integers(0, 32, 2)
        arr = np.asarray(im.crop((x, y, x + size, y + size)), np.int16)
        arr = np.clip(arr + rng.integers(-12, 12, arr.shape), 0, 255).astype(np.uint8)
        return to_jpeg_bytes(Image.fromarray(arr), quality=95)

    with ws.catalog() as cat:
        anchor = ws.media.put_bytes(variant(0), "jpg")
        cat.con.execute("INSERT INTO anchors (anchor_id, sha256, media, width, height) "
                        "VALUES (1, 'x', ?, ?, ?)", [anchor, size, size])
        n_edits = (pairs + per_edit - 1) // per_edit
        edits = pl.DataFrame({
            "edit_id": list(range(1, n_edits + 1)), "anchor_id": [1] * n_edits,
            "source_caption": [f"a photo of scene {e} on a sunny day" for e in range(n_edits)],
            "instruction": ["make it snowy"] * n_edits,
            "target_caption": [f"a photo of scene {e} on a snowy day" for e in range(n_edits)],
            "edit_type": ["change_global"] * n_edits, "mode": ["free"] * n_edits,
            "created_at": [now()] * n_edits})
        cands = pl.DataFrame({
            "candidate_id": list(range(1, pairs + 1)),
            "edit_id": [1 + i // per_edit for i in range(pairs)],
            "candidate_index": [i % per_edit for i in range(pairs)],
            "seed": list(range(pairs)),
            "source_image": [ws.media.put_bytes(variant(2 * i), "jpg") for i in range(pairs)],
            "edited_image": [ws.media.put_bytes(variant(2 * i + 1), "jpg")
                             for i in range(pairs)],
            "auto_status": ["generated"] * pairs, "created_at": [now()] * pairs})
        cat.con.execute("BEGIN")
        cat.edits.insert(edits)
        cat.candidates.insert(cands)
        cat.con.execute("COMMIT")
    return ws


def naive(ws, rows: list[dict], device: str) -> tuple[float, dict[int, dict]]:
    """One pair at a time: each image and caption encoded alone, SSIM with scikit-image."""
    import torch

    from ultracurate import metrics
    from ultracurate.images import load_rgb
    from ultracurate.models import load
    clip, dino = load(ws, "clip", device), load(ws, "dino", device)
    out = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for r in rows:
        a = load_rgb(ws.media.path(r["source_image"]))
        b = load_rgb(ws.media.path(r["edited_image"]))
        ca, cb = clip.encode_images([a]), clip.encode_images([b])
        ts, tt = clip.encode_texts([r["source_caption"]]), clip.encode_texts([r["target_caption"]])
        da, db = dino.encode_images([a]), dino.encode_images([b])
        s = {"clip_sim_source": float(metrics.cosine(ca, ts)[0]),
             "clip_sim_target": float(metrics.cosine(cb, tt)[0]),
             "clip_sim_dir": float(metrics.direction_similarity(ca, cb, ts, tt)[0]),
             "clip_sim_image": float(metrics.cosine(ca, cb)[0]),
             "dinov2_sim": float(metrics.cosine(da, db)[0])}
        s.update(metrics.pixel_scores(np.asarray(a, np.float32) / 255,
                                      np.asarray(b, np.float32) / 255))
        out[r["candidate_id"]] = s
    sync()
    return time.perf_counter() - t0, out


def model_floor(ws, device: str, batch: int, reps: int = 3) -> float:
    """ms per pair of the two models alone on already-decoded pixels (2 images per pair)."""
    import torch

    from ultracurate.models import load
    clip, dino = load(ws, "clip", device), load(ws, "dino", device)
    cp = torch.randint(0, 255, (batch, 3, clip.image_size, clip.image_size), dtype=torch.uint8)
    dp = torch.randint(0, 255, (batch, 3, dino.crop, dino.crop), dtype=torch.uint8)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clip.encode_pixels(cp)
    dino.encode_pixels(dp)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        clip.encode_pixels(cp)
        dino.encode_pixels(dp)
    sync()
    per_image = (time.perf_counter() - t0) / reps / batch
    return 2 * per_image * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=None, help="pairs for the batched run "
                    "(default 96 CPU, 2048 GPU)")
    ap.add_argument("--naive-pairs", type=int, default=None, help="pairs for the naive loop "
                    "(default 24 CPU, 128 GPU)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 CPU, 64 GPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--real", action="store_true", help="real architectures, random weights")
    ap.add_argument("--clip", default=None, help="clip checkpoint ref (overrides)")
    ap.add_argument("--dino", default=None, help="dino checkpoint ref (overrides)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "score.json"))
    args = ap.parse_args()

    import torch

    from ultracurate.models import make_tiny
    from ultracurate.runner import LocalEngine, default_device, run
    device = args.device or default_device()
    gpu = device.startswith("cuda")
    pairs = args.pairs or (2048 if gpu else 96)
    n_naive = args.naive_pairs or (128 if gpu else 24)
    batch = args.batch_size or (64 if gpu else 32)
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    if args.real:
        models = {"profile": "ultraedit", "clip": "ViT-L-14:random",
                  "dino": "random:dinov2-with-registers-large"}
    else:
        make_tiny(tmp / "tiny", ("clip", "dino"))
        models = {"profile": "tiny", "tiny_dir": str(tmp / "tiny")}
    if args.clip:
        models["clip"] = args.clip
    if args.dino:
        models["dino"] = args.dino
    t0 = time.perf_counter()
    ws = build_workspace(tmp / "ws", pairs, args.size, 30, models)
    print(f"built {pairs} stored pairs ({args.size}px JPEG) in {time.perf_counter() - t0:.1f}s; "
          f"device {device}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}")

    # the batched stage (warm-up on a few rows first, so model loading is not timed)
    from ultracurate.selection import Selection
    warm = max(1, min(batch, pairs // 8))  # leave most rows for the timed run
    run(ws, "score", Selection(limit=warm), device=device, batch_size=batch, progress=False)
    t0 = time.perf_counter()
    s = run(ws, "score", device=device, batch_size=batch, progress=False, engine=LocalEngine())
    t_stage = time.perf_counter() - t0
    assert s.rows_failed == 0 and s.rows_done > 0, s
    stage_pps = s.rows_done / t_stage

    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT candidate_id, source_image, edited_image, source_caption, "
                         "target_caption FROM candidates_v ORDER BY candidate_id LIMIT ?",
                         [n_naive])
        stored = {r["candidate_id"]: r for r in cat.query(
            "SELECT * FROM candidates ORDER BY candidate_id LIMIT ?", [n_naive])}
    naive(ws, rows[:2], device)  # warm-up
    t_naive, ref = naive(ws, rows, device)
    naive_pps = len(rows) / t_naive
    diff = max(abs(stored[c][k] - v) for c, s_ in ref.items() for k, v in s_.items())
    floor = model_floor(ws, device, batch)

    res = {"date": time.strftime("%Y-%m-%d"), "device": device,
           "gpu": torch.cuda.get_device_name(0) if gpu else None, "cpus": os.cpu_count(),
           "models": models, "size": args.size, "batch_size": batch,
           "stage_pairs": s.rows_done, "stage_seconds": round(t_stage, 2),
           "stage_pairs_per_s": round(stage_pps, 2), "naive_pairs": len(rows),
           "naive_seconds": round(t_naive, 2), "naive_pairs_per_s": round(naive_pps, 2),
           "speedup": round(stage_pps / naive_pps, 2),
           "model_floor_ms_per_pair": round(floor, 3),
           "max_abs_score_diff_stage_vs_naive": float(f"{diff:.2e}")}
    print(f"{'method':<28} {'pairs':>6} {'seconds':>8} {'pairs/s':>9}")
    print(f"{'score stage (batched)':<28} {s.rows_done:>6} {t_stage:>8.2f} {stage_pps:>9.2f}")
    print(f"{'naive loop (one at a time)':<28} {len(rows):>6} {t_naive:>8.2f} {naive_pps:>9.2f}")
    print(f"speedup {stage_pps / naive_pps:.2f}x; model floor {floor:.3f} ms/pair "
          f"({1000 / floor:.0f} pairs/s); max |score diff| stage vs naive {diff:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
