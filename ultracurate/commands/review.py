"""`review`: the FiftyOne App over a selection of candidates, and its tags back into the
catalog."""

from __future__ import annotations

import contextlib
import sys
from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("review")(review)


def review(where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
           limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
           seed: int = c.SeedOpt,
           port: int = c.Count(5151, "--port", min=1, max=65535,
                               help="Port the App listens on."),
           address: str = typer.Option("127.0.0.1", "--address",
                                       help="Address the App binds to (loopback by default; "
                                            "0.0.0.0 exposes it to the network)."),
           no_launch: bool = typer.Option(False, "--no-launch",
                                          help="Build or update the dataset only."),
           pull: bool = typer.Option(False, "--pull", help="Only pull the App's tags into "
                                     "the catalog as human decisions."),
           reviewer: Optional[str] = typer.Option(None, "--reviewer",
                                                  help="Who decided (default: "
                                                       "$ULTRACURATE_REVIEWER, else the "
                                                       "login name)."),
           margin: Optional[float] = c.Number(None, "--margin", min=0, max=2,
                                              help="Borderline views: scores within this of a "
                                                   "keep-rule threshold (default 0.02)."),
           visualize: bool = typer.Option(True, "--visualize/--no-visualize",
                                          help="Compute a PCA embeddings plot from LanceDB's "
                                               "CLIP vectors (when there are any)."),
           dataset: Optional[str] = typer.Option(None, "--dataset", help="FiftyOne dataset "
                                                 "name (default: one per workspace)."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Review candidates in the FiftyOne App: one group per candidate (anchor, source,
    edited, mask), every score and reason as a field, saved views of the failure cases.
    Tags set in the App (accept, reject, bad_mask, bad_instruction, ...) become human
    decisions in the catalog with --pull and when the App session ends (Ctrl-C). With
    --json, one document when it ends: the dataset built and, under pull, the decisions."""
    from .. import review as rv
    from ..runner import run
    ws = c.workspace(workspace)
    if pull:
        _print_pull(run(ws, "review-pull", **c.given(dataset=dataset,
                                                     reviewer=reviewer)).result, as_json)
        return
    sel = c.selection(where, params, limit, sample, seed)
    summary = run(ws, "review", sel, **c.given(dataset=dataset, reviewer=reviewer,
                                               margin=margin, visualize=visualize)).result
    if no_launch:
        c.emit(summary.to_json(), as_json,
               f"review dataset {summary.dataset}: {summary.selected} candidates "
               f"({summary.added} added, {summary.updated} updated, {summary.unchanged} "
               f"unchanged, {summary.removed} removed; {summary.pulled} decisions pulled "
               f"first); views: {', '.join(summary.views) or 'none'}")
        return
    stdout = sys.stdout
    # FiftyOne's session prints on stdout from its threads at any time while it lives ("Could
    # not connect session, trying again in 10 seconds" when its server starts slowly): on
    # stderr instead, so that stdout holds ours alone (with --json, one JSON document)
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(sys.stderr))
    try:
        session = rv.launch_review(ws, summary.dataset, port=port, address=address)
    except BaseException:
        quiet.close()
        raise
    typer.echo(f"FiftyOne App: {rv.review_url(address, port)}  (dataset {summary.dataset}; "
               f"tag samples accept / reject / bad_mask / bad_instruction; Ctrl-C to stop "
               f"and pull the tags into the catalog)", file=sys.stderr if as_json else stdout)
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            session.close()
        except Exception:  # the App server may already be gone
            pass
        quiet.close()
        result = run(ws, "review-pull", **c.given(dataset=summary.dataset,
                                                  reviewer=reviewer)).result
        if as_json:   # one document: the dataset built, then what the session decided
            c.emit({**summary.to_json(), "pull": result.to_json()}, True)
        else:
            _print_pull(result, False)


def _print_pull(summary, as_json: bool) -> None:
    text = (f"pulled {summary.changed} decisions from {summary.dataset} "
            f"({summary.accepted} accept, {summary.rejected} reject, {summary.cleared} "
            f"cleared, of {summary.groups} groups)")
    if summary.conflicts:
        text += (f"; tagged both accept and reject, left as they were: candidates "
                 f"{', '.join(map(str, summary.conflicts))}")
    c.emit(summary.to_json(), as_json, text)
