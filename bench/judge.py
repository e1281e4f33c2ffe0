"""Judge throughput on the CPU, each against its baseline in the same run:

  local    the tiny random-weight judge (LLaVA architecture, `models.judge.make_tiny`) under
           its `tiny-judge` grammar, on real photo pairs (a photo and an edited copy, 64 px):
           one pair (two images) per generate call against --batch pairs per call. With
           --model REF --device cuda: a real chat VLM (no grammar).
  http     the OpenAI-compatible back-end (both images as JPEG data URLs, a JSON schema asked
           for, answers validated) against a loopback server (tests/_loopback.py) that takes
           --latency s per answer, a stand-in for a served VLM: --concurrency N requests in
           flight against 1 at a time
  stage    the whole `judge` stage (catalog reads, image decoding on the prepare threads,
           validation, per-batch commits) on a workspace of --requests candidates, through the
           loopback server at --concurrency, against the back-end alone on the same pairs in
           the same batches (decoding included): what the runner adds (best of 3 each)

Usage: python bench/judge.py [--pairs 32] [--batch 8] [--requests 64] [--latency 0.05]
       [--concurrency 8] [--skip local,http,stage] [--model REF] [--device cpu|cuda]
       [--out DIR]
Prints a table and writes bench/out/judge.json (--out: another folder).
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
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")

ANSWER = json.dumps({"instruction": 4, "preservation": 5, "quality": 4,
                     "rationale": "the sky is now orange and the rest is unchanged"})


def _pairs(n: int, size: int = 64) -> list:
    """n (photo, edited copy) pairs from the demo's real photos and crops of them."""
    from PIL import ImageEnhance

    from ultracurate.demo import write_demo_photos
    from ultracurate.images import load_rgb, resize_center_crop
    folder = write_demo_photos(Path(tempfile.mkdtemp()) / "photos").parent
    base = [load_rgb(p) for p in sorted(folder.iterdir()) if p.suffix in (".jpg", ".png")]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        k = 1 + i // len(base)
        src = resize_center_crop(im.crop((k, k, im.width - k, im.height - k)), size)
        out.append((src, ImageEnhance.Brightness(src).enhance(1.2)))
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_local(pairs: list, batch: int, ref: str | None, device: str) -> dict:
    from ultracurate.judge import LocalJudge, validate_judgement
    grammar = None
    if ref is None:
        from ultracurate.models import make_tiny
        ref = make_tiny(Path(tempfile.mkdtemp()) / "tiny", ("judge",))["judge"]
        grammar = "tiny-judge"
    out: dict = {"model": ref, "device": device, "pairs": len(pairs), "grammar": grammar}
    instructions = ["make the sky orange"] * len(pairs)
    for bs in (1, batch):
        judge = LocalJudge(ref, device=device, batch_size=bs, grammar=grammar)
        judge.judge(pairs[:1], instructions[:1], [0])  # warm-up
        answers = []
        dt = _timed(lambda: answers.extend(judge.judge(pairs, instructions,
                                                       list(range(len(pairs))))))
        valid = sum(validate_judgement(a.content)[0] is not None for a in answers)
        out[f"batch_{bs}"] = {"seconds": dt, "pairs_per_s": len(pairs) / dt, "valid": valid}
    out["speedup"] = out[f"batch_{batch}"]["pairs_per_s"] / out["batch_1"]["pairs_per_s"]
    return out


def _slow_server(latency: float):
    from _loopback import LoopbackServer, completion

    class Slow(LoopbackServer):
        def answer(self, body, headers):
            time.sleep(latency)
            return 200, completion(ANSWER), {}
    return Slow()


def bench_http(pairs: list, n: int, latency: float, concurrency: int) -> dict:
    from ultracurate.judge import HTTPJudge, validate_judgement
    server = _slow_server(latency)
    out: dict = {"requests": n, "latency_s": latency}
    try:
        for c in (1, concurrency):
            judge = HTTPJudge(server.url, "bench-vlm", concurrency=c, timeout=30)
            t = time.perf_counter()
            payloads = [tuple(judge.encode(im) for im in pairs[i % len(pairs)])
                        for i in range(n)]
            encode = time.perf_counter() - t
            answers = []
            dt = _timed(lambda: answers.extend(judge.judge(payloads, ["make it orange"] * n,
                                                           list(range(n)))))
            judge.close()
            valid = sum(validate_judgement(a.content)[0] is not None for a in answers)
            out[f"concurrency_{c}"] = {"valid": valid, "seconds": dt, "requests_per_s": n / dt,
                                       "encode_pairs_per_s": n / encode,
                                       "max_in_flight": server.max_inflight}
            server.max_inflight = 0
    finally:
        server.close()
    out["speedup"] = (out[f"concurrency_{concurrency}"]["requests_per_s"]
                      / out["concurrency_1"]["requests_per_s"])
    return out


