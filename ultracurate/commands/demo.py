"""`ultracurate demo`: the whole pipeline on bundled real photos with tiny models."""

from __future__ import annotations

from pathlib import Path

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(directory: Path = typer.Argument(Path("demo-workspace"), help="New folder for the "
                                          "demo workspace."),
         seed: int = c.SeedOpt,
         force: bool = typer.Option(False, "--force", help="Replace DIRECTORY if it holds an "
                                    "earlier workspace."),
         as_json: bool = c.JsonOpt):
    """Run every stage on scikit-image's real photos with tiny random-weight models on the
    CPU (the `quick` recipe, examples/quick.toml), ending in an export and a report. (Tiny
    models give meaningless scores: the demo shows the pipeline, not good edits.) Prints a
    short summary; --json, what every step did."""
    from ..demo import format_demo, run_demo
    summary = run_demo(directory, seed=seed, force=force)
    c.emit(summary, as_json, format_demo(summary))
