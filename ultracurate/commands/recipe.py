"""`ultracurate run RECIPE.toml`: a recipe's stages in order (a thin layer over
ultracurate.recipe)."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("run")(run_recipe)


def run_recipe(recipe: str = typer.Argument(..., help="A recipe TOML file (see "
                                            "examples/), or a packaged recipe's name: quick, "
                                            "ultraedit."),
               overrides: Optional[List[str]] = typer.Option(
                   None, "--set", help="Change an option for this run: OPTION=VALUE (every "
                   "step that takes it) or STAGE.OPTION=VALUE; VALUE is TOML (3, 'x', "
                   "[1, 2]); repeatable."),
               restart: bool = typer.Option(False, "--restart", help="Run every step again, "
                                            "even those an unfinished earlier run of this "
                                            "recipe finished (each still skips its done "
                                            "rows)."),
               workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Run a recipe: its stages in order, each with its options and selection. Rerun it to
    resume: the stages an unfinished earlier run finished are skipped, the one it stopped in
    goes on from its pending rows. Ends with a table of each stage's rows, time and rate."""
    from ..recipe import format_steps, load_recipe
    from ..recipe import run_recipe as run
    ws = c.workspace(workspace)
    result = run(ws, load_recipe(recipe, overrides), restart=restart, progress=not as_json)
    c.emit(result.to_json(), as_json, format_steps(result))