def bench_stage(n: int, latency: float, concurrency: int) -> dict:
    """The judge stage end to end on n scored candidates, against the back-end alone."""
    from _scoring import add_candidates, set_scores

    from ultracurate.judge import HTTPJudge
    from ultracurate.runner import run
    from ultracurate.stages.ingest import discover
    from ultracurate.workspace import Workspace
    from ultracurate.demo import write_demo_photos
    tmp = Path(tempfile.mkdtemp())
    ws = Workspace.init(tmp / "ws", {"models": {"profile": "tiny"}})
    run(ws, "ingest", items=discover([write_demo_photos(tmp / "photos")]), progress=False)
    c = add_candidates(ws, n_edits=n, per_edit=1)
    set_scores(ws, {cid: dict(clip_sim_source=0.3, clip_sim_target=0.3, clip_sim_dir=0.3,
                              clip_sim_image=0.8, dinov2_sim=0.6)
                    for cid in c["candidate_id"].to_list()})
    server = _slow_server(latency)
    from ultracurate.images import load_rgb
    with ws.catalog(read_only=True) as cat:
        media = cat.query("SELECT source_image, edited_image FROM candidates")
    try:
        judge = HTTPJudge(server.url, "bench-vlm", concurrency=concurrency, timeout=30)

        def alone():  # the back-end on the same pairs in the stage's batches of 16
            payloads = [tuple(judge.encode(load_rgb(ws.media.path(m[k])))
                              for k in ("source_image", "edited_image")) for m in media]
            for i in range(0, len(payloads), 16):
                judge.judge(payloads[i:i + 16], ["x"] * 16, [0] * 16)

        def stage(force):
            run(ws, "judge", backend="openai", model="bench-vlm", base_url=server.url,
                concurrency=concurrency, batch_size=16, force=force, progress=False)
        stage(False)  # warm-up (imports); then the best of 3 of each, interleaved
        times = {"stage": [], "alone": []}
        for _ in range(3):
            times["stage"].append(_timed(lambda: stage(True)))
            times["alone"].append(_timed(alone))
        judge.close()
        with ws.catalog(read_only=True) as cat:
            judged = cat.scalar("SELECT count(*) FROM candidates WHERE judge_quality = 4")
    finally:
        server.close()
    dt, alone_s = min(times["stage"]), min(times["alone"])
    return {"candidates": n, "judged": judged, "stage_s": dt, "stage_rows_per_s": n / dt,
            "backend_alone_s": alone_s, "backend_rows_per_s": n / alone_s,
            "overhead_s": dt - alone_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--skip", default="")
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                    help="folder for judge.json")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    pairs = _pairs(a.pairs)
    out: dict = {}
    if "local" not in skip:
        out["local"] = r = bench_local(pairs, a.batch, a.model, a.device)
        print(f"local judge ({'tiny' if a.model is None else a.model}, {a.device}), "
              f"{a.pairs} pairs: batch 1 {r['batch_1']['pairs_per_s']:.2f} pairs/s, batch "
              f"{a.batch} {r[f'batch_{a.batch}']['pairs_per_s']:.2f} pairs/s "
              f"({r['speedup']:.1f}x); valid {r[f'batch_{a.batch}']['valid']}/{a.pairs}")
    if "http" not in skip:
        out["http"] = r = bench_http(pairs, a.requests, a.latency, a.concurrency)
        c = r[f"concurrency_{a.concurrency}"]
        print(f"http judge, {a.requests} requests at {a.latency * 1000:.0f} ms: serial "
              f"{r['concurrency_1']['requests_per_s']:.1f} req/s, {a.concurrency} concurrent "
              f"{c['requests_per_s']:.1f} req/s ({r['speedup']:.1f}x, max in flight "
              f"{c['max_in_flight']}); encoding {c['encode_pairs_per_s']:.0f} pairs/s")
    if "stage" not in skip:
        out["stage"] = r = bench_stage(a.requests, a.latency, a.concurrency)
        print(f"judge stage, {r['candidates']} candidates via loopback at {a.concurrency} "
              f"concurrent: {r['stage_rows_per_s']:.1f} rows/s ({r['stage_s']:.2f} s) against "
              f"the back-end alone {r['backend_rows_per_s']:.1f} rows/s; judged "
              f"{r['judged']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "judge.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out / 'judge.json'}")


if __name__ == "__main__":
    main()
