"""Every job's cost at UltraEdit's scale and past it (issue 15): catalogs of 40k, 400k and
4.1M edits (one candidate each) built through the real schema (bench/catalog.py's build), and
for every command, in a child process of its own (so that its peak memory is its own):

  first  the work before the job's first batch: what the runner does before any row is
         computed (the selection and its guard, a stage's planning in SQL, the count, the
         first batch read from the pending stream); a set stage's check and plan
  whole  the whole job where it is set-based (filter, balance, stats, select) or its rows are
         arithmetic (classify-masks over stored mask features: no mask decoding)
  rss    the child's peak resident memory

Models are not loaded (a row stage is stopped as its first batch arrives, before `setup`),
so the figures are the catalog's and the runner's share of a job. Compared across sizes:
growth per 10x rows. Prints a table per size and the growth, and writes the figures to
bench/out/scale-<sizes>.json (or --out DIR); --markdown makes bench/results/scale.md's tables
from such files. Exits 1 when a command failed (one that ran past --timeout is a figure).

    python bench/scale.py --sizes 40000                  # a quick smoke
    python bench/scale.py                                # 40k, 400k, 4.1M
    python bench/scale.py --sizes 41000000 --first-only  # 41M: first batches only
    python bench/scale.py --keep /tmp/uc-scale           # keep (and reuse) the catalogs

Before/after: run the same file with PYTHONPATH pointing at another checkout of the package
(`git archive <commit> ultracurate sql | tar -x -C /tmp/old && cp -r /tmp/old/sql
/tmp/old/ultracurate/sql`: the SQL is the package `ultracurate.sql`, which the editable
install would otherwise take from this checkout); the build adapts to the schema it finds,
and every figure goes through APIs both have.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))   # after PYTHONPATH: another checkout may come first

WHERE = "edit_type = 'replace' AND clip_sim_dir > $min_dir AND mode = 'region'"
# (name, kind, what it runs); the order matters: the writing jobs come last
COMMANDS = [
    ("stats", "whole", "catalog_stats"),
    ("select", "whole", "select --where ... --limit 100 and --count"),
    ("review --limit 100", "first", "check + plan (the rows the dataset gets)"),
    ("export --limit 100", "first", "check + plan"),
    ("instruct --limit 100", "first", "row stage over anchors"),
    ("instruct (every anchor)", "first", "row stage, numbered over every anchor"),
    ("instruct --quota", "first", "row stage, numbered; the selection's count first"),
    ("ground", "first", "row stage, in anchor order within windows"),
    ("score", "first", "row stage: pending selection"),
    ("dedup (embed-anchors)", "first", "row stage over every anchor"),
    ("generate --where replace", "first", "plan (a 2nd candidate/edit) + pending"),
    ("filter --clip-min 0.25", "whole", "set stage"),
    ("classify-masks", "whole", "row stage, features stored"),
    ("balance", "whole", "set stage, --target edits/20"),
]
FIRST_ONLY = {"review --limit 100", "export --limit 100", "instruct --limit 100", "score",
              "dedup (embed-anchors)", "stats", "select", "generate --where replace",
              "instruct (every anchor)", "instruct --quota", "ground"}


class _FirstBatch(Exception):
    pass


class Clock:
    """Wall and CPU seconds (all threads of the process) since it started: on a loaded
    machine the CPU seconds say more about the work than the wall seconds."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        # the process's peak so far (its imports: torch alone is ~0.6 GB): the job's own
        # memory is the peak above it
        self.base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    def read(self, **extra) -> dict:
        return {"seconds": time.perf_counter() - self.wall,
                "cpu_seconds": time.process_time() - self.cpu, "base_gb": self.base_gb,
                **extra}


class FirstBatchEngine:
    """An engine that stops the job when its first batch arrives (no model is loaded)."""
    name = "local"

    def __init__(self):
        self.at = None
        self.rows = 0

    def map(self, stage, batches, ctx, stop=None):
        first = next(iter(batches), [])
        self.at, self.rows = self.clock.read(), len(first)
        raise _FirstBatch
        yield  # a generator, as the runner expects


def _row_first(ws, name, selection=None, **opts) -> dict:
    from ultracurate.runner import run
    from ultracurate.stages import make_stage
    stage = make_stage(name, opts)   # its module imported (torch, ...) before the clock
    _warm_imports()
    eng = FirstBatchEngine()
    eng.clock = Clock()
    try:
        s = run(ws, stage, selection, engine=eng, progress=False)
        return eng.clock.read(rows=s.rows_in, note="no rows")
    except _FirstBatch:
        return {**eng.at, "rows": eng.rows}


def _warm_imports() -> None:
    """What a job imports anyway (torch to pick the device and load its models; pandas,
    which pyarrow pulls in on a first conversion): seconds of imports are not the catalog's."""
    import pandas  # noqa: F401
    import torch  # noqa: F401


