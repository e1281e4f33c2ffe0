"""Scoring throughput: pairs/s of the score stage's compute (`ultracurate.scoring.PairScorer`:
batched, each image and caption embedded once, decoding on CPU threads ahead of the models,
pixel scores batched on the GPU) against a naive loop that scores one pair at a time with the
same models (each image and caption encoded alone, SSIM with scikit-image), in the same run,
from JPEGs stored in a media store.

    python bench/score.py                        # CPU, tiny models (what CI can run)
    python bench/score.py --real --device cuda   # CLIP ViT-L/14 + DINOv2-L/14-reg @ 518,
                                                 # the real architectures with random weights
                                                 # (cost does not depend on the weights)
    python bench/score.py --catalog              # the whole score stage over a catalog instead

By default the scorer runs alone, batch after batch, the next batch prepared on a thread while
the models run (as the runner does): no catalog, so it imports no DuckDB, polars or LanceDB and
bench/gpu.sh runs it on the device machine. --catalog runs the stage itself through the runner
over a workspace (DuckDB commits and LanceDB writes included).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")

import numpy as np  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")   # bundled with scikit-image


def synthetic_pairs(media, pairs: int, size: int, per_edit: int) -> list[dict]:
    """pairs candidate pairs stored in media (a MediaStore): noisy crops of real photos as
    JPEGs, unique source and edited images, captions shared by per_edit pairs of an edit.
    Built on threads (noise and JPEG encoding release the GIL); image i is seeded by i."""
    from PIL import Image

    from ultracurate.demo import _skimage_photo
    from ultracurate.images import resize_center_crop, to_jpeg_bytes
    photos = [resize_center_crop(Image.fromarray(_skimage_photo(n)).convert("RGB"), size + 32)
              for n in PHOTOS]

    def variant(i: int) -> str:
        rng = np.random.default_rng(i)
        im = photos[i % len(photos)]
        x, y = rng.integers(0, 32, 2)
        arr = np.asarray(im.crop((x, y, x + size, y + size)), np.int16)
        arr = np.clip(arr + rng.integers(-12, 12, arr.shape), 0, 255).astype(np.uint8)
        return media.put_bytes(to_jpeg_bytes(Image.fromarray(arr), quality=95), "jpg")

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        names = list(pool.map(variant, range(2 * pairs)))
    out = []
    for i in range(pairs):
        e = i // per_edit
        out.append({"candidate_id": i + 1, "edit_id": e + 1, "candidate_index": i % per_edit,
                    "source_image": names[2 * i], "edited_image": names[2 * i + 1],
                    "source_caption": f"a photo of scene {e} on a sunny day",
                    "target_caption": f"a photo of scene {e} on a snowy day"})
    return out


def build_workspace(root: Path, pairs: int, size: int, per_edit: int, models: dict):
    """A workspace whose catalog holds the synthetic pairs as generated candidates."""
    import polars as pl

    from ultracurate.catalog import now
    from ultracurate.workspace import Workspace
    ws = Workspace.init(root, {"models": models})
    rows = synthetic_pairs(ws.media, pairs, size, per_edit)
    with ws.catalog() as cat:
        cat.con.execute("INSERT INTO anchors (anchor_id, sha256, media, width, height) "
                        "VALUES (1, 'x', ?, ?, ?)", [rows[0]["source_image"], size, size])
        first = {}
        for r in rows:
            first.setdefault(r["edit_id"], r)
        n = len(first)
        edits = pl.DataFrame({
            "edit_id": list(first), "anchor_id": [1] * n,
            "source_caption": [r["source_caption"] for r in first.values()],
            "instruction": ["make it snowy"] * n,
            "target_caption": [r["target_caption"] for r in first.values()],
            "edit_type": ["change_global"] * n, "mode": ["free"] * n,
            "created_at": [now()] * n})
        cands = pl.DataFrame({
            "candidate_id": [r["candidate_id"] for r in rows],
            "edit_id": [r["edit_id"] for r in rows],
            "candidate_index": [r["candidate_index"] for r in rows],
            "seed": list(range(len(rows))),
            "source_image": [r["source_image"] for r in rows],
            "edited_image": [r["edited_image"] for r in rows],
            "auto_status": ["generated"] * len(rows), "created_at": [now()] * len(rows)})
        cat.con.execute("BEGIN")
        cat.edits.insert(edits)
        cat.candidates.insert(cands)
        cat.con.execute("COMMIT")
    return ws


def naive(clip, dino, load_rgb, rows: list[dict], device: str
          ) -> tuple[float, dict[int, dict]]:
    """One pair at a time: each image and caption encoded alone, SSIM with scikit-image."""
    import torch

    from ultracurate import metrics
    out = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for r in rows:
        a, b = load_rgb(r["source_image"]), load_rgb(r["edited_image"])
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


def model_floor(clip, dino, device: str, batch: int, reps: int = 3) -> float:
    """ms per pair of the two models alone on already-decoded pixels (2 images per pair)."""
    import torch
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


def run_scorer(scorer, pairs: list[dict], load_rgb, batch: int) -> dict[int, dict]:
    """The scorer over pairs, batch by batch, each next batch prepared on a thread while the
    models score the one before (the runner's order): candidate_id -> scores."""
    batches = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    out: dict[int, dict] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="bench-score-prepare") as ahead:
        nxt = ahead.submit(scorer.prepare, batches[0], load_rgb)
        for k, b in enumerate(batches):
            prepared = nxt.result()
            if k + 1 < len(batches):
                nxt = ahead.submit(scorer.prepare, batches[k + 1], load_rgb)
            s = scorer.score(b, prepared)
            assert not s.failed, s.failed
            for i, cid in enumerate(s.ids):
                out[cid] = {k: float(v[i]) for k, v in s.scores.items()}
    return out


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
    ap.add_argument("--catalog", action="store_true",
                    help="run the whole score stage over a catalog (needs DuckDB, polars, "
                    "LanceDB) instead of its compute alone")
    ap.add_argument("--clip", default=None, help="clip checkpoint ref (overrides)")
    ap.add_argument("--dino", default=None, help="dino checkpoint ref (overrides)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "score.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        bench(args, Path(tmp))


def bench(args, tmp: Path) -> None:
    """The run of main's options, with its models, media and catalog under tmp."""
    import torch

    from ultracurate.models import load, make_tiny
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    pairs = args.pairs or (2048 if gpu else 96)
    n_naive = args.naive_pairs or (128 if gpu else 24)
    batch = args.batch_size or (64 if gpu else 32)
    if args.real:
        models = {"profile": "ultraedit", "clip": "ViT-L-14:random",
                  "dino": "random:dinov2-with-registers-large"}
    else:
        refs = make_tiny(tmp / "tiny", ("clip", "dino"))
        models = {"profile": "tiny", "tiny_dir": str(tmp / "tiny"), **refs}
    if args.clip:
        models["clip"] = args.clip
    if args.dino:
        models["dino"] = args.dino
    t0 = time.perf_counter()
    if args.catalog:
        ws = build_workspace(tmp / "ws", pairs, args.size, 30, models)
        media = ws.media
        with ws.catalog(read_only=True) as cat:
            rows = cat.query("SELECT candidate_id, source_image, edited_image, source_caption, "
                             "target_caption FROM candidates_v ORDER BY candidate_id")
    else:
        from ultracurate.workspace import MediaStore
        media = MediaStore(tmp / "media")
        rows = synthetic_pairs(media, pairs, args.size, 30)
    print(f"built {pairs} stored pairs ({args.size}px JPEG) in {time.perf_counter() - t0:.1f}s; "
          f"device {device}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    clip = load(None, "clip", device, ref=models["clip"])
    dino = load(None, "dino", device, ref=models["dino"])
    warm = max(1, min(batch, pairs // 8))  # leave most rows for the timed run

    if args.catalog:  # the stage through the runner (warm-up on a few rows first)
        from ultracurate.runner import LocalEngine, run
        from ultracurate.selection import Selection
        run(ws, "score", Selection(limit=warm), device=device, batch_size=batch,
            progress=False)
        t0 = time.perf_counter()
        s = run(ws, "score", device=device, batch_size=batch, progress=False,
                engine=LocalEngine())
        t_batched = time.perf_counter() - t0
        assert s.rows_failed == 0 and s.rows_done > 0, s
        n_batched = s.rows_done
        with ws.catalog(read_only=True) as cat:
            scores = {r["candidate_id"]: r for r in cat.query(
                "SELECT * FROM candidates ORDER BY candidate_id LIMIT ?", [n_naive])}
        label = "score stage (batched)"
    else:  # the stage's compute alone (warmed up by a scorer of its own: fresh caches)
        from ultracurate.scoring import PairScorer
        warm_up = PairScorer(clip, dino, device)
        run_scorer(warm_up, rows[:warm], media.load_rgb, batch)
        warm_up.close()
        scorer = PairScorer(clip, dino, device)
        t0 = time.perf_counter()
        scores = run_scorer(scorer, rows, media.load_rgb, batch)
        t_batched = time.perf_counter() - t0
        scorer.close()
        n_batched = len(scores)
        label = "scorer (batched)"
    batched_pps = n_batched / t_batched

    naive(clip, dino, media.load_rgb, rows[:2], device)  # warm-up
    t_naive, ref = naive(clip, dino, media.load_rgb, rows[:n_naive], device)
    naive_pps = len(ref) / t_naive
    diff = max(abs(scores[c][k] - v) for c, s_ in ref.items() for k, v in s_.items())
    floor = model_floor(clip, dino, device, batch)

    res = {"date": time.strftime("%Y-%m-%d"), "device": device,
           "gpu": torch.cuda.get_device_name(0) if gpu else None, "cpus": os.cpu_count(),
           "path": "stage over a catalog" if args.catalog else "scorer, no catalog",
           "models": models, "size": args.size, "batch_size": batch,
           "batched_pairs": n_batched, "batched_seconds": round(t_batched, 2),
           "batched_pairs_per_s": round(batched_pps, 2), "naive_pairs": len(ref),
           "naive_seconds": round(t_naive, 2), "naive_pairs_per_s": round(naive_pps, 2),
           "speedup": round(batched_pps / naive_pps, 2),
           "model_floor_ms_per_pair": round(floor, 3),
           "max_abs_score_diff_batched_vs_naive": float(f"{diff:.2e}")}
    print(f"{'method':<28} {'pairs':>6} {'seconds':>8} {'pairs/s':>9}")
    print(f"{label:<28} {n_batched:>6} {t_batched:>8.2f} {batched_pps:>9.2f}")
    print(f"{'naive loop (one at a time)':<28} {len(ref):>6} {t_naive:>8.2f} {naive_pps:>9.2f}")
    print(f"speedup {batched_pps / naive_pps:.2f}x; model floor {floor:.3f} ms/pair "
          f"({1000 / floor:.0f} pairs/s); max |score diff| batched vs naive {diff:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
