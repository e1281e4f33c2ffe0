"""Issue 20's figures: the media store in a bucket against a local folder, and a Ray job that
loses a node against the same job on two healthy nodes, each pair in the same run.

  media    put N JPEG-sized files (distinct bytes) and read them back: a local folder (tmp +
           fsync + rename) vs an S3 bucket on moto's server (127.0.0.1, s3fs, one PUT each)
  loss     `generate` (tiny editor, 64 px, one pair per batch) on a 2-node local Ray cluster
           (ray.cluster_utils, one CPU per node, 2 replicas): wall time of the whole job with
           both nodes, and with the worker node removed after the first batch (its batches
           resubmitted to the head's replica); rows done, replicas lost, batches resubmitted

Usage: python bench/cluster.py [--files 200] [--kb 64] [--rows 16] [--skip-loss] [--out DIR]
Prints a table and writes bench/out/cluster.json (--out: another folder).
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
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ULTRACURATE_PROGRESS="0")


def media(n: int, kb: int) -> dict:
    from _s3 import CREDENTIALS, make_bucket, s3_server
    from ultracurate.workspace import MediaStore
    os.environ.update(CREDENTIALS)
    blobs = [os.urandom(kb * 1024) for _ in range(n)]
    server, endpoint = s3_server()
    out = {}
    try:
        make_bucket(endpoint, "bench")
        stores = {"folder": MediaStore(tempfile.mkdtemp(prefix="uc-media-")),
                  "s3 (moto)": MediaStore("s3://bench/media",
                                          {"client_kwargs": {"endpoint_url": endpoint}})}
        for label, store in stores.items():
            t = time.perf_counter()
            names = [store.put_bytes(b, "jpg") for b in blobs]
            put = time.perf_counter() - t
            t = time.perf_counter()
            for name in names:
                store.read_bytes(name)
            read = time.perf_counter() - t
            out[label] = {"put_per_s": n / put, "read_per_s": n / read,
                          "put_MB_s": n * kb / 1024 / put, "read_MB_s": n * kb / 1024 / read}
    finally:
        server.stop()
    return out


def loss(rows: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from test_generate_stage import add_edits
    from ultracurate.demo import write_demo_photos
    from ultracurate.runner import RayEngine, run
    from ultracurate.selection import Selection
    from ultracurate.stages.ingest import IngestStage, discover
    from ultracurate.workspace import Workspace

    class Losing(RayEngine):
        def __init__(self, cluster, **kw):
            super().__init__(**kw)
            self.cluster = cluster

        def map(self, stage, batches, ctx, stop=None):
            first = True
            for item in super().map(stage, batches, ctx, stop):
                yield item
                if first:
                    first = False
                    self.cluster.remove_node(self.cluster.worker)

    tmp = Path(tempfile.mkdtemp(prefix="uc-bench-cluster-"))
    photos = write_demo_photos(tmp / "photos")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    out = {}
    try:
        for label in ("two nodes", "worker node lost after batch 1"):
            c.worker = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            ws = Workspace.init(tmp / label.replace(" ", "-"), {"models": {
                "profile": "tiny", "tiny_dir": str(tmp / "tiny")}})
            run(ws, IngestStage(items=discover([photos])), progress=False)
            add_edits(ws)
            kw = {"address": c.address, "num_workers": 2, "num_cpus_per_worker": 1}
            engine = Losing(c, **kw) if "lost" in label else RayEngine(**kw)
            t = time.perf_counter()
            s = run(ws, "generate", Selection(where="mode = 'free'"), candidates=rows // 2,
                    size=64, pairs_per_call=1, engine=engine, batch_size=1, progress=False)
            wall = time.perf_counter() - t
            out[label] = {"wall_s": wall, "rows_done": s.rows_done, "rows_failed": s.rows_failed,
                          "lost": engine.stats["lost"], "retried": engine.stats["retried"],
                          "nodes": len(set(engine.stats["placed"]))}
            if "lost" not in label:
                c.remove_node(c.worker)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--kb", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                    help="folder for cluster.json")
    a = ap.parse_args()
    result = {"load": os.getloadavg()[0], "media": media(a.files, a.kb)}
    print(f"load average {result['load']:.1f}")
    print(f"media store, {a.files} files of {a.kb} KB")
    for label, r in result["media"].items():
        print(f"  {label:10} put {r['put_per_s']:7.1f} files/s ({r['put_MB_s']:.1f} MB/s)  "
              f"read {r['read_per_s']:7.1f} files/s ({r['read_MB_s']:.1f} MB/s)")
    if not a.skip_loss:
        result["loss"] = loss(a.rows)
        print(f"generate on 2 Ray nodes, {a.rows} rows, one per batch")
        for label, r in result["loss"].items():
            print(f"  {label:32} {r['wall_s']:6.1f} s  done {r['rows_done']} failed "
                  f"{r['rows_failed']}  replicas on {r['nodes']} nodes, lost {r['lost']}, "
                  f"resubmitted {r['retried']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cluster.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
