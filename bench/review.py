"""Review dataset upkeep: what re-running `ultracurate review` costs when little has changed,
against rebuilding the FiftyOne dataset from scratch (the baseline), in the same run.

A synthetic workspace of N candidates (half region-based with a mask; small PNGs in the media
store) is built through the real catalog, then:

  full build        empty dataset -> N groups (4 slices each for region, 3 for free-form)
  no-op update      rebuild with nothing changed (fingerprints compared, nothing written)
  1% changed        rebuild after a re-filter touched 1% of the rows
  full rebuild      baseline: delete the dataset and build it again (what a tool without
                    incremental updates does after any change)
  pull 5% tagged    tags on 5% of the groups pulled into the catalog

Usage: python bench/review.py [--rows N] [--size PX] [--out DIR]
Prints a table and writes bench/out/review.json (--out: another folder). FiftyOne's database
lives in a temporary folder unless FIFTYONE_DATABASE_URI / FIFTYONE_DATABASE_DIR say
otherwise. No model runs, so a GPU does not change these figures.
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

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_workspace(root: Path, n: int, size: int):
    import polars as pl
    from pycocotools import mask as coco_mask

    from ultracurate.catalog import now
    from ultracurate.names import EDIT_TYPES
    from ultracurate.workspace import Workspace
    ws = Workspace.init(root)
    rng = np.random.default_rng(0)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return ws.media.put_bytes(buf.getvalue(), "png")

    n_anchors = max(1, n // 4)
    anchors, edits, cands, rejects = [], [], [], []
    for a in range(1, n_anchors + 1):
        img = rng.integers(0, 255, (size, size, 3), np.uint8)
        anchors.append(dict(anchor_id=a, sha256=f"{a:064x}", media=png(img), width=size,
                            height=size, ingested_at=now()))
    for cid in range(1, n + 1):
        a = (cid - 1) % n_anchors + 1
        mode = "region" if cid % 2 else "free"
        m = np.zeros((size, size), np.uint8)
        m[size // 4:size // 2 + cid % (size // 4), size // 4:3 * size // 4] = 1
        rle = coco_mask.encode(np.asfortranarray(m))["counts"].decode()
        edits.append(dict(edit_id=cid, anchor_id=a, source_caption=f"photo {a}",
                          instruction=f"edit {cid}", target_caption=f"edited photo {cid}",
                          edit_object="thing" if mode == "region" else "NONE",
                          edit_type=EDIT_TYPES[cid % len(EDIT_TYPES)], mode=mode,
                          edit_status="grounded",
                          mask_rle=rle if mode == "region" else None,
                          mask_height=size if mode == "region" else None,
                          mask_width=size if mode == "region" else None,
                          mask_class=("fine", "too_small", "fragmented")[cid % 3]
                          if mode == "region" else None, created_at=now()))
        d = float(rng.uniform(0.1, 0.4))
        cands.append(dict(candidate_id=cid, edit_id=cid, candidate_index=0, seed=cid,
                          source_image=png(rng.integers(0, 255, (size, size, 3), np.uint8)),
                          edited_image=png(rng.integers(0, 255, (size, size, 3), np.uint8)),
                          clip_sim_source=0.3, clip_sim_target=0.3, clip_sim_dir=d,
                          clip_sim_image=float(rng.uniform(0.6, 0.95)), dinov2_sim=0.6,
                          ssim=0.5, l1=0.1, l2=0.02,
                          auto_status="accepted" if d >= 0.22 else "rejected",
                          created_at=now()))
        if d < 0.22:
            rejects.append(dict(candidate_id=cid, reason_index=0, reason="clip_sim_dir < 0.22"))
    with ws.catalog() as cat:
        cat.con.execute("BEGIN")
        for table, rows in (("anchors", anchors), ("edits", edits), ("candidates", cands),
                            ("candidate_rejects", rejects)):
            cat.table(table).insert(pl.DataFrame(rows, infer_schema_length=None))
        cat.con.execute("COMMIT")
    return ws


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="folder for review.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="uc-bench-review-"))
    if not (os.environ.get("FIFTYONE_DATABASE_URI") or os.environ.get("FIFTYONE_DATABASE_DIR")):
        os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp / "fodb")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("ULTRACURATE_PROGRESS", "0")
    from ultracurate import review
    try:
        ws = make_workspace(tmp / "ws", args.rows, args.size)
        import fiftyone as fo
        fo.Dataset("uc-bench-warmup", overwrite=True).delete()  # start mongod outside timings
        n = args.rows
        rows = []

        t, s = timed(lambda: review.build_review_dataset(ws, progress=False, embeddings=False))
        assert s.added == n
        rows.append(("full build", t, s.added))

        t, s = timed(lambda: review.build_review_dataset(ws, progress=False, embeddings=False))
        assert s.unchanged == n
        rows.append(("no-op update", t, 0))

        k = max(1, n // 100)
        with ws.catalog() as cat:
            cat.con.execute("UPDATE candidates SET clip_sim_dir = clip_sim_dir + 0.01 "
                            "WHERE candidate_id <= ?", [k])
        t, s = timed(lambda: review.build_review_dataset(ws, progress=False, embeddings=False))
        assert s.updated == k
        rows.append(("1% changed", t, k))

        def rebuild():
            fo.delete_dataset(review.dataset_name(ws))
            return review.build_review_dataset(ws, progress=False, embeddings=False)
        t, s = timed(rebuild)
        assert s.added == n
        rows.append(("full rebuild (baseline)", t, n))

        ds = review.open_review_dataset(ws)
        tagged = max(1, n // 20)
        ds.select_group_slices("edited").limit(tagged).tag_samples(["reject"])
        t, p = timed(lambda: review.pull_decisions(ws, reviewer="bench"))
        assert p.changed == tagged
        rows.append(("pull 5% tagged", t, tagged))

        base = dict((r[0], r[1]) for r in rows)["full rebuild (baseline)"]
        print(f"review upkeep, {n} candidates ({args.size} px), FiftyOne {fo.__version__}")
        print(f"{'step':<26} {'s':>8} {'groups written':>15} {'vs full rebuild':>16}")
        out = []
        for name, secs, written in rows:
            print(f"{name:<26} {secs:>8.2f} {written:>15} {base / secs:>15.1f}x")
            out.append({"step": name, "seconds": round(secs, 3), "groups_written": written,
                        "speedup_vs_full_rebuild": round(base / secs, 2)})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "review.json").write_text(json.dumps({"rows": n, "size": args.size,
                                                      "results": out}, indent=2))
        fo.delete_dataset(review.dataset_name(ws))
    finally:
        shutil.rmtree(tmp / "ws", ignore_errors=True)


if __name__ == "__main__":
    main()
