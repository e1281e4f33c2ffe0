"""Captioning throughput and the caption catalog's cost, each against its baseline in the same run:

  local    the tiny random-weight captioner (LLaVA architecture, `make_tiny`) on the CPU, on
           real photos: one photo per generate call against --batch photos per call; with and
           without the tiny grammar. With --model REF --device cuda: a real checkpoint.
  http     the OpenAI-compatible vision back-end (photos as JPEG data URLs) against a loopback
           server (tests/_loopback.py) that takes --latency s per answer, a stand-in for a
           served VLM: --concurrency N requests in flight against 1 at a time
  catalog  anchor_captions at --anchors anchors x 5 captions: merging a batch of 16 anchors'
           captions with the anchor-id range hint against without it; adding a caption to every
           anchor (one INSERT) against the old list column's UPDATE of every row; what a
           --where on captions costs through anchors_v against one that does not touch them

Usage: python bench/caption.py [--photos 32] [--batch 8] [--requests 64] [--latency 0.05]
       [--concurrency 8] [--anchors 1000000] [--skip local,http,catalog]
       [--model REF] [--device cpu|cuda]
       [--out DIR]
Prints a table and writes bench/out/caption.json (--out: another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GOOD = "a ginger cat resting on a wooden floor"


def _photos(n: int) -> list:
    """n real photos: the demo's, and crops of them (distinct sizes)."""
    from ultracurate.demo import write_demo_photos
    from ultracurate.images import load_rgb
    folder = write_demo_photos(Path(tempfile.mkdtemp()) / "photos").parent
    base = [load_rgb(p) for p in sorted(folder.iterdir()) if p.suffix in (".jpg", ".png")]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        k = i // len(base)
        out.append(im if k == 0 else im.crop((k, k, im.width - k, im.height - k)))
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_local(photos: list, batch: int, ref: str | None, device: str) -> dict:
    from ultracurate.captioners import LocalCaptioner
    if ref is None:
        from ultracurate.models import make_tiny
        ref = make_tiny(Path(tempfile.mkdtemp()) / "tiny", ("captioner",))["captioner"]
    out: dict = {"model": ref, "device": device, "photos": len(photos)}
    grammars = [None, "tiny-caption"] if "tiny" in ref else [None]
    for grammar in grammars:
        row = {}
        for bs in (1, batch):
            cap = LocalCaptioner(ref, device=device, batch_size=bs, grammar=grammar,
                                 max_new_tokens=20)
            payloads = [cap.encode(im) for im in photos]
            cap.caption(payloads[:1], [0])  # warm-up
            sync = _cuda_sync if device.startswith("cuda") else (lambda: None)
            sync()
            dt = _timed(lambda: (cap.caption(payloads, list(range(len(payloads)))), sync()))
            row[f"batch_{bs}"] = {"seconds": dt, "photos_per_s": len(photos) / dt}
        row["speedup"] = row[f"batch_{batch}"]["photos_per_s"] / row["batch_1"]["photos_per_s"]
        out[f"grammar_{grammar or 'none'}"] = row
    return out


def _cuda_sync():
    import torch
    torch.cuda.synchronize()


def bench_http(photos: list, n: int, latency: float, concurrency: int) -> dict:
    from _loopback import LoopbackServer, completion

    from ultracurate.captioners import HTTPCaptioner, validate_caption

    class Slow(LoopbackServer):
        def answer(self, body, headers):
            time.sleep(latency)
            return 200, completion(GOOD), {}

    server = Slow()
    out: dict = {"requests": n, "latency_s": latency}
    try:
        for c in (1, concurrency):
            cap = HTTPCaptioner(server.url, "bench-vlm", concurrency=c, timeout=30)
            t = time.perf_counter()
            payloads = [cap.encode(photos[i % len(photos)]) for i in range(n)]
            encode = time.perf_counter() - t
            t = time.perf_counter()
            answers = cap.caption(payloads, list(range(n)))
            dt = time.perf_counter() - t
            cap.close()
            valid = sum(validate_caption(a.content)[0] is not None for a in answers)
            out[f"concurrency_{c}"] = {"valid": valid, "seconds": dt, "requests_per_s": n / dt,
                                       "encode_s": encode,
                                       "max_in_flight": server.max_inflight}
            server.max_inflight = 0
    finally:
        server.close()
    out["speedup"] = (out[f"concurrency_{concurrency}"]["requests_per_s"]
                      / out["concurrency_1"]["requests_per_s"])
    return out


