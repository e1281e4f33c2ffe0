"""`ultracurate generate`: candidate pairs for the selected edits (a thin layer over
ultracurate.stages.generate.run_generate)."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
             limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
             seed: int = c.SeedOpt,
             candidates: int = c.Count(30, "--candidates", "-n", min=1, max=100_000,
                                       help="Candidates per edit (planned up to this "
                                            "many; rerun with more to add more)."),
             mode: c.EditMode = typer.Option("auto", "--mode", help="free, region, or auto "
                                             "(each edit's own mode; region needs a grounded "
                                             "mask)."),
             behaviour: c.Behaviour = typer.Option("method", "--behaviour", help="method "
                                                   "(proper Prompt-to-Prompt, SDXL added "
                                                   "conditioning on) or ultraedit-compat (what "
                                                   "the released generator does)."),
             size: int = c.Count(512, "--size", min=8, max=4096,
                                 help="Square generation size (512 as the method; 64 or 128 "
                                      "for tiny demo models)."),
             keep_anchor_source: bool = typer.Option(
                 False, "--keep-anchor-source", help="Save the real anchor photo (resized and "
                 "cropped) as the source image instead of its regeneration."),
             soft_variant: c.SoftVariant = typer.Option("ultraedit", "--soft-variant",
                                                        help="Region soft mask: ultraedit or "
                                                             "feathered."),
             mask_class: Optional[str] = typer.Option(
                 None, "--mask-class", metavar="CLASS,CLASS",
                 help="Mask classes region generation takes, a comma list of fine, "
                 "fragmented, too_small, too_large, or 'any' (default: fine, "
                 "unless --where reads mask_class). Other region edits are skipped, with "
                 "the reason."),
             pairs_per_call: Optional[int] = c.Count(
                 None, "--pairs-per-call", min=1, max=4096, help="method: candidate pairs "
                 "rendered together in one model call (default 16), fixed when planned; a "
                 "candidate's pixels never depend on --batch-size."),
             force: bool = c.ForceOpt, engine: c.EngineName = c.EngineOpt,
             address: Optional[str] = c.AddressOpt,
             workers: Optional[int] = c.Count(None, "--workers", min=1, max=4096,
                                              help="Ray: model replicas (default: one "
                                                   "per GPU, else one)."),
             until_accepted: Optional[int] = c.Count(
                 None, "--until-accepted", min=1, max=100_000,
                 help="Adaptive rounds: generate, score and filter in rounds, and stop an "
                      "edit once this many of its candidates pass."),
             max_candidates: int = c.Count(30, "--max-candidates", min=1, max=100_000,
                                           help="Adaptive rounds: at most this many "
                                                "candidates per edit."),
             round_size: int = c.Count(8, "--round-size", min=1, max=100_000,
                                       help="Adaptive rounds: new candidates per edit per "
                                            "round."),
             preset: c.Preset = typer.Option("ultraedit", "--preset", help="Adaptive rounds: "
                                             "the filter's thresholds (ultraedit or ip2p)."),
             device: Optional[str] = c.DeviceOpt, batch_size: Optional[int] = c.BatchOpt,
             workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Generate candidate pairs (source image, edited image) for the selected edits: plan
    the candidate rows with deterministic seeds, then render them in batches across edits.
    Resumable: rerun the same command to finish a stopped run."""
    from ..stages.generate import run_generate
    ws = c.workspace(workspace)
    if until_accepted is not None:
        from ..stages.adaptive import run_adaptive
        from ..thresholds import Thresholds
        res = run_adaptive(
            ws, c.selection(where, params, limit, sample, seed), until_accepted=until_accepted,
            max_candidates=max_candidates, round_size=round_size,
            thresholds=Thresholds.preset(preset),
            generate_kwargs=dict(mode=mode, behaviour=behaviour, engine=engine, seed=seed,
                                 size=size, keep_anchor_source=keep_anchor_source,
                                 soft_variant=soft_variant, address=address, workers=workers,
                                 device=device, batch_size=batch_size, mask_class=mask_class,
                                 pairs_per_call=pairs_per_call),
            score_kwargs=dict(device=device), progress=True)
        data = res.to_json()
        per = data["candidates_per_success"]
        c.emit(data, as_json, f"adaptive rounds: {data['succeeded']} of {data['edits']} edits "
               f"reached {until_accepted} accepted; {data['generated']} candidates generated"
               + (f" ({per:.1f} per successful edit)" if per else ""))
        return
    out = run_generate(ws, c.selection(where, params, limit, sample, seed),
                       candidates=candidates, mode=mode, behaviour=behaviour, engine=engine,
                       seed=seed, size=size, keep_anchor_source=keep_anchor_source,
                       soft_variant=soft_variant, address=address, workers=workers,
                       device=device, batch_size=batch_size, force=force,
                       mask_class=mask_class, pairs_per_call=pairs_per_call)
    if as_json:
        c.emit(out.to_json(), True)
        return
    plan = out.plan.to_json()
    skipped = ", ".join(f"{n} {r}" for r, n in plan["skipped"].items()) or "none"
    typer.echo(f"planned {plan['planned']} new candidates for {plan['edits']} edits "
               f"(skipped edits: {skipped})")
    c.print_summary(out.run, False)
