"""Catalog at UltraEdit's scale: build a synthetic catalog of 4.1M edits (one candidate each;
41M with --rows 41000000) through the real schema, then time what users run most against pandas
on the same data, in the same run:

  stats         every query behind `ultracurate stats`
  where         a --where selection over candidates_v (a join of three tables)
  pending       the runner's selection of pending rows (selection minus stage_state 'done'),
                all of them as a DataFrame; pending_first_batch: the count and the first batch,
                which is what a job waits for (the runner writes the pending rows to a file
                first, then reads its batches back)
  anchor_lookup which of 64 sha256 are anchors (what ingest and the UltraEdit import ask per
                batch), through the sha256 index, against `IN (SELECT unnest(?))`, a scan
  where_guard   the --where guard alone (parse, classify functions, run the predicate once
                under the time and memory bounds), paid once per selection (issue #11)
  open          opening the catalog read-only with its checks (file length in whole blocks,
                schema version and checksum), against a bare duckdb.connect

Usage: python bench/catalog.py [--rows N] [--no-pandas] [--keep DIR] [--out DIR]
Prints a table and writes bench/out/catalog-N.json (--out: another folder). Peak RSS is reported
(41M must fit 24 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultracurate.names import EDIT_TYPES  # noqa: E402
from ultracurate.runner import Access, RowStage, pending_batches, pending_sql  # noqa: E402
from ultracurate.selection import Selection, selected_keys_sql  # noqa: E402
from ultracurate.stages.ingest import known_anchors  # noqa: E402
from ultracurate.stats import catalog_stats  # noqa: E402
from ultracurate.workspace import Workspace  # noqa: E402

WHERE = "edit_type = 'replace' AND clip_sim_dir > $min_dir AND mode = 'region'"


class ScoreLike(RowStage):
    """Selection shape of a scoring stage: candidates that are generated, not yet done."""
    name = "bench_score"
    table = "candidates"
    default_where = "auto_status IN ('generated', 'scored')"
    columns = "candidate_id, source_image, edited_image, source_caption, target_caption"


def build(ws: Workspace, n: int) -> float:
    """n edits with one candidate each (a third free-form, the rest region with a mask and
    its stored features), through the schema the workspace has (before migration 011 too:
    reject reasons and mask boxes as list columns there)."""
    t0 = time.perf_counter()
    types = "[" + ", ".join(f"'{t}'" for t in EDIT_TYPES) + "]"
    n_anchors = max(1, n * 16 // 41)  # UltraEdit: ~1.6M anchors for 4.1M edits
    # the synthetic rows go in through a plain connection: the catalog's own connections
    # have their configuration locked (ultracurate.limits), and this one needs a setting
    with contextlib.closing(duckdb.connect(str(ws.catalog_path),
                                           config={"preserve_insertion_order": False,
                                                   "memory_limit": "6GB"})) as con:
        columns = {t: {r[0] for r in con.execute(f"DESCRIBE {t}").fetchall()}
                   for t in ("edits", "candidates")}
        list_reasons = "reject_reasons" in columns["candidates"]
        list_bbox = "mask_bbox" in columns["edits"]
        con.execute(f"""
            INSERT INTO anchors (anchor_id, sha256, media, source_path, dataset, width, height,
                                 format, orig_mode, conversion, ingested_at)
            SELECT i, md5(i::VARCHAR), sha256(i::VARCHAR) || '.jpg', '/data/coco/' || i || '.jpg',
                   'coco', 640, 480, 'JPEG', 'RGB', '', now()
            FROM range(1, {n_anchors} + 1) t(i)""")
        con.execute(f"""
            INSERT INTO anchor_captions (anchor_id, caption_index, caption, source, created_at)
            SELECT i, 0, 'a photo number ' || i, 'coco', now()
            FROM range(1, {n_anchors} + 1) t(i)""")
        # region rows: a mask (a placeholder RLE, never decoded: its features are stored)
        region = "i % 3 <> 0"
        bbox_cols = "mask_bbox" if list_bbox else \
            "mask_bbox_x, mask_bbox_y, mask_bbox_w, mask_bbox_h"
        bbox_vals = (f"CASE WHEN {region} THEN [10, 20, 100, 80] END" if list_bbox else
                     ", ".join(f"CASE WHEN {region} THEN {v} END" for v in (10, 20, 100, 80)))
        con.execute(f"""
            INSERT INTO edits (edit_id, anchor_id, source_caption, instruction, target_caption,
                               edit_object, edit_type, mode, edit_status, mask_area, mask_class,
                               mask_rle, mask_height, mask_width, mask_components,
                               mask_contours, {bbox_cols}, created_at)
            SELECT i, 1 + (i % {n_anchors}), 'a photo number ' || i, 'make it number ' || i,
                   'a photo changed ' || i,
                   CASE WHEN {region} THEN 'object' ELSE 'NONE' END,
                   {types}[1 + (hash(i) % 9)::INTEGER],
                   CASE WHEN {region} THEN 'region' ELSE 'free' END,
                   CASE WHEN {region} THEN 'grounded' ELSE 'proposed' END,
                   (hash(i * 7) % 1000) / 1000.0,
                   ['fine', 'too_small', 'too_large', 'fragmented'][1 + (hash(i * 3) % 4)::INTEGER],
                   CASE WHEN {region} THEN 'bench' END,
                   CASE WHEN {region} THEN 480 END, CASE WHEN {region} THEN 640 END,
                   CASE WHEN {region} THEN 1 + hash(i * 11) % 3 END,
                   CASE WHEN {region} THEN 1 + hash(i * 13) % 30 END,
                   {bbox_vals}, now()
            FROM range(1, {n} + 1) t(i)""")
        rejected = "hash(i * 5) % 4 = 3"
        con.execute(f"""
            INSERT INTO candidates (candidate_id, edit_id, candidate_index, seed, gen_behaviour,
                                    source_image, edited_image, clip_sim_source,
                                    clip_sim_target, clip_sim_dir, clip_sim_image, dinov2_sim,
                                    ssim, auto_status, filter_run, created_at
                                    {', reject_reasons' if list_reasons else ''})
            SELECT i, i, 0, (hash(i) % 1000000007)::BIGINT, 'method', sha256(i::VARCHAR) || '.jpg',
                   sha256((i + 1)::VARCHAR) || '.jpg',
                   (hash(i) % 1000) / 2000.0, (hash(i + 1) % 1000) / 2000.0,
                   (hash(i + 2) % 1000) / 2000.0, 0.5 + (hash(i + 3) % 1000) / 2000.0,
                   (hash(i + 4) % 1000) / 1000.0, (hash(i + 5) % 1000) / 1000.0,
                   ['generated', 'scored', 'accepted', 'rejected'][1 + (hash(i * 5) % 4)::INTEGER],
                   CASE WHEN hash(i * 5) % 4 >= 2 THEN 1 END, now()
                   {f", CASE WHEN {rejected} THEN ['clip_sim_dir < 0.22'] END"
                    if list_reasons else ''}
            FROM range(1, {n} + 1) t(i)""")
        if not list_reasons:
            con.execute(f"""
                INSERT INTO candidate_rejects (candidate_id, reason_index, reason, filter_run)
                SELECT i, 0, 'clip_sim_dir < 0.22', 1 FROM range(1, {n} + 1) t(i)
                WHERE {rejected}""")
        # half the candidates already scored: the runner must skip them
        con.execute(f"""
            INSERT INTO stage_state (stage, key, state, run_id, updated_at)
            SELECT 'bench_score', i, 'done', 1, now() FROM range(1, {n} + 1, 2) t(i)""")
        con.execute("CHECKPOINT")
    return time.perf_counter() - t0


def best_of(fn, repeat=3):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_ultracurate(ws: Workspace) -> dict:
    res = {}
    with ws.catalog(read_only=True) as cat:
        res["stats"], stats = best_of(lambda: catalog_stats(cat))
        sel = Selection(where=WHERE, params={"min_dir": 0.25})

        def where():
            sql, p = selected_keys_sql(cat.con, "candidates_v", "candidate_id", sel,
                                       columns="candidate_id")
            return cat.arrow(sql, p).num_rows
        res["where"], n_where = best_of(where)
        # a fresh Selection each time: the guard's check is memoised per selection
        res["where_guard"], _ = best_of(lambda: Selection(
            where=WHERE, params={"min_dir": 0.25}).checked(cat.con, "candidates_v"))
        stage = ScoreLike()
        def pending_rows():  # the runner's pending selection, sorted, as one Arrow table
            sql, p = pending_sql(stage, cat, Selection(), False)
            return cat.arrow(sql + " ORDER BY candidate_id", p).num_rows
        res["pending"], pending = best_of(pending_rows)

        def first_batch():  # what a job waits for before its first batch starts (its
            # first key window; the count comes with the last one)
            n, batches = pending_batches(stage, cat, Selection(), False, 32, ws.scratch)
            first = next(batches)
            batches.close()
            return n, len(first)
        res["pending_first_batch"], (n_first, first_rows) = best_of(first_batch)
        assert n_first in (None, pending) and first_rows == min(32, pending)

        shas = [r[0] for r in cat.con.execute(
            "SELECT sha256 FROM anchors USING SAMPLE 64 ROWS").fetchall()]
        r = Access(cat, stage)
        res["anchor_lookup"], found = best_of(lambda: len(known_anchors(r, shas)))
        res["anchor_lookup_scan"], scanned = best_of(lambda: len(cat.con.execute(
            "SELECT sha256, anchor_id, source_path FROM anchors WHERE sha256 IN "
            "(SELECT unnest(?))", [shas]).fetchall()))
        assert found == scanned == len(shas)
    res["open"], _ = best_of(lambda: ws.catalog(read_only=True).close())
    res["open_bare"], _ = best_of(lambda: duckdb.connect(str(ws.catalog_path),
                                                         read_only=True).close())
    return {"seconds": res, "where_rows": n_where, "pending_rows": pending,
            "candidates_by_status": stats["candidates_by_status"]}


def run_pandas(ws: Workspace) -> dict:
    import pandas as pd
    with ws.catalog(read_only=True) as cat:
        t0 = time.perf_counter()
        anchors = cat.arrow("SELECT * FROM anchors").to_pandas()
        edits = cat.arrow("SELECT * FROM edits").to_pandas()
        cands = cat.arrow("SELECT * FROM candidates").to_pandas()
        state = cat.arrow("SELECT * FROM stage_state").to_pandas()
        rejects = cat.arrow("SELECT * FROM ingest_rejects").to_pandas()
        cat_rejects = (cat.arrow("SELECT * FROM candidate_rejects").to_pandas()
                       if "reject_reasons" not in cands.columns else None)
        load = time.perf_counter() - t0
    res = {}

    def stats():
        out = {"anchors": {"anchors": len(anchors), "rejected files": len(rejects)}}
        out["edits_by_status"] = edits["edit_status"].value_counts().to_dict()
        out["edits_by_type"] = edits["edit_type"].value_counts().to_dict()
        out["edits_by_mode"] = edits["mode"].value_counts().to_dict()
        out["mask_class"] = edits.loc[edits["mode"] == "region", "mask_class"].fillna(
            "unclassified").value_counts().to_dict()
        status = cands["human_decision"].map({"accept": "accepted", "reject": "rejected"})
        out["candidates_by_status"] = status.fillna(cands["auto_status"]).value_counts().to_dict()
        merged = cands[["edit_id"]].merge(edits[["edit_id", "edit_type"]], on="edit_id")
        out["candidates_by_type"] = merged["edit_type"].value_counts().to_dict()
        reasons = cat_rejects["reason"] if cat_rejects is not None else \
            cands["reject_reasons"].dropna().explode()
        out["reject_reasons"] = reasons.value_counts().to_dict()
        out["ingest_reject_reasons"] = rejects["reason"].value_counts().to_dict()
        out["failed_by_stage"] = state.loc[state["state"] == "failed", "stage"].value_counts().to_dict()
        return out
    res["stats"], _ = best_of(stats)

    def where():
        view = cands.merge(edits, on="edit_id").merge(anchors, on="anchor_id")
        m = (view["edit_type"] == "replace") & (view["clip_sim_dir"] > 0.25) & (view["mode"] == "region")
        return len(view.loc[m, "candidate_id"].to_numpy())  # the keys, as ultracurate returns
    res["where"], n_where = best_of(where)

    def pending():
        done = state.loc[(state["stage"] == "bench_score") & (state["state"] == "done"), "key"]
        view = cands.merge(edits, on="edit_id").merge(anchors, on="anchor_id")
        m = view["auto_status"].isin(["generated", "scored"]) & ~view["candidate_id"].isin(done)
        cols = [c.strip() for c in ScoreLike.columns.split(",")]
        return len(view.loc[m, cols].sort_values("candidate_id"))  # the rows a job gets
    res["pending"], n_pending = best_of(pending)
    return {"seconds": res, "load_seconds": load, "where_rows": n_where, "pending_rows": n_pending}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_100_000)
    ap.add_argument("--no-pandas", action="store_true", help="skip the pandas baseline")
    ap.add_argument("--keep", help="build the catalog in this folder and keep it")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out",
                    help="folder for catalog-ROWS.json")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="uc-bench-"))
    if (root / "ws").exists():
        ws = Workspace(root / "ws")
        build_s = 0.0
    else:
        ws = Workspace.init(root / "ws")
        print(f"building {args.rows:,} edits + candidates in {ws.root} ...", flush=True)
        build_s = build(ws, args.rows)
    size_gb = ws.catalog_path.stat().st_size / 1e9
    print(f"built in {build_s:.1f} s, catalog file {size_gb:.2f} GB", flush=True)
    uc = run_ultracurate(ws)
    out = {"rows": args.rows, "build_seconds": build_s, "catalog_gb": size_gb, "ultracurate": uc}
    if not args.no_pandas:
        pd_res = run_pandas(ws)
        assert pd_res["where_rows"] == uc["where_rows"], (pd_res["where_rows"], uc["where_rows"])
        assert pd_res["pending_rows"] == uc["pending_rows"]
        out["pandas"] = pd_res
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\n{'query':<20}{'ultracurate (s)':>18}{'pandas (s)':>14}{'speed-up':>10}")
    for q in ("stats", "where", "pending", "pending_first_batch"):
        a = uc["seconds"][q]
        b = out.get("pandas", {}).get("seconds", {}).get(q)
        if q == "pending_first_batch":
            b = out.get("pandas", {}).get("seconds", {}).get("pending")
        print(f"{q:<20}{a:>18.3f}" + (f"{b:>14.3f}{b / a:>9.1f}x" if b else f"{'-':>14}{'-':>10}"))
    a, b = uc["seconds"]["anchor_lookup"], uc["seconds"]["anchor_lookup_scan"]
    print(f"{'anchor_lookup':<20}{a:>18.4f}{b:>14.4f}{b / a:>9.1f}x  (baseline: IN (SELECT "
          "unnest(?)), a scan)")
    g = uc["seconds"]
    print(f"where_guard         {g['where_guard']:>18.3f}  (once per selection, before its "
          f"query)\nopen with checks    {g['open']:>18.3f}  (bare duckdb.connect: "
          f"{g['open_bare']:.3f})")
    if "pandas" in out:
        print(f"(pandas also spent {out['pandas']['load_seconds']:.1f} s loading the tables)")
    print(f"rows selected: where {uc['where_rows']:,}, pending {uc['pending_rows']:,}; "
          f"peak RSS {out['peak_rss_gb']:.2f} GB")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"catalog-{args.rows}.json").write_text(json.dumps(out, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