def bench_catalog(n: int) -> dict:
    import duckdb

    from ultracurate.catalog import Catalog, named_queries
    folder = Path(tempfile.mkdtemp())
    out: dict = {"anchors": n, "captions": 5 * n}
    cat = Catalog(folder / "new.duckdb")
    con = cat.con
    t = time.perf_counter()
    con.execute(f"""INSERT INTO anchors (anchor_id, sha256, media, dataset, width, height)
                    SELECT i, md5(i::VARCHAR), i || '.jpg', 'coco', 640, 480
                    FROM range(1, {n} + 1) t(i)""")
    # five captions per anchor but for 1%, which have none
    con.execute(f"""INSERT INTO anchor_captions (anchor_id, caption_index, caption, source)
                    SELECT 1 + i // 5, (i % 5)::INTEGER,
                           'a photo number ' || i || ' of a cat on a wooden table', 'coco'
                    FROM range(0, {5 * n}) t(i) WHERE (1 + i // 5) % 100 <> 0""")
    out["build_s"] = time.perf_counter() - t
    # merging one batch's captions (16 anchors, 2 captions each, one already there)
    mid = n // 2 + 1  # anchors 1..15 past a multiple of 100: all have captions
    batch = [{"anchor_id": a, "caption": c, "source": "caption:bench"}
             for a in range(mid, mid + 16)
             for c in (f"a new caption for {a}", f"a photo number {5 * (a - 1)} of a cat on "
                                                 "a wooden table")]
    sql = "\n".join(ln for ln in named_queries("captions")["add"].splitlines()
                    if not ln.lstrip().startswith("--"))
    naive = (sql.replace("WHERE anchor_id BETWEEN $lo AND $hi GROUP BY", "GROUP BY")
             .replace("WHERE c.anchor_id BETWEEN $lo AND $hi\n                    AND", "WHERE"))
    assert naive != sql

    def merge(query: str) -> float:
        import pyarrow as pa
        con.execute("BEGIN")
        con.register("_captions", pa.table({
            "anchor_id": [r["anchor_id"] for r in batch], "caption": [r["caption"] for r in batch],
            "ord": list(range(len(batch))), "source": [r["source"] for r in batch],
            "model": [None] * len(batch), "prompt": [None] * len(batch),
            "invalid_reason": [None] * len(batch)}))
        t = time.perf_counter()
        params = {"run_id": 1, "at": None, "lo": mid, "hi": mid + 15}
        added = con.execute(query, {k: v for k, v in params.items() if f"${k}" in query}
                            ).fetchall()[0][0]
        dt = time.perf_counter() - t
        con.unregister("_captions")
        con.execute("ROLLBACK")
        assert added == 16, added
        return dt
    merge(sql)
    out["merge_batch_16"] = {"without_range_hint_s": min(merge(naive) for _ in range(3)),
                             "with_range_hint_s": min(merge(sql) for _ in range(3))}
    # one more caption for every anchor: appended rows against rewriting list rows
    con.execute("BEGIN")
    t = time.perf_counter()
    con.execute(f"""INSERT INTO anchor_captions (anchor_id, caption_index, caption, source)
                    SELECT i, 5, 'one more caption ' || i, 'caption:bench'
                    FROM range(1, {n} + 1) t(i)""")
    out["add_one_caption_to_every_anchor"] = {"insert_rows_s": time.perf_counter() - t}
    con.execute("ROLLBACK")
    # --where through anchors_v
    queries = {
        "dataset = 'coco' (captions untouched)": "dataset = 'coco'",
        "len(captions) = 0": "len(captions) = 0",
        "list_contains(captions, ...)": "list_contains(captions, 'a photo number 5 of a cat "
                                        "on a wooden table')",
        "anchor_id < 1000 AND list_contains(...)": "anchor_id < 1000 AND list_contains("
                                                   "captions, 'x')",
    }
    out["where"] = {}
    for label, pred in queries.items():
        dt = min(_timed(lambda: con.execute(f"SELECT count(*) FROM anchors_v WHERE {pred}")
                        .fetchall()) for _ in range(2))
        out["where"][label] = dt
    from ultracurate.stages.caption import WITHOUT_CAPTION
    out["where"]["caption stage's pending anchors (anti-join)"] = min(_timed(
        lambda: con.execute(f"SELECT count(*) FROM anchors WHERE {WITHOUT_CAPTION}")
        .fetchall()) for _ in range(2))
    cat.close()

    # the old design, for the baseline: a captions list in every anchor row
    old = duckdb.connect(str(folder / "old.duckdb"))
    old.execute("CREATE TABLE anchors (anchor_id BIGINT PRIMARY KEY, sha256 VARCHAR UNIQUE, "
                "media VARCHAR, dataset VARCHAR, width INTEGER, height INTEGER, "
                "captions VARCHAR[])")
    old.execute(f"""INSERT INTO anchors SELECT i, md5(i::VARCHAR), i || '.jpg', 'coco', 640,
                    480, CASE WHEN i % 100 = 0 THEN [] ELSE
                    list_transform(range(5), lambda k: 'a photo number ' || (5 * (i - 1) + k)
                                   || ' of a cat on a wooden table') END
                    FROM range(1, {n} + 1) t(i)""")
    old.execute("BEGIN")
    t = time.perf_counter()
    old.execute("UPDATE anchors SET captions = list_append(captions, 'one more caption ' || "
                "anchor_id)")
    out["add_one_caption_to_every_anchor"]["old_list_update_s"] = time.perf_counter() - t
    old.execute("ROLLBACK")
    old.execute("BEGIN")
    t = time.perf_counter()
    old.execute(f"UPDATE anchors SET captions = list_append(captions, 'new') "
                f"WHERE anchor_id BETWEEN {mid} AND {mid + 15}")
    out["merge_batch_16"]["old_list_update_s"] = time.perf_counter() - t
    old.execute("ROLLBACK")
    out["where_old"] = {"len(captions) = 0": min(_timed(lambda: old.execute(
        "SELECT count(*) FROM anchors WHERE len(captions) = 0").fetchall()) for _ in range(2))}
    old.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=1_000_000)
    ap.add_argument("--model", default=None, help="captioner checkpoint (default: tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                    help="folder for caption.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    photos = _photos(max(args.photos, 9)) if {"local", "http"} - skip else []
    res: dict = {}
    if "local" not in skip:
        res["local"] = bench_local(photos[:args.photos], args.batch, args.model, args.device)
        for g in ("none", "tiny-caption"):
            r = res["local"].get(f"grammar_{g}")
            if r:
                print(f"local captioner, grammar {g}: batch 1 {r['batch_1']['photos_per_s']:.1f} "
                      f"photos/s, batch {args.batch} "
                      f"{r[f'batch_{args.batch}']['photos_per_s']:.1f} photos/s "
                      f"({r['speedup']:.1f}x)")
    if "http" not in skip:
        r = res["http"] = bench_http(photos, args.requests, args.latency, args.concurrency)
        print(f"vision endpoint, {args.latency * 1000:.0f} ms per answer: 1 at a time "
              f"{r['concurrency_1']['requests_per_s']:.1f} req/s, {args.concurrency} "
              f"concurrent {r[f'concurrency_{args.concurrency}']['requests_per_s']:.1f} req/s "
              f"({r['speedup']:.1f}x); JPEG data URLs "
              f"{args.requests / r['concurrency_1']['encode_s']:.0f} photos/s")
    if "catalog" not in skip:
        r = res["catalog"] = bench_catalog(args.anchors)
        m = r["merge_batch_16"]
        print(f"catalog, {args.anchors:,} anchors x 5 captions (built in {r['build_s']:.1f} s)")
        print(f"  merge 16 anchors' captions: {m['without_range_hint_s'] * 1000:.1f} ms without "
              f"the range hint, {m['with_range_hint_s'] * 1000:.1f} ms with it "
              f"(old list UPDATE: {m['old_list_update_s'] * 1000:.1f} ms)")
        a = r["add_one_caption_to_every_anchor"]
        print(f"  one more caption for every anchor: INSERT {a['insert_rows_s']:.2f} s, old "
              f"list UPDATE {a['old_list_update_s']:.2f} s")
        for label, dt in r["where"].items():
            print(f"  {label}: {dt:.2f} s")
        print(f"  old list column, len(captions) = 0: {r['where_old']['len(captions) = 0']:.2f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caption.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
