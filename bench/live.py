"""A live catalog (issue 18): what readers and a job pay for sharing the catalog.

  reader        open the catalog read-only, run every `stats` query, close: idle, and while a
                job commits batch after batch in another process (per-batch connections);
                against the old way, a job holding its connection for the whole run, where
                every reader fails (opened with no wait, as before); and how often a user's
                plain duckdb.connect(read_only=True), which does not retry, gets in
  throughput    rows/s of a job over N anchors whose batches commit through a connection
                opened per batch (the runner now) against one connection held for the whole
                job (the old runner; run(cat=...) still holds one), for batches that compute
                nothing (the overhead alone) and batches that compute --work ms

Usage: python bench/live.py [--rows 8000] [--batch 64] [--work 50] [--reads 40]
Prints a table and writes bench/out/live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultracurate.catalog import Catalog, now  # noqa: E402
from ultracurate.errors import CatalogBusyError  # noqa: E402
from ultracurate.runner import BatchResult, RowStage, run  # noqa: E402
from ultracurate.stats import catalog_stats  # noqa: E402
from ultracurate.workspace import Workspace  # noqa: E402


class Touch(RowStage):
    """A row stage over anchors whose batches take `work` seconds and write one column."""
    name = "bench_touch"
    table = "anchors"
    columns = "anchor_id, width"
    writes = {"anchors": {"dataset"}}

    def process(self, rows, prepared, ctx):
        time.sleep(float(self.params.get("work", 0.0)))
        return BatchResult(updates={"anchors": [
            {"anchor_id": r["anchor_id"], "dataset": f"w{r['width'] % 7}"} for r in rows]})


def build(root: Path, n: int) -> Workspace:
    ws = Workspace.init(root / "ws")
    at = now()
    with ws.catalog() as cat, cat.transaction():
        cat.anchors.insert([{"anchor_id": i, "sha256": f"{i:064x}", "media": f"{i:064x}.jpg",
                             "width": 64 + i % 50, "height": 64, "ingested_at": at}
                            for i in range(1, n + 1)])
    return ws


def job(ws: Workspace, batch: int, work: float, held: bool) -> float:
    t0 = time.perf_counter()
    if held:
        with ws.catalog() as cat:
            s = run(ws, Touch(work=work), batch_size=batch, force=True, progress=False, cat=cat)
    else:
        s = run(ws, Touch(work=work), batch_size=batch, force=True, progress=False)
    assert s.state == "completed" and s.rows_failed == 0
    return s.rows_done / (time.perf_counter() - t0)


OPENS: list[float] = []  # the open alone (its wait for the lock included) of each read


def reads(ws: Workspace, n: int, wait: float | None) -> tuple[list[float], int]:
    """Latencies of n reads (open read-only, stats, close), and how many failed."""
    out, failed = [], 0
    OPENS.clear()
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with Catalog(ws.catalog_path, read_only=True, wait=wait) as cat:
                OPENS.append(time.perf_counter() - t0)
                catalog_stats(cat)
            out.append(time.perf_counter() - t0)
        except CatalogBusyError:
            failed += 1
        time.sleep(0.05)
    return out, failed


def plain_connects(ws: Workspace, n: int) -> float:
    """The share of a user's plain duckdb.connect(read_only=True), no retry, that succeed."""
    import duckdb
    ok = 0
    for _ in range(n):
        try:
            duckdb.connect(str(ws.catalog_path), read_only=True).close()
            ok += 1
        except duckdb.IOException:
            pass
        time.sleep(0.05)
    return round(ok / n, 3)


def summary(lat: list[float]) -> dict:
    if not lat:
        return {"p50": None, "p95": None, "max": None}
    s = sorted(lat)
    return {"p50": round(statistics.median(s), 4), "p95": round(s[int(0.95 * (len(s) - 1))], 4),
            "max": round(s[-1], 4)}


def beside_a_job(ws: Workspace, args, held: bool) -> dict:
    """Reads while a job (another process) runs over the anchors."""
    proc = subprocess.Popen([sys.executable, __file__, "--job", str(ws.root), "--batch",
                             str(args.batch), "--work", str(args.work / 1000)]
                            + (["--held"] if held else []), env=dict(os.environ))
    try:
        time.sleep(3.0)  # the job's imports, plan and first batches
        assert proc.poll() is None, "the job ended before the readers started: more --rows"
        lat, failed = reads(ws, args.reads, wait=0.0 if held else None)
        plain = plain_connects(ws, args.reads)
        still = proc.poll() is None
    finally:
        proc.wait()
    return {**summary(lat), "open": summary(OPENS), "opens": [round(x, 3) for x in OPENS],
            "failed": failed, "reads": args.reads, "plain_connect_first_try": plain,
            "job_ran_throughout": still}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--work", type=float, default=50.0, help="ms of compute per batch")
    ap.add_argument("--reads", type=int, default=40)
    ap.add_argument("--job")
    ap.add_argument("--held", action="store_true")
    args = ap.parse_args()
    if args.job:  # the job, in its own process
        job(Workspace(args.job), args.batch, args.work, args.held)
        return
    os.environ.setdefault("ULTRACURATE_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        ws = build(Path(tmp), args.rows)
        res = {"rows": args.rows, "batch": args.batch, "work_ms": args.work,
               "load": os.getloadavg()[0]}
        res["reader_idle"] = {**summary(reads(ws, args.reads, None)[0]),
                              "open": summary(OPENS), "failed": 0}
        res["reader_beside_job"] = beside_a_job(ws, args, held=False)
        res["reader_beside_held_job"] = beside_a_job(ws, args, held=True)
        small = max(args.batch * 40, 1)  # the throughput jobs: 40 batches
        ws2 = build(Path(tmp) / "t", small)
        res["throughput"] = {}
        for work in (0.0, args.work / 1000):
            per = [job(ws2, args.batch, work, held=False) for _ in range(2)]
            old = [job(ws2, args.batch, work, held=True) for _ in range(2)]
            res["throughput"][f"{work * 1000:g}ms"] = {
                "per_batch_connection": round(max(per), 1), "held_connection": round(max(old), 1),
                "ratio": round(max(per) / max(old), 3)}
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "live.json").write_text(json.dumps(res, indent=2))
    print(f"load average {res['load']:.1f}; {args.rows} anchors, batches of {args.batch}")
    print(f"{'reader (open, stats, close)':<34} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
          f"{'open p50':>9} {'open max':>9} {'failed':>7}")
    cell = lambda v, w=7: f"{v:{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for k in ("reader_idle", "reader_beside_job", "reader_beside_held_job"):
        r = res[k]
        print(f"{k:<34} {cell(r['p50'])} {cell(r['p95'])} {cell(r['max'])} "
              f"{cell(r['open']['p50'], 9)} {cell(r['open']['max'], 9)} "
              f"{r['failed']:>4}/{args.reads}")
    print("a plain duckdb.connect(read_only=True), no retry, succeeds beside the job: "
          f"{res['reader_beside_job']['plain_connect_first_try']:.0%} "
          f"(beside the held job: {res['reader_beside_held_job']['plain_connect_first_try']:.0%})")
    print(f"{'job rows/s':<40} {'per-batch':>10} {'held':>10} {'ratio':>7}")
    for k, r in res["throughput"].items():
        print(f"{'  compute ' + k + ' per batch':<40} {r['per_batch_connection']:>10} "
              f"{r['held_connection']:>10} {r['ratio']:>7}")


if __name__ == "__main__":
    main()
