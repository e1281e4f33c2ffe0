"""Export throughput: `ultracurate export --format hf` against building the same dataset with
`datasets.Dataset.from_dict(...)` + `to_parquet`, in the same run, on the same workspace.

A synthetic workspace is built first, shaped like generated data: real JPEGs at 512 px, quality
100 (as the generator saves them), from 640x427 anchors; half the rows region-based with a mask
stored at the anchor's size and gen_params as generation records them (size, soft-mask
settings), so that the export crops every mask into its pair's geometry. Then, each from the
catalog to files on disk:

  ultracurate hf            export_dataset(fmt="hf"): media bytes copied, masks cropped to PNG
  ultracurate hf + soft     the same with soft_masks=True (the soft mask rebuilt per region row)
  datasets (bytes)          the same rows as {bytes, path} dicts -> Dataset.from_dict -> to_parquet
  datasets (PIL)            the usual recipe: decoded PIL images -> from_dict (datasets re-encodes)
  ultracurate jsonl/wds/ip2p the other formats, for reference

Export does no model work, so the figures depend on the disk and CPU, not on a GPU.
Usage: python bench/export.py [--rows 1000] [--size 512] [--repeat 2] [--no-pil] [--keep DIR]
       [--out DIR]
Prints a table and writes bench/out/export.json (--out: another folder).
"""

from __future__ import annotations

import argparse
import io
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
import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from ultracurate.export import (ExportOptions, export_dataset, hf_features,  # noqa: E402
                                hf_row, load_item, record, select_rows)
from ultracurate.masks import encode, soft_mask_settings  # noqa: E402
from ultracurate.selection import Selection  # noqa: E402
from ultracurate.workspace import Workspace  # noqa: E402


ANCHOR_W, ANCHOR_H = 640, 427   # a COCO-shaped landscape photo


