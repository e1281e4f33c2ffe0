"""`chain`: grow multi-turn edit sessions from accepted candidates."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("chain")(chain)


def chain(
        turns: Optional[int] = c.Count(None, "--turns", min=1, max=1000, help="Turns per session (turn 1 "
                             "is the accepted candidate a session starts from; default 3)."),
        per_anchor: Optional[int] = c.Count(None, "--per-anchor", min=1, max=10_000,
                                  help="Edits instruct writes for each turn's anchor (default 1)."),
        types: Optional[str] = typer.Option(None, "--types", help="Comma-separated edit types "
                                            "for later turns (default: all nine)."),
        candidates: Optional[int] = c.Count(None, "--candidates", "-n", min=1, max=100_000,
                                  help="Candidate pairs generated per edit and turn (default 8)."),
        size: Optional[int] = c.Count(None, "--size", min=8, max=4096,
                            help="Generation size (pixels, a multiple of 8; default 512)."),
        backend: Optional[c.LLMBackend] = typer.Option(None, "--backend", help="instruct's "
                                                       "back-end: rule, openai or transformers "
                                                       "(default: the workspace's llm role, "
                                                       "else rule)."),
        box_threshold: Optional[float] = c.Number(None, "--box-threshold", min=0, max=1,
                                        help="Grounding box threshold for region edits (default 0.3)."),
        text_threshold: Optional[float] = c.Number(None, "--text-threshold", min=0, max=1,
                                         help="Grounding text threshold for region edits (default 0.25)."),
        judge: bool = typer.Option(False, "--judge", help="Judge each turn's CLIP-passed "
                                   "candidates with the workspace's judge role (needed when "
                                   "the keep rule has --judge-min bounds)."),
        judge_grammar: Optional[str] = typer.Option(None, "--judge-grammar", help="With "
                                                    "--judge: a decoding grammar for a local "
                                                    "judge (tiny-judge for the tiny model)."),
        where: Optional[str] = typer.Option(
            None, "--where", help="SQL predicate over candidates_v choosing where sessions "
                                  "start (always narrowed to accepted candidates on photos; "
                                  "one session per edit, from its best)."),
        params: Optional[List[str]] = c.ParamOpt, limit: Optional[int] = c.LimitOpt,
        sample: Optional[int] = c.SampleOpt, seed: int = c.SeedOpt,
        device: Optional[str] = c.DeviceOpt,
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Multi-turn sessions: an accepted candidate's edited image becomes the next turn's
    anchor (caption: its target caption), and each turn runs instruct, ground,
    classify-masks, generate, score (the judge with --judge) and filter with the last filter
    run's keep rule; a session ends when a turn yields nothing accepted. Resumable: rerun the
    same command to go on; a larger --turns extends open sessions."""
    from ..runner import run
    ws = c.workspace(workspace)
    res = run(
        ws, "chain", c.selection(where, params, limit, sample, seed), progress=True,
        **c.given(turns=turns, per_anchor=per_anchor, candidates=candidates, types=types,
                  seed=seed),
        instruct=c.given(backend=backend, device=device),
        ground=c.given(box_threshold=box_threshold, text_threshold=text_threshold,
                       device=device),
        generate=c.given(size=size, device=device), score=c.given(device=device),
        judge=c.given(grammar=judge_grammar, device=device) if judge else None,
        say=lambda line: typer.echo(f"== {line}", err=True)).result  # narration: stderr
    c.emit(res.to_json(), as_json, res.text())
