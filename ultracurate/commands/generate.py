"""`ultracurate generate`: candidate pairs for the selected edits (a thin layer over
`run(ws, "generate", ...)`, or adaptive rounds: `run(ws, "adaptive", ...)`)."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
             limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
             seed: int = c.SeedOpt,
             candidates: Optional[int] = c.Count(None, "--candidates", "-n", min=1,
                                                 max=100_000,
                                                 help="Candidates per edit (planned up to "
                                                      "this many; rerun with more to add "
                                                      "more; default 30)."),
             mode: Optional[c.EditMode] = typer.Option(
                 None, "--mode", help="free, region, or auto (the default: each edit's own "
                 "mode; region needs a grounded mask)."),
             behaviour: Optional[c.Behaviour] = typer.Option(
                 None, "--behaviour", help="method (the default: proper Prompt-to-Prompt, "
                 "SDXL added conditioning on) or ultraedit-compat (what the released "
                 "generator does)."),
             size: Optional[int] = c.Count(None, "--size", min=8, max=4096,
                                           help="Square generation size (512 as the method, "
                                                "the default; 64 or 128 for tiny demo "
                                                "models)."),
             keep_anchor_source: bool = typer.Option(
                 False, "--keep-anchor-source", help="Save the real anchor photo (resized and "
                 "cropped) as the source image instead of its regeneration."),
             soft_variant: Optional[c.SoftVariant] = typer.Option(
                 None, "--soft-variant", help="Region soft mask: ultraedit (the default) or "
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
             max_candidates: Optional[int] = c.Count(
                 None, "--max-candidates", min=1, max=100_000,
                 help="Adaptive rounds: at most this many candidates per edit (default 30)."),
             round_size: Optional[int] = c.Count(
                 None, "--round-size", min=1, max=100_000,
                 help="Adaptive rounds: new candidates per edit per round (default 8)."),
             preset: Optional[c.Preset] = typer.Option(
                 None, "--preset", help="Adaptive rounds: the filter's thresholds (ultraedit, "
                 "the default, or ip2p)."),
             device: Optional[str] = c.DeviceOpt, batch_size: Optional[int] = c.BatchOpt,
             workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Generate candidate pairs (source image, edited image) for the selected edits: plan
    the candidate rows with deterministic seeds, then render them in batches across edits.
    Resumable: rerun the same command to finish a stopped run."""
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    options = c.given(candidates=candidates, mode=mode, behaviour=behaviour, seed=seed,
                      size=size, keep_anchor_source=keep_anchor_source or None,
                      soft_variant=soft_variant, mask_class=mask_class,
                      pairs_per_call=pairs_per_call)
    if until_accepted is not None:
        from ..runner import run
        options.pop("candidates", None)
        res = run(ws, "adaptive", sel, progress=not as_json, until_accepted=until_accepted,
                  **c.given(max_candidates=max_candidates, round_size=round_size,
                            preset=preset),
                  generate={**options, **c.given(engine=engine, address=address,
                                                 workers=workers, device=device,
                                                 batch_size=batch_size)},
                  score=c.given(device=device)).result
        data = res.to_json()
        per = data["candidates_per_success"]
        c.emit(data, as_json, f"adaptive rounds: {data['succeeded']} of {data['edits']} edits "
               f"reached {until_accepted} accepted; {data['generated']} candidates generated"
               + (f" ({per:.1f} per successful edit)" if per else ""))
        return
    c.run_stage(ws, "generate", sel, as_json=as_json, engine=engine, address=address,
                workers=workers, device=device, batch_size=batch_size, force=force, **options)