def build(root: Path, rows: int, size: int) -> Workspace:
    import skimage.data as data
    ws = Workspace.init(root)
    base = [Image.fromarray(getattr(data, n)()).convert("RGB").resize((size, size))
            for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(0)
    anchors, edits, cands = [], [], []

    def jpeg(im):
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=100)
        return b.getvalue()

    for i in range(rows):
        src = base[i % len(base)]
        arr = np.asarray(src).astype(np.int16) + rng.integers(-8, 8, (size, size, 3))
        src_b = jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
        ed_b = jpeg(Image.fromarray(np.clip(arr[:, ::-1] + 10, 0, 255).astype(np.uint8)))
        s_name, e_name = ws.media.put_bytes(src_b, "jpg"), ws.media.put_bytes(ed_b, "jpg")
        region = i % 2 == 1
        m = np.zeros((ANCHOR_H, ANCHOR_W), bool)   # an L shape at the anchor's size
        m[100:300 + i % 50, 250:300] = True
        m[250:300 + i % 50, 250:420] = True
        rle = encode(m)
        gp = {"mode": "region" if region else "free", "size": size}
        if region:
            gp["mask"] = soft_mask_settings("ultraedit", 0.5, (size,), rle=rle,
                                            height=ANCHOR_H, width=ANCHOR_W)
        anchors.append({"anchor_id": i + 1, "sha256": s_name.split(".")[0], "media": s_name,
                        "width": ANCHOR_W, "height": ANCHOR_H})
        edits.append({"edit_id": i + 1, "anchor_id": i + 1, "source_caption": f"photo {i}",
                      "instruction": f"edit number {i}", "target_caption": f"photo {i} edited",
                      "edit_object": "object" if region else "NONE",
                      "edit_type": ("add", "replace", "change_color")[i % 3],
                      "mode": "region" if region else "free", "edit_status": "grounded",
                      "mask_rle": rle if region else None,
                      "mask_height": ANCHOR_H if region else None,
                      "mask_width": ANCHOR_W if region else None})
        cands.append({"candidate_id": i + 1, "edit_id": i + 1, "candidate_index": 0, "seed": i,
                      "source_image": s_name, "edited_image": e_name, "clip_sim_source": 0.3,
                      "clip_sim_target": 0.3, "clip_sim_dir": 0.25, "clip_sim_image": 0.8,
                      "dinov2_sim": 0.7, "ssim": 0.6, "auto_status": "accepted",
                      "gen_params": json.dumps(gp)})
    with ws.catalog() as cat:
        cat.con.execute("BEGIN")
        cat.anchors.insert(pl.DataFrame(anchors))
        cat.edits.insert(pl.DataFrame(edits))
        cat.candidates.insert(pl.DataFrame(cands))
        cat.con.execute("COMMIT")
    return ws


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def baseline_datasets(ws: Workspace, out: Path, pil: bool) -> None:
    """What a user writes without ultracurate: rows from the catalog (masks in the pair's
    geometry by the same code), then datasets."""
    import datasets
    with ws.catalog(read_only=True) as cat:
        rows = select_rows(cat, Selection())
    feats = hf_features()
    opts = ExportOptions()
    out.mkdir(parents=True)
    recs = [hf_row(record(load_item(ws, r), opts)) for r in rows]
    if pil:
        for r in recs:
            for k in ("source_image", "edited_image", "mask_image"):
                if r[k] is not None:
                    r[k] = Image.open(io.BytesIO(r[k]["bytes"]))
    cols = {k: [r[k] for r in recs] for k in feats}
    ds = datasets.Dataset.from_dict(cols, features=feats)
    ds.to_parquet(str(out / "train.parquet"))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-pil", action="store_true", help="skip the decoded-PIL baseline")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs each")
    ap.add_argument("--keep", type=Path, help="build the workspace here and keep it")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="folder for export.json")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        t = time.perf_counter()
        ws = build(root / "ws", args.rows, args.size)
        print(f"built {args.rows} rows at {args.size}px in {time.perf_counter() - t:.1f} s")
        media_mb = folder_bytes(ws.root / "media") / 1e6
        results = []

        import datasets  # noqa: F401  (imports out of the timings)
        import pyarrow.parquet  # noqa: F401
        import webdataset  # noqa: F401

        def run(name, fn, out):
            secs = []
            for _ in range(args.repeat):  # best of N; each writes a fresh folder
                shutil.rmtree(out, ignore_errors=True)
                secs.append(timed(fn))
            secs = min(secs)
            mb = folder_bytes(out) / 1e6
            results.append({"method": name, "seconds": round(secs, 3),
                            "rows_per_s": round(args.rows / secs, 1),
                            "mb_per_s": round(mb / secs, 1), "output_mb": round(mb, 1)})

        outs = root / "outs"
        run("ultracurate hf", lambda: export_dataset(ws, None, outs / "hf", "hf", progress=False),
            outs / "hf")
        run("ultracurate hf --soft-masks",
            lambda: export_dataset(ws, None, outs / "hfs", "hf", soft_masks=True,
                                   progress=False), outs / "hfs")
        run("datasets from_dict (bytes)",
            lambda: baseline_datasets(ws, outs / "ds_bytes", pil=False), outs / "ds_bytes")
        if not args.no_pil:
            run("datasets from_dict (PIL, re-encoded)",
                lambda: baseline_datasets(ws, outs / "ds_pil", pil=True), outs / "ds_pil")
        for fmt in ("jsonl", "wds", "ip2p"):
            run(f"ultracurate {fmt}",
                lambda fmt=fmt: export_dataset(ws, None, outs / fmt, fmt, progress=False),
                outs / fmt)
        base = next(r for r in results if r["method"] == "datasets from_dict (bytes)")
        print(f"\nrows {args.rows}, {args.size}px JPEG q100, media {media_mb:.1f} MB")
        print(f"{'method':<38} {'s':>8} {'rows/s':>9} {'MB/s':>8} {'out MB':>8} {'vs datasets':>11}")
        for r in results:
            r["speedup_vs_datasets_bytes"] = round(base["seconds"] / r["seconds"], 2)
            print(f"{r['method']:<38} {r['seconds']:>8.2f} {r['rows_per_s']:>9.1f} "
                  f"{r['mb_per_s']:>8.1f} {r['output_mb']:>8.1f} "
                  f"{r['speedup_vs_datasets_bytes']:>10.2f}x")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "export.json").write_text(json.dumps(
            {"rows": args.rows, "size": args.size, "media_mb": media_mb, "results": results},
            indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
