"""Bundled real photos (scikit-image's) with hand-written captions from examples/, and the demo
that runs the whole pipeline on them with tiny models on the CPU (some photos are ingested
without captions and captioned by the tiny captioner)."""

from __future__ import annotations

import json
import sys
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


# Photos the demo ingests without their captions: the tiny captioner writes theirs.
DEMO_UNCAPTIONED = ("coffee", "rocket", "motorcycle_right")


def write_demo_photos(folder: str | Path, without_captions: tuple[str, ...] = ()) -> Path:
    """Write the demo's real photos and a captions table (demo_anchors.jsonl) into folder;
    returns the table's path, which `ultracurate ingest` reads. Photos named in
    without_captions are listed with no caption."""
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
        caps = [] if spec["image"] in without_captions else spec["captions"]
        rows.append({"path": path.name, "captions": caps, "id": spec["image"]})
    table = folder / "demo_anchors.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


# Tiny random-weight models give meaningless scores, so UltraEdit's thresholds would pass
# nothing. The demo keeps only the direction rule (clip_sim_dir >= 0: about half the rows) and
# top-2 per edit, so that the filter visibly accepts and rejects; the pipeline is the real one.
DEMO_THRESHOLDS = dict(clip_sim_dir_min=0.0, top_k=2, drop_if_fewer=False,
                       unset=("clip_sim_image_min", "clip_sim_source_min",
                              "clip_sim_target_min", "dinov2_sim_min"))


CHAIN_TURNS = 3
CHAIN_EXPORT_WHERE = "session_id IS NOT NULL AND status = 'accepted'"


def run_demo(out: str | Path, seed: int = 0, progress: bool = True, size: int = 64,
             candidates: int = 3, review: bool = True, force: bool = False) -> dict:
    """The whole pipeline on the bundled photos with tiny random-weight models, on the CPU:
    ingest (some photos without captions), caption (those), instruct, ground, classify-masks,
    generate, score, filter, judge, chain (3-turn sessions), dedup, balance, review (dataset
    only, no App), export (the balanced set, and the sessions in MagicBrush's layout) and
    report. Returns what each step did."""
    from .export import export_dataset
    from .models import ROLES, make_tiny
    from .report import write_report
    from .runner import run_stage
    from .stages.balance import run_balance
    from .stages.classify_masks import run_classify_masks
    from .stages.dedup import run_dedup
    from .stages.filter import run_filter
    from .stages.generate import run_generate
    from .stages.ground import run_ground
    from .models.captioner import TINY_GRAMMAR
    from .stages.caption import run_caption
    from .stages.ingest import IngestStage, discover
    from .stages.chain import run_chain
    from .stages.instruct import run_instruct
    from .stages.judge import run_judge
    from .stages.score import run_score
    from .models.judge import TINY_GRAMMAR as JUDGE_GRAMMAR
    from .selection import Selection
    from .thresholds import Thresholds
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
    steps: dict = {"workspace": str(ws.root)}

    def say(msg: str) -> None:  # narration, like a progress bar: stdout holds the result
        if progress:
            print(f"== {msg}", file=sys.stderr, flush=True)

    say("building tiny random-weight models (saved as real checkpoints)")
    make_tiny(ws.root / "models" / "tiny", ROLES)
    say(f"ingest: scikit-image's real photos, captions from examples/ except for "
        f"{len(DEMO_UNCAPTIONED)} ingested without")
    table = write_demo_photos(ws.root / "photos", without_captions=DEMO_UNCAPTIONED)
    steps["ingest"] = run_stage(ws, IngestStage(discover([table])), progress=progress).to_json()
    say("caption: the tiny random-weight captioner (LLaVA architecture) for the photos "
        "without captions, decoding under its word grammar (English words, not a description)")
    steps["caption"] = run_caption(ws, grammar=TINY_GRAMMAR, seed=seed,
                                   progress=progress).to_json()
    say("instruct: rule back-end, 2 edits per anchor over the nine types")
    steps["instruct"] = run_instruct(ws, per_anchor=2, backend="rule", seed=seed,
                                     progress=progress).to_json()
    say("ground: GroundingDINO + SAM (tiny) on region edits")
    # random tiny detectors score low: a permissive box threshold lets some masks through
    steps["ground"] = run_ground(ws, box_threshold=0.0, text_threshold=0.0,
                                 progress=progress).to_json()
    steps["classify_masks"] = run_classify_masks(ws, progress=progress).to_json()
    say(f"generate: {candidates} candidate pairs per edit at {size}px (tiny SDXL)")
    steps["generate"] = _jsonable(run_generate(ws, candidates=candidates, mode="auto",
                                               seed=seed, size=size, progress=progress))
    say("score: CLIP, DINOv2, SSIM, L1, L2 (tiny models: meaningless values)")
    steps["score"] = run_score(ws, progress=progress).to_json()
    say("filter: the demo's own loose thresholds (see DEMO_THRESHOLDS)")
    thresholds = Thresholds.preset("ultraedit").override(**DEMO_THRESHOLDS)
    steps["filter"] = _jsonable(run_filter(ws, thresholds=thresholds))
    say("judge: the tiny random-weight judge (LLaVA architecture) rates the rows CLIP passed, "
        "two images per prompt, decoding under its JSON grammar (scores mean nothing)")
    steps["judge"] = run_judge(ws, grammar=JUDGE_GRAMMAR, seed=seed,
                               progress=progress).to_json()
    say(f"chain: {CHAIN_TURNS}-turn sessions from accepted candidates (each turn's anchor is "
        "the previous edited image; instruct, ground, generate, score, filter on it)")
    steps["chain"] = run_chain(ws, turns=CHAIN_TURNS, candidates=candidates, seed=seed,
                               ground={"box_threshold": 0.0, "text_threshold": 0.0},
                               generate={"size": size}, progress=progress,
                               say=say if progress else None).to_json()
    # dedup before balance: balance chooses among rows that are not duplicates
    # (tiny random CLIP embeds every small image alike: only near-identical ones count here)
    steps["dedup"] = _jsonable(run_dedup(ws, threshold=0.9999))
    steps["balance"] = _jsonable(run_balance(ws, by=("edit_type",), cap=4, seed=seed))
    if review:
        say("review: FiftyOne grouped dataset (open it with `ultracurate review`)")
        from .review import build_review_dataset
        steps["review"] = _jsonable(build_review_dataset(ws, progress=progress))
    say("export: Hugging Face dataset in UltraEdit's published schema")
    steps["export"] = _jsonable(export_dataset(ws, None, ws.root / "exports" / "hf",
                                               fmt="hf", progress=progress))
    say("export: the sessions in MagicBrush's layout (exports/sessions/sessions), beside "
        "their turns as flat jsonl rows")
    steps["export_sessions"] = _jsonable(export_dataset(
        ws, Selection(CHAIN_EXPORT_WHERE), ws.root / "exports" / "sessions", fmt="jsonl",
        sessions=True, progress=progress))
    report = write_report(ws, ws.root / "reports" / "report.html", thresholds=thresholds)
    steps["report"] = str(report)
    say(f"done: report at {report}")
    return steps


def _jsonable(obj):
    """A stage's summary object as plain data."""
    import dataclasses
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


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
