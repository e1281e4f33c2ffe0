"""Bundled real photos (scikit-image's) with hand-written captions from examples/, and the demo
that runs the whole pipeline on them with tiny models on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UltracurateError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def examples_dir() -> Path:
    if not EXAMPLES.exists():
        raise UltracurateError(f"examples folder not found at {EXAMPLES} (run from a checkout)")
    return EXAMPLES


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data as data
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(data, name)()


def write_demo_photos(folder: str | Path) -> Path:
    """Write the demo's real photos and a captions table (demo_anchors.jsonl) into folder;
    returns the table's path, which `ultracurate ingest` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (examples_dir() / "demo_anchors.jsonl").read_text().splitlines():
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
        rows.append({"path": path.name, "captions": spec["captions"], "id": spec["image"]})
    table = folder / "demo_anchors.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def run_demo(out: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """The whole pipeline on the bundled photos with tiny random-weight models, on the CPU.
    Returns a summary (stage -> run summary / output path)."""
    from .models import ROLES, make_tiny
    from .runner import run_stage
    from .stages.ingest import IngestStage, discover
    from .workspace import Workspace

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UltracurateError(f"{out} exists and is not empty; pick a new folder or remove it")
    ws = Workspace.init(out, {"models": {"profile": "tiny"}})
    summary: dict = {"workspace": str(ws.root)}
    make_tiny(ws.root / "models" / "tiny", ROLES)
    table = write_demo_photos(ws.root / "photos")
    summary["ingest"] = run_stage(ws, IngestStage(discover([table])), progress=progress).to_json()
    return summary
