"""Commands for regions: ground (detector + SAM masks) and classify-masks."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("ground")(ground)
    app.command("classify-masks")(classify_masks)


def ground(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
           limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
           seed: int = c.SeedOpt,
           box_threshold: float = c.Number(0.3, "--box-threshold", min=0, max=1,
                                           help="Keep detector boxes scoring above this "
                                                "(GroundingDINO / OWLv2)."),
           text_threshold: float = c.Number(0.25, "--text-threshold", min=0, max=1,
                                            help="GroundingDINO: label a box with the phrase "
                                                 "tokens above this."),
           backend: Optional[c.GroundBackend] = typer.Option(
               None, help="grounding-dino or owlv2 (default: from the checkpoint's config)."),
           force: bool = c.ForceOpt, engine: c.EngineName = c.EngineOpt,
           address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
           batch_size: Optional[int] = c.BatchOpt,
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Mask the edit object of region edits: detect its phrase, prompt SAM with the boxes,
    store the union as a COCO RLE with its features. No box: edit_status 'no_region'.
    Runs over mode = 'region' edits with an edit object other than NONE."""
    from ..runner import make_engine
    from ..stages.ground import run_ground
    ws = c.workspace(workspace)
    summary = run_ground(ws, c.selection(where, params, limit, sample, seed),
                         box_threshold=box_threshold, text_threshold=text_threshold,
                         backend=backend, force=force, engine=make_engine(engine, address),
                         device=device, batch_size=batch_size)
    c.print_summary(summary, as_json)


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
                   force: bool = c.ForceOpt, workspace: Optional[str] = c.WorkspaceOpt,
                   as_json: bool = c.JsonOpt):
    """Classify stored masks as too_large, too_small, fragmented or fine. Rerun with new
    thresholds at will: it reclassifies from the stored features, without SAM."""
    from ..stages.classify_masks import run_classify_masks
    ws = c.workspace(workspace)
    summary = run_classify_masks(ws, c.selection(where, params, limit, sample, seed),
                                 min_area=min_area, max_area=max_area,
                                 max_contours=max_contours, force=force)
    c.print_summary(summary, as_json)