def _set_first(ws, name, selection, **opts) -> dict:
    from ultracurate.runner import Access
    from ultracurate.stages import make_stage
    stage = make_stage(name, opts)
    _warm_imports()
    clock = Clock()
    with ws.catalog(read_only=True) as cat:
        r = Access(cat, stage, workspace=ws)
        stage.check(r, selection)
        plan = stage.plan(r, selection)
    rows = plan[0] if isinstance(plan, tuple) else plan
    return clock.read(rows=len(rows))


def n_edits(ws) -> int:
    with ws.catalog(read_only=True) as cat:
        return int(cat.scalar("SELECT count(*) FROM edits"))


def measure(ws_root: str, command: str) -> dict:
    """One command's figures (run in a child process)."""
    os.environ.setdefault("ULTRACURATE_PROGRESS", "0")
    from ultracurate.runner import run
    from ultracurate.selection import Selection, selected_keys_sql
    from ultracurate.workspace import Workspace
    ws = Workspace(ws_root)
    if command == "balance":
        target = max(1, n_edits(ws) // 20)
    _warm_imports()
    clock = Clock()
    if command == "stats":
        from ultracurate.stats import catalog_stats
        with ws.catalog(read_only=True) as cat:
            catalog_stats(cat)
        out = clock.read(rows=None)
    elif command == "select":
        with ws.catalog(read_only=True) as cat:
            sel = Selection(where=WHERE, params={"min_dir": 0.25}, limit=100)
            sql, p = selected_keys_sql(cat.con, "candidates_v", "candidate_id", sel,
                                       columns="candidate_id, edit_id, edit_type, status, "
                                               "clip_sim_dir")
            n = cat.pl(sql + " ORDER BY candidate_id", p).height
            sql, p = selected_keys_sql(cat.con, "candidates_v", "candidate_id",
                                       Selection(where=WHERE, params={"min_dir": 0.25}),
                                       columns="count(*) AS n")
            cat.scalar(sql, p)
        out = clock.read(rows=n)
    elif command == "review --limit 100":
        out = _set_first(ws, "review", Selection(limit=100))
    elif command == "export --limit 100":
        out = _set_first(ws, "export", Selection(limit=100),
                         out=str(Path(ws_root).parent / "export"))
    elif command == "instruct --limit 100":
        out = _row_first(ws, "instruct", Selection(limit=100))
    elif command == "instruct (every anchor)":
        out = _row_first(ws, "instruct")
    elif command == "instruct --quota":
        out = _row_first(ws, "instruct", quota="replace=2000000,add=2000000,turn=1000000")
    elif command == "ground":
        out = _row_first(ws, "ground")
    elif command == "score":
        out = _row_first(ws, "score")
    elif command == "dedup (embed-anchors)":
        out = _row_first(ws, "embed-anchors")
    elif command == "generate --where replace":
        # a second candidate per edit (the bench catalog has one), planned in SQL
        out = _row_first(ws, "generate", Selection(where="edit_type = 'replace'"),
                         candidates=2)
    elif command == "filter --clip-min 0.25":
        s = run(ws, "filter", clip_min=0.25, progress=False)
        out = clock.read(rows=s.rows_in)
    elif command == "classify-masks":
        s = run(ws, "classify-masks", progress=False)
        out = clock.read(rows=s.rows_done)
    elif command == "balance":
        s = run(ws, "balance", target=target, progress=False)
        out = clock.read(rows=s.rows_in)
    else:
        raise SystemExit(f"unknown command {command!r}")
    out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def child(ws_root: Path, command: str, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ULTRACURATE_PROGRESS": "0"}
    try:
        p = subprocess.run([sys.executable, __file__, "--child", command, "--ws", str(ws_root)],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "rows": None, "rss_gb": None,
                "error": f"over {timeout:.0f} s", "timed_out": True}
    if p.returncode:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"seconds": None, "rows": None, "rss_gb": None, "error": err[:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def build_catalog(root: Path, n: int) -> tuple[Path, float]:
    from catalog import build  # bench/catalog.py
    from ultracurate.workspace import Workspace
    ws_root = root / f"ws-{n}"
    if (ws_root / "catalog.duckdb").exists():
        return ws_root, 0.0
    ws = Workspace.init(ws_root)
    return ws_root, build(ws, n)


def fmt(x, unit="s"):
    return "-" if x is None else (f"{x:.2f} {unit}" if x < 100 else f"{x:.0f} {unit}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="40000,400000,4100000")
    ap.add_argument("--keep", help="build the catalogs in this folder and keep (reuse) them")
    ap.add_argument("--first-only", action="store_true",
                    help="only the commands measured up to their first batch (41M)")
    ap.add_argument("--only", help="comma list of command names (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per command, seconds")
    ap.add_argument("--label", default="", help="a name for this run in the results")
    ap.add_argument("--out", type=Path, default=HERE / "out",
                    help="folder for scale-SIZES.json")
    ap.add_argument("--markdown", nargs="+", metavar="JSON",
                    help="write bench/results/scale.md's tables from runs' JSON files "
                         "(bench/out/scale-*.json) and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ws", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.ws, args.child)))
        return
    if args.markdown:
        print(markdown([json.loads(Path(f).read_text()) for f in args.markdown]))
        return
    sys.path.insert(0, str(HERE))
    import ultracurate
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="uc-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    wanted = [c for c in COMMANDS if (not args.only or c[0] in args.only.split(","))
              and (not args.first_only or c[0] in FIRST_ONLY)]
    results = {"label": args.label, "package": str(Path(ultracurate.__file__).parent),
               "sizes": {}}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(str(s) for s in sizes) + (f"-{args.label}" if args.label else "")
    dest = out / f"scale-{tag}.json"
    for n in sizes:
        fresh = not (root / f"ws-{n}" / "catalog.duckdb").exists()
        print(f"== {n:,} edits: building ..." if fresh else f"== {n:,} edits (kept)", flush=True)
        ws_root, build_s = build_catalog(root, n)
        size_gb = (ws_root / "catalog.duckdb").stat().st_size / 1e9
        print(f"   built in {build_s:.1f} s, catalog {size_gb:.2f} GB", flush=True)
        rows = {}
        for name, kind, what in wanted:
            r = child(ws_root, name, args.timeout)
            r.update(kind=kind, what=what)
            rows[name] = r
            print(f"   {name:<26} {kind:<6} {fmt(r['seconds']):>9} (cpu "
                  f"{fmt(r.get('cpu_seconds'))})  rows {r['rows'] or '-':>9}"
                  f"  peak {fmt(r['rss_gb'], 'GB'):>8}  {r.get('error', r.get('note', ''))}",
                  flush=True)
            results["sizes"][n] = {"build_seconds": build_s, "catalog_gb": size_gb,
                                   "commands": rows}
            dest.write_text(json.dumps(results, indent=2, default=str))  # as it goes
        if not args.keep:
            shutil.rmtree(ws_root, ignore_errors=True)
    report(results, sizes, wanted)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    # a command that fails is the benchmark's rot, not a figure: say so in the exit status
    failed = [f"{n:,} edits, {name}: {r['error']}" for n, size in results["sizes"].items()
              for name, r in size["commands"].items() if "error" in r and not r.get("timed_out")]
    if failed:
        sys.exit("error: " + "\nerror: ".join(failed))


def report(results: dict, sizes: list[int], wanted) -> None:
    """The table (seconds and peak GB per size) and the growth per 10x rows, on stdout."""
    import math
    print(f"\n{'command':<26}{'kind':<7}" + "".join(f"{n:>18,}" for n in sizes)
          + ("  growth/10x" if len(sizes) > 1 else ""))
    for name, kind, _ in wanted:
        cells = [results["sizes"][n]["commands"][name] for n in sizes]
        line = f"{name:<26}{kind:<7}" + "".join(
            f"{fmt(c['seconds']):>10}{fmt(c['rss_gb'], 'G'):>8}" for c in cells)
        s = [c["seconds"] for c in cells]
        if len(sizes) > 1 and s[0] and s[-1]:
            line += f"  {(s[-1] / s[0]) ** (1 / math.log10(sizes[-1] / sizes[0])):.1f}x"
        print(line)


def markdown(runs: list[dict]) -> str:
    """One table per size: each command's wall and CPU seconds and peak memory above the
    process's imports, for every run (e.g. before / after) that measured it."""
    sizes = sorted({int(n) for r in runs for n in r["sizes"]})
    out = []
    for n in sizes:
        have = [r for r in runs if str(n) in r["sizes"] or n in r["sizes"]]
        head = " | ".join(f"{r['label']}: wall / CPU s, peak GB" for r in have)
        out += [f"**{n:,} edits**", "", f"| command | kind | {head} |",
                "|---|---|" + "---|" * len(have)]
        names = [c[0] for c in COMMANDS]
        for name in names:
            cells, kind = [], ""
            for r in have:
                c = (r["sizes"].get(str(n)) or r["sizes"].get(n))["commands"].get(name)
                if c is None:
                    cells.append("-")
                    continue
                kind = c["kind"]
                if c.get("seconds") is None:
                    cells.append(c.get("error", "-")[:60])
                    continue
                extra = c["rss_gb"] - c.get("base_gb", 0) if c.get("base_gb") else None
                cells.append(f"{c['seconds']:.2f} / {c.get('cpu_seconds', 0):.2f}, "
                             f"{c['rss_gb']:.2f}" + (f" (+{extra:.2f})" if extra else ""))
            if any(x != "-" for x in cells):
                out.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
