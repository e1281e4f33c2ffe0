"""`ultracurate runs`: the jobs of a workspace, live or past, and how far each is."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)


def runs(state: Optional[c.RunState] = typer.Option(None, "--state",
                                                    help="Only the runs in this state."),
         limit: Optional[int] = c.Count(None, "--limit", min=1, help="At most this many "
                                        "runs, newest first (default 20)."),
         watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C. With "
                                    "--json, one JSON object per refresh, a line each."),
         interval: float = c.Number(2.0, "--interval", min=0.1, max=3600,
                                    help="Seconds between refreshes with --watch."),
         workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Jobs (running, completed, interrupted, killed, failed): rows done, failed and total,
    rate, elapsed time, ETA, selection and options. A job's figures are those of its last
    committed batch; a run whose process is gone shows as killed."""
    ws = c.workspace(workspace)
    if not watch:
        rows = _read(ws, state, limit)
        if as_json:
            c.emit(rows, True)
        else:
            _print(rows)
        return
    try:
        if as_json:
            while True:
                typer.echo(json.dumps({"at": _now(), "runs": _read(ws, state, limit)},
                                      default=str))
                time.sleep(interval)
        from rich.console import Console
        from rich.live import Live

        from ..runs import runs_table
        console = Console(stderr=True)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                live.update(runs_table(_read(ws, state, limit),
                                       f"runs at {_now()} (Ctrl-C to stop)"), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:  # the one way a watch ends: cleanly
        return


def _read(ws, state, limit) -> list[dict]:
    from ..runs import list_runs
    with ws.catalog(read_only=True) as cat:
        return list_runs(cat, [state] if state else None, **c.given(limit=limit))


def _print(rows: list[dict]) -> None:
    from rich.console import Console

    from ..runs import runs_table
    if not rows:
        typer.echo("no runs")
        return
    Console().print(runs_table(rows))


def _now() -> str:
    import datetime as dt
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
