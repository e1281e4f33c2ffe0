"""Does generating wait for its writes? (issue 15) Pairs per second of the real `generate`
job (the runner, the stage, the tiny editor) with everything it writes (both images JPEG
encoded into the media store, the rows committed to the catalog), against the same stage's
rendering alone on the same batches in the same process (images neither encoded nor written,
nothing committed). The runner completes and commits a batch on its commit thread while the
next batch renders, and the stage's writer threads encode while the next call runs, so the
two rates should be within 10% where a call takes about as long as on the GPU (a second or
more for SDXL at 512 px): the default, the tiny editor at 256 px, 1.5 s per call of 8 pairs on
one core. At 64 px a call takes 0.1 s, and what the host does per batch (JPEG encoding, which
holds the GIL against the model's Python, and the commit) no longer hides behind it: about
-15% on the 2-core machine.

    python bench/generate_overlap.py                     # CPU, tiny editor, 256 px
    python bench/generate_overlap.py --size 64 --edits 64  # the host's share shows

Anchors are random photos ingested through the real ingest stage; each edit is free-form.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def workspace(root: Path, n_edits: int, size: int):
    from ultracurate.catalog import now
    from ultracurate.models import make_tiny
    from ultracurate.runner import run
    from ultracurate.stages.ingest import IngestStage, discover
    from ultracurate.workspace import Workspace
    tiny = root / "tiny"
    make_tiny(tiny, ("editor",))
    ws = Workspace.init(root / "ws", {"models": {"profile": "tiny", "tiny_dir": str(tiny)}})
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    n_anchors = max(1, n_edits // 2)
    for i in range(n_anchors):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(
            photos / f"p{i}.png")
    run(ws, IngestStage(items=discover([photos])), progress=False)
    with ws.catalog() as cat:
        anchors = [r["anchor_id"] for r in cat.query("SELECT anchor_id FROM anchors")]
        with cat.transaction():
            cat.edits.insert([{
                "edit_id": i + 1, "anchor_id": anchors[i % len(anchors)],
                "source_caption": f"a photo number {i}", "instruction": "make it snowy",
                "target_caption": f"a photo number {i} in the snow", "edit_object": "NONE",
                "edit_type": "change_global", "mode": "free", "edit_status": "proposed",
                "created_at": now()} for i in range(n_edits)])
    return ws


def render_only(ws, opts: dict, batch: int) -> tuple[int, float]:
    """The stage's compute on the planned rows' batches, nothing encoded, written or
    committed: its JPEG writer replaced by a no-op that returns a fixed name."""
    from ultracurate.runner import Context, pending_batches
    from ultracurate.selection import Selection
    from ultracurate.stages import generate as G
    from ultracurate.stages import make_stage
    stage = make_stage("generate", opts)
    ctx = Context(str(ws.root), "cpu", 0, ws.config, batch_size=batch, show_progress=False)
    stage.setup(ctx)
    put = G._put_jpeg
    G._put_jpeg = lambda ws, im: "0" * 64 + ".jpg"
    try:
        with ws.catalog(read_only=True) as cat:
            n, batches = pending_batches(stage, cat, Selection(), False, batch, ws.scratch)
            batches = list(batches)
        t = time.perf_counter()
        pairs = 0
        for rows in batches:
            res = stage.process(rows, stage.prepare(rows, ctx), ctx).completed()
            pairs += len(res.updates["candidates"])
        return pairs, time.perf_counter() - t
    finally:
        G._put_jpeg = put
        stage.finish(None)


def full_job(ws, opts: dict, batch: int) -> tuple[int, float]:
    """The generate job through the runner, timed from its first batch (after the model is
    loaded) to its end (the last commit)."""
    from ultracurate.runner import LocalEngine, run

    class Timed(LocalEngine):
        def map(self, stage, batches, ctx, stop=None):
            stage.setup(ctx)
            stage.setup = lambda ctx: None  # loaded once, before the clock
            self.t0 = time.perf_counter()
            yield from super().map(stage, batches, ctx, stop=stop)
    eng = Timed()
    s = run(ws, "generate", engine=eng, batch_size=batch, progress=False, device="cpu",
            **opts)
    return s.rows_done, time.perf_counter() - eng.t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--edits", type=int, default=24)
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="alternate the two, best of N")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="the model's threads (default 1: the other core is the GPU's host "
                         "side, where writes and commits run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out",
                    help="folder for generate_overlap.json")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.torch_threads)
    root = Path(tempfile.mkdtemp(prefix="uc-genoverlap-"))
    try:
        measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(args, root: Path) -> None:
    ws = workspace(root, args.edits, args.size)
    base = dict(size=args.size, pairs_per_call=args.batch, mode="free")
    from ultracurate.stages.generate import plan_candidates
    # warm-up (model load, first calls), then alternate: each full job renders a fresh set
    # of candidate indices, each render-only pass the same ones as the job before it
    best_full, best_render, rows = [], [], []
    k = 1
    full_job(ws, dict(base, candidates=k), args.batch)
    for _ in range(args.repeat):
        k += args.candidates
        with ws.catalog() as cat:
            plan_candidates(cat, None, k)
        # render-only over the rows still planned (the job below renders them)
        pairs_r, t_r = render_only(ws, dict(base, candidates=k), args.batch)
        pairs_f, t_f = full_job(ws, dict(base, candidates=k), args.batch)
        rows.append({"render_only": [pairs_r, t_r], "with_writes": [pairs_f, t_f]})
        best_render.append(pairs_r / t_r)
        best_full.append(pairs_f / t_f)
    r, f = max(best_render), max(best_full)
    load = os.getloadavg()[0]
    print(f"tiny editor, {args.size} px, {args.edits} edits x {args.candidates} candidates, "
          f"batch {args.batch} pairs (one call), load average {load:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"render only (no encode, write or commit): {r:.2f} pairs/s")
    print(f"generate job with every write and commit:  {f:.2f} pairs/s "
          f"({100 * (f / r - 1):+.1f}%; target: within 10%)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generate_overlap.json").write_text(json.dumps(
        {"args": {**vars(args), "out": str(args.out)}, "runs": rows, "render_only_pairs_s": r,
         "with_writes_pairs_s": f, "load": load}, indent=2))


if __name__ == "__main__":
    main()
