"""Instruction writing throughput, each against its baseline in the same run:

  rule          the offline rule back-end, edits/s over many captions (with validation)
  http          the OpenAI-compatible back-end against a loopback chat-completions server
                that takes --latency seconds per answer (a stand-in for a remote LLM):
                --concurrency N against 1 request at a time (the naive client)
  transformers  a local causal LM: batched generation (--llm-batch) against one prompt at a
                time. Default: the tiny random Llama built by `make_tiny` on the CPU; with
                --llm REF --device cuda a real checkpoint (a later GPU session)

Usage: python bench/instruct.py [--n 2000] [--requests 64] [--latency 0.05]
       [--concurrency 8] [--llm REF] [--device cpu|cuda] [--llm-batch 8] [--llm-prompts 16]
       [--max-new-tokens 32]
       [--out DIR]
Prints a table and writes bench/out/instruct.json (--out: another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ultracurate.names import EDIT_TYPES  # noqa: E402
from ultracurate.instruct.backends import Request  # noqa: E402
from ultracurate.instruct.exemplars import load_exemplars, sample  # noqa: E402
from ultracurate.instruct.rule import propose  # noqa: E402
from ultracurate.instruct.validation import validate  # noqa: E402

CAPTIONS = [e.source_caption for e in load_exemplars()]


def bench_rule(n: int) -> dict:
    t = time.perf_counter()
    ok = 0
    for i in range(n):
        cap, typ = CAPTIONS[i % len(CAPTIONS)], EDIT_TYPES[i % len(EDIT_TYPES)]
        try:
            _, reasons = validate(propose(cap, typ, i), cap, typ)
            ok += not reasons
        except ValueError:
            pass
    dt = time.perf_counter() - t
    return {"edits": n, "valid": ok, "seconds": dt, "edits_per_s": n / dt}


def _server(latency: float):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][1]["content"]
            cap = user.split("Source caption: ")[1].split("\n")[0]
            typ = user.split("Edit type: ")[1].split("\n")[0]
            time.sleep(latency)
            data = json.dumps({"choices": [{"message": {"content": json.dumps(
                propose(cap, typ, 0))}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def _requests(n: int, ex, n_instr=50, n_full=10):
    out = []
    for i in range(n):
        typ = EDIT_TYPES[i % len(EDIT_TYPES)]
        rng = random.Random(i)
        ins, full = sample(ex, typ, n_instr, n_full, rng)
        out.append(Request(CAPTIONS[i % len(CAPTIONS)], typ, i, ins, full))
    return out


def bench_http(n: int, latency: float, concurrency: int) -> dict:
    from ultracurate.instruct.http import OpenAIBackend
    httpd, url = _server(latency)
    reqs = _requests(n, load_exemplars())
    out = {}
    try:
        for c in (1, concurrency):
            b = OpenAIBackend(url, "bench", concurrency=c, timeout=30)
            t = time.perf_counter()
            answers = b.complete(reqs)
            dt = time.perf_counter() - t
            b.close()
            valid = sum(not validate(a.content, r.source_caption, r.edit_type)[1]
                        for a, r in zip(answers, reqs))
            out[f"concurrency_{c}"] = {"requests": n, "valid": valid, "seconds": dt,
                                       "requests_per_s": n / dt}
    finally:
        httpd.shutdown()
    out["speedup"] = (out[f"concurrency_{concurrency}"]["requests_per_s"]
                      / out["concurrency_1"]["requests_per_s"])
    return out


def bench_transformers(ref: str | None, device: str, batch: int, n: int,
                       max_new_tokens: int, n_instr: int, n_full: int) -> dict:
    from ultracurate.instruct.local import TransformersBackend
    if ref is None:
        from ultracurate.models import make_tiny
        ref = make_tiny(Path(tempfile.mkdtemp()) / "tiny", ("llm",))["llm"]
    reqs = _requests(n, load_exemplars(), n_instr, n_full)
    out = {"model": ref, "device": device, "prompts": n, "max_new_tokens": max_new_tokens}
    for bs in (1, batch):
        b = TransformersBackend(ref, device=device, batch_size=bs,
                                max_new_tokens=max_new_tokens, temperature=0.7)
        b.complete(reqs[:1])  # warm-up
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        t = time.perf_counter()
        b.complete(reqs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out[f"batch_{bs}"] = {"seconds": dt, "prompts_per_s": n / dt}
    out["speedup"] = out[f"batch_{batch}"]["prompts_per_s"] / out["batch_1"]["prompts_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="rule back-end edits")
    ap.add_argument("--requests", type=int, default=64, help="HTTP requests")
    ap.add_argument("--latency", type=float, default=0.05, help="server seconds per answer")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--llm", default=None, help="causal LM hub id or folder (default: tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llm-batch", type=int, default=8)
    ap.add_argument("--llm-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--n-instructions", type=int, default=50)
    ap.add_argument("--n-full", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                    help="folder for instruct.json")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    res = {}
    if "rule" not in skip:
        res["rule"] = bench_rule(a.n)
        r = res["rule"]
        print(f"rule          {r['edits_per_s']:10.0f} edits/s  ({r['valid']}/{r['edits']} valid)")
    if "http" not in skip:
        res["http"] = h = bench_http(a.requests, a.latency, a.concurrency)
        c1, cn = h["concurrency_1"], h[f"concurrency_{a.concurrency}"]
        print(f"http c=1      {c1['requests_per_s']:10.1f} req/s  ({a.latency * 1000:.0f} ms "
              f"server latency, {c1['valid']}/{c1['requests']} valid)")
        print(f"http c={a.concurrency:<6} {cn['requests_per_s']:10.1f} req/s  "
              f"speedup {h['speedup']:.1f}x")
    if "transformers" not in skip:
        res["transformers"] = t = bench_transformers(
            a.llm, a.device, a.llm_batch, a.llm_prompts, a.max_new_tokens, a.n_instructions,
            a.n_full)
        print(f"llm batch=1   {t['batch_1']['prompts_per_s']:10.2f} prompts/s ({t['model']}, "
              f"{a.device}, {a.max_new_tokens} new tokens)")
        print(f"llm batch={a.llm_batch:<4}{t[f'batch_{a.llm_batch}']['prompts_per_s']:10.2f} "
              f"prompts/s  speedup {t['speedup']:.1f}x")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "instruct.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
