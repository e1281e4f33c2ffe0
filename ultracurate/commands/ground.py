"""Commands for regions: ground (detector + SAM masks) and classify-masks."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..names import BOX_THRESHOLD, TEXT_THRESHOLD
from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("ground")(ground)
    app.command("classify-masks")(classify_masks)


def ground(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
           limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
           seed: int = c.SeedOpt,
           box_threshold: Optional[float] = c.Number(
               None, "--box-threshold", min=0, max=1, help="Keep detector boxes scoring above "
               f"this (GroundingDINO / OWLv2; default {BOX_THRESHOLD})."),
           text_threshold: Optional[float] = c.Number(
               None, "--text-threshold", min=0, max=1, help="GroundingDINO: label a box with "
               f"the phrase tokens above this (default {TEXT_THRESHOLD})."),
           backend: Optional[c.GroundBackend] = typer.Option(
               None, help="grounding-dino or owlv2 (default: from the checkpoint's config)."),
           force: bool = c.ForceOpt, engine: Optional[c.EngineName] = c.EngineOpt,
           address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
           workers: Optional[int] = c.WorkersOpt,
           gpus_per_worker: Optional[float] = c.GpusPerWorkerOpt,
           cpus_per_worker: Optional[float] = c.CpusPerWorkerOpt,
           batch_size: Optional[int] = c.BatchOpt,
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Mask the edit object of region edits: detect its phrase, prompt SAM with the boxes,
    store the union as a COCO RLE with its features. No box: edit_status 'no_region'.
    Runs over mode = 'region' edits with an edit object other than NONE."""
    ws = c.workspace(workspace)
    c.run_stage(ws, "ground", c.selection(where, params, limit, sample, seed),
                as_json=as_json, engine=engine, address=address, device=device,
                batch_size=batch_size, force=force, box_threshold=box_threshold,
                text_threshold=text_threshold, backend=backend, workers=workers,
                gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)


def classify_masks(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
                   limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
                   seed: int = c.SeedOpt,
                   min_area: Optional[float] = c.Number(
                       None, "--min-area", min=0, max=1,
                       help="Area fraction at or below this: too_small "
                            "(default 0.01, the released code's)."),
                   max_area: Optional[float] = c.Number(
                       None, "--max-area", min=0, max=1,
                       help="Area fraction at or above this: too_large (default 0.9)."),
                   max_contours: Optional[int] = c.Count(
                       None, "--max-contours",
                       help="More external contours than this: fragmented (default 500)."),
                   force: bool = c.ForceOpt,
                   engine: Optional[c.EngineName] = c.EngineOpt,
                   address: Optional[str] = c.AddressOpt,
                   workers: Optional[int] = c.WorkersOpt,
                   cpus_per_worker: Optional[float] = c.CpusPerWorkerOpt,
                   workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Classify stored masks as too_large, too_small, fragmented or fine. Rerun with new
    thresholds at will: it reclassifies from the stored features, without SAM."""
    ws = c.workspace(workspace)
    c.run_stage(ws, "classify-masks", c.selection(where, params, limit, sample, seed),
                as_json=as_json, force=force, min_area=min_area, max_area=max_area,
                max_contours=max_contours, engine=engine, address=address, workers=workers,
                cpus_per_worker=cpus_per_worker)
