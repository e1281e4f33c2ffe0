"""The --where guard's pass (issue 15): seconds to check a predicate over candidates_v, for
predicates over one table's columns, a mix of such terms, and a term over two tables; and
the select and export commands' first batch (bench/scale.py's children), on a catalog
bench/scale.py built. Compare against another checkout of the package with PYTHONPATH:

    python bench/guard.py --ws DIR/ws-4100000
    PYTHONPATH=/tmp/old python bench/guard.py --ws DIR/ws-4100000   # git archive <commit>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))   # after PYTHONPATH: another checkout may come first

PREDICATES = [
    ("bench/scale.py's WHERE (edits, candidates)",
     "edit_type = 'replace' AND clip_sim_dir > $min_dir AND mode = 'region'", {"min_dir": "0.25"}),
    ("export's default (candidates, anchors)",
     "status = 'accepted' AND duplicate_of IS NULL AND anchor_duplicate_of IS NULL "
     "AND selected IS NOT FALSE", {}),
    ("candidates only", "clip_sim_dir > 0.25", {}),
    ("edits only", "edit_type = 'replace'", {}),
    ("anchors only", "anchor_width > 600", {}),
    ("one term over two tables", "clip_sim_dir > 0.25 OR edit_type = 'replace'", {}),
    ("reject_reasons", "list_contains(reject_reasons, 'clip_dir')", {}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from ultracurate.selection import Selection
    from ultracurate.workspace import Workspace
    ws = Workspace(args.ws)
    out = {}
    with ws.catalog(read_only=True) as cat:
        for name, where, params in PREDICATES:
            wall, cpu = [], []
            for _ in range(args.repeat):  # a fresh Selection: the check is memoised per one
                w, c = time.perf_counter(), time.process_time()
                Selection(where, params).checked(cat.con, "candidates_v")
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
            out[name] = (min(wall), min(cpu))
            print(f"{name:45s} {min(wall):6.3f} s wall  {min(cpu):6.3f} s CPU", flush=True)
    for command in ("select", "export --limit 100"):
        runs = [json.loads(subprocess.run(
            [sys.executable, str(HERE / "scale.py"), "--child", command, "--ws", args.ws],
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["cpu_seconds"])
        out[command] = (best["seconds"], best["cpu_seconds"])
        print(f"{command:45s} {best['seconds']:6.3f} s wall  {best['cpu_seconds']:6.3f} s CPU"
              f"  (best of {args.repeat}, bench/scale.py --child)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
