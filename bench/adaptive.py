"""Candidates generated per successful edit: the fixed scheme (30 candidates per edit, keep the
top K of those passing) against adaptive rounds (generate `round` more until K pass, at most
30), on the same edits: every edit gets its 30 candidates generated and scored once, and
`compare_schemes` replays both schemes over them (candidate i is the same pair under both,
since generation seeds candidates by index).

    python bench/adaptive.py [--edits 6 --k 4 --round 8 --device cuda]   # tiny models

With tiny random-weight models the scores mean nothing, so the thresholds are set to let about
the observed fraction of candidates pass (--pass-rate, default 0.25 by clip_sim_dir quantile);
the figure shows the mechanism, not UltraEdit's real pass rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ULTRACURATE_PROGRESS", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=6)
    ap.add_argument("--fixed", type=int, default=30)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--round", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pass-rate", type=float, default=0.25)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from ultracurate.demo import write_demo_photos
    from ultracurate.models import make_tiny
    from ultracurate.runner import run
    from ultracurate.stages.adaptive import compare_schemes
    from ultracurate.thresholds import Thresholds
    from ultracurate.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    make_tiny(tmp / "tiny", ("editor", "clip", "dino"))
    ws = Workspace.init(tmp / "ws", {"models": {"profile": "tiny",
                                                "tiny_dir": str(tmp / "tiny")}})
    run(ws, "ingest", paths=[write_demo_photos(tmp / "photos")], progress=False)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _scoring import add_candidates
    add_candidates(ws, n_edits=args.edits, per_edit=0, modes=("free",))
    t0 = time.perf_counter()
    run(ws, "generate", candidates=args.fixed, size=args.size, device=args.device,
        progress=False)
    run(ws, "score", device=args.device, progress=False)
    t_gen = time.perf_counter() - t0
    with ws.catalog(read_only=True) as cat:
        q = cat.scalar("SELECT quantile_cont(clip_sim_dir, ?) FROM candidates",
                       [1 - args.pass_rate])
    t = Thresholds.preset().override(clip_sim_image_min=-1, clip_min=-1, dinov2_sim_min=-1,
                                     clip_sim_dir_min=float(q))
    out = compare_schemes(ws, until_accepted=args.k, max_candidates=args.fixed,
                          round_size=args.round, fixed=args.fixed, thresholds=t)
    out.update(edits_requested=args.edits, generate_and_score_seconds=round(t_gen, 1),
               clip_sim_dir_threshold=round(float(q), 4), pass_rate=args.pass_rate)
    print(json.dumps(out, indent=2))
    print(f"candidates per successful edit: fixed {out['fixed']['candidates_per_success']}, "
          f"adaptive {out['adaptive']['candidates_per_success']}")


if __name__ == "__main__":
    main()
