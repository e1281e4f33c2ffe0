"""Bundled real photos (scikit-image's) with hand-written captions (ultracurate/data/), and the demo
that runs the whole pipeline on them with tiny models on the CPU (some photos are ingested
without captions and captioned by the tiny captioner)."""

from __future__ import annotations

import importlib.resources
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UltracurateError

def data_file(name: str) -> Path:
    """A file of the package's data (ultracurate/data/)."""
    return Path(str(importlib.resources.files("ultracurate").joinpath("data", name)))


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data as data
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(data, name)()


# Photos the demo ingests without their captions: the tiny captioner writes theirs.
DEMO_UNCAPTIONED = ("coffee", "rocket", "motorcycle_right")


def write_demo_photos(folder: str | Path, without_captions: tuple[str, ...] = ()) -> Path:
    """Write the demo's real photos and a captions table (demo_anchors.jsonl) into folder;
    returns the table's path, which `ultracurate ingest` reads. Photos named in
    without_captions are listed with no caption."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in data_file("demo_anchors.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        spec = json.loads(line)
        arr = _skimage_photo(spec["image"])
        im = Image.fromarray(arr)
        path = folder / f"{spec['image']}.{spec['format']}"
        if not path.exists():
            if spec["format"] == "jpg":
                im.convert("RGB").save(path, quality=95)
            else:
                im.save(path)
        caps = [] if spec["image"] in without_captions else spec["captions"]
        rows.append({"path": path.name, "captions": caps, "id": spec["image"]})
    table = folder / "demo_anchors.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def run_demo(out: str | Path, seed: int = 0, progress: bool = True,
             force: bool = False) -> dict:
    """The whole pipeline on the bundled photos with tiny random-weight models, on the CPU:
    a workspace with the tiny models profile, the models built, the photos written (some
    without captions), then the `quick` recipe (examples/quick.toml): ingest, caption,
    instruct, ground, classify-masks, generate, score, filter, judge, chain (3-turn
    sessions), dedup, balance, review (dataset only, no App), export (the balanced set, and
    the sessions in MagicBrush's layout) and report. Returns what each step did, by step."""
    from .models import ROLES, make_tiny
    from .recipe import format_steps, load_recipe, run_recipe
    from .workspace import Workspace

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (force and (out / "ultracurate.toml").exists()):
            raise UltracurateError(f"{out} exists and is not empty; pick a new folder"
                                   + (" (--force replaces only an earlier workspace)"
                                      if force else " or pass --force to replace an earlier "
                                      "demo workspace"))
        import shutil
        shutil.rmtree(out)
    ws = Workspace.init(out, {"models": {"profile": "tiny"}})
    if progress:
        print("== building tiny random-weight models (saved as real checkpoints)",
              file=sys.stderr, flush=True)
    make_tiny(ws.root / "models" / "tiny", ROLES)
    write_demo_photos(ws.root / "photos", without_captions=DEMO_UNCAPTIONED)
    result = run_recipe(ws, load_recipe("quick", {"seed": seed}), progress=progress)
    steps: dict = {"workspace": str(ws.root), "recipe_run": result.run_id}
    for s in result.steps:  # by step name, as JSON has it (classify_masks, export_sessions)
        steps[s.stage.replace("-", "_")] = (s.summary.to_json() if s.summary is not None
                                            else {"state": s.state})
    steps["report"] = str(ws.root / "reports" / "report.html")
    steps["table"] = format_steps(result)
    return json.loads(json.dumps(steps, default=str))


def format_demo(steps: dict) -> str:
    """A few lines a person reads after the demo: what each step did, and where to look."""
    runs = []
    for k, v in steps.items():
        v = v.get("run", v) if isinstance(v, dict) else None   # generate: {plan, run}
        if isinstance(v, dict) and "rows_done" in v:
            runs.append(f"{k.replace('_', '-')} {v['rows_done']}")
    lines = [f"demo workspace: {steps['workspace']}",
             "rows done: " + ", ".join(runs)]
    f, b, e = steps.get("filter"), steps.get("balance"), steps.get("export")
    if f:
        lines.append(f"filter: {f['accepted']} accepted, {f['rejected']} rejected"
                     + (f"; balance selected {b['selected']}" if b else ""))
    if e:
        lines.append(f"export: {e['rows']} rows ({e['format']}) in {e['out']}")
    if steps.get("report"):
        lines.append(f"report: {steps['report']}")
    if steps.get("review"):
        lines.append(f"review: ultracurate review -w {steps['workspace']}")
    return "\n".join(lines)
