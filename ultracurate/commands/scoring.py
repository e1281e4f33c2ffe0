"""Commands after generation: score, filter, balance, dedup, report. Each is a thin layer over
`ultracurate.runner.run(ws, STAGE, selection, **options)`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("score")(score)
    app.command("filter")(filter_)
    app.command("balance")(balance)
    app.command("dedup")(dedup)
    app.command("report")(report)


def score(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
          limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
          seed: int = c.SeedOpt, force: bool = c.ForceOpt,
          engine: Optional[c.EngineName] = c.EngineOpt,
          address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
          batch_size: Optional[int] = c.BatchOpt, workspace: Optional[str] = c.WorkspaceOpt,
          as_json: bool = c.JsonOpt):
    """Score generated candidates: CLIP (source, target, direction, image), DINOv2, SSIM, L1,
    L2; embeddings to LanceDB."""
    ws = c.workspace(workspace)
    c.run_stage(ws, "score", c.selection(where, params, limit, sample, seed), as_json=as_json,
                engine=engine, address=address, device=device, batch_size=batch_size,
                force=force)


def filter_(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
            limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
            seed: int = c.SeedOpt,
            preset: Optional[c.Preset] = typer.Option(None, help="Default thresholds: "
                                                      "ultraedit (per mode; the default) or "
                                                      "ip2p."),
            clip_min: Optional[float] = c.Number(
                None, "--clip-min", help="Shortcut: clip_sim_source and clip_sim_target "
                                         "at least this."),
            clip_source_min: Optional[float] = c.Number(None, "--clip-source-min", help="Keep rows with clip_sim_source at least this."),
            clip_target_min: Optional[float] = c.Number(None, "--clip-target-min", help="Keep rows with clip_sim_target at least this."),
            clip_dir_min: Optional[float] = c.Number(None, "--clip-dir-min", help="Keep rows with clip_sim_dir at least this."),
            clip_image_min: Optional[float] = c.Number(None, "--clip-image-min", help="Keep rows with clip_sim_image at least this."),
            clip_image_max: Optional[float] = c.Number(None, "--clip-image-max", help="Keep rows with clip_sim_image at most this."),
            dino_min: Optional[float] = c.Number(None, "--dino-min", help="Keep rows with dinov2_sim at least this."),
            dino_max: Optional[float] = c.Number(None, "--dino-max", help="Keep rows with dinov2_sim at most this."),
            ssim_min: Optional[float] = c.Number(None, "--ssim-min", help="Keep rows with ssim at least this."),
            ssim_max: Optional[float] = c.Number(None, "--ssim-max", help="Keep rows with ssim at most this."),
            l1_max: Optional[float] = c.Number(None, "--l1-max", help="Keep rows with l1 at most this."),
            l2_max: Optional[float] = c.Number(None, "--l2-max", help="Keep rows with l2 at most this."),
            judge_min: Optional[List[str]] = c.JudgeBounds(
                "--judge-min", help="Keep rows the judge scored at least N (1-5) on ASPECT: "
                                    "instruction, preservation or quality; repeatable. Rows "
                                    "not judged fail it."),
            top_k: Optional[int] = c.Count(None, "--top-k", min=1, max=100_000,
                                           help="Keep the best K per edit by clip_sim_dir "
                                                "(default: 4 free, 3 region)."),
            region_rule: Optional[bool] = typer.Option(
                None, "--region-rule/--no-region-rule",
                help="Drop an edit when fewer than K pass (default: region mode only)."),
            mode: Optional[c.Mode] = typer.Option(None, help="Apply the options above to "
                                                  "this mode only (free or region)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Print the funnel; change "
                                         "nothing."),
            workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Accept or reject scored candidates by thresholds (CLIP/DINOv2/pixel scores and the
    judge's), then top-k per edit; every rejected row records all its reasons; human decisions
    override."""
    from ..runner import run
    from ..stages.filter import format_funnel
    from ..thresholds import parse_judge_min
    ws = c.workspace(workspace)
    res = run(ws, "filter", c.selection(where, params, limit, sample, seed), dry_run=dry_run,
              **c.given(preset=preset, mode=mode, clip_min=clip_min,
                        clip_sim_source_min=clip_source_min,
                        clip_sim_target_min=clip_target_min, clip_sim_dir_min=clip_dir_min,
                        clip_sim_image_min=clip_image_min, clip_sim_image_max=clip_image_max,
                        dinov2_sim_min=dino_min, dinov2_sim_max=dino_max, ssim_min=ssim_min,
                        ssim_max=ssim_max, l1_max=l1_max, l2_max=l2_max, top_k=top_k,
                        drop_if_fewer=region_rule, **parse_judge_min(judge_min))).result
    c.emit(res.to_json(), as_json, format_funnel(res))


def balance(by: Optional[List[str]] = typer.Option(None, "--by", metavar="COLUMN",
                                                   help="Column(s) of candidates_v to "
                                                        "stratify by; repeatable (default "
                                                        "edit_type)."),
            target: Optional[int] = c.Count(None, "--target", min=1,
                                            help="Select about N rows in all, spread evenly "
                                                 "over the groups."),
            cap: Optional[int] = c.Count(None, "--cap", min=1, help="At most N rows per group."),
            where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
            seed: int = c.SeedOpt,
            plot: Optional[Path] = typer.Option(None, help="Bar plot path (default: "
                                                "WORKSPACE/reports/balance-run<N>.png)."),
            workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Stratified selection of accepted rows: marks `selected`, prints before/after counts
    and saves a bar plot."""
    from ..runner import run
    from ..stages.balance import format_balance
    ws = c.workspace(workspace)
    res = run(ws, "balance", c.selection(where, params),
              **c.given(by=tuple(by) if by else None, target=target, cap=cap, seed=seed,
                        plot_path=plot)).result
    c.emit(res.to_json(), as_json, format_balance(res))


def dedup(threshold: Optional[float] = c.Number(
              None, "--threshold", min=-1, max=1, help="Cosine similarity of CLIP image "
              "embeddings at or above which two images are near-duplicates (default 0.95)."),
          what: Optional[c.DedupWhat] = typer.Option(None, help="anchors, edited, or both "
                                                     "(the default)."),
          where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
          device: Optional[str] = c.DeviceOpt, workspace: Optional[str] = c.WorkspaceOpt,
          as_json: bool = c.JsonOpt):
    """Mark near-duplicate anchors and edited images (duplicate_of = the row they
    duplicate), by LanceDB vector search over the stored CLIP embeddings (anchors are
    embedded first by the embed-anchors stage, which resumes like any stage)."""
    from ..runner import run
    from ..stages.dedup import format_dedup
    ws = c.workspace(workspace)
    res = run(ws, "dedup", c.selection(where, params), device=device,
              **c.given(threshold=threshold, what=what)).result
    c.emit(res.to_json(), as_json, format_dedup(res))


def report(out: Path = typer.Argument(..., help="The HTML file to write."),
           where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
           examples: Optional[int] = c.Count(None, "--examples", max=1000,
                                             help="Example pairs per edit type (default 4)."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """One self-contained HTML report: score histograms with thresholds, acceptance funnel,
    mask classes, balance, example pairs per edit type."""
    from ..runner import run
    ws = c.workspace(workspace)
    path = run(ws, "report", c.selection(where, params),
               **c.given(out=out, examples=examples)).result
    c.emit({"report": str(path)}, as_json, f"wrote {path}")
