"""Options every command shares, so each reads and behaves the same way."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import typer

from ..selection import Selection, coerce_param
from ..workspace import Workspace

WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="ULTRACURATE_WORKSPACE",
                            help="Workspace folder (default: $ULTRACURATE_WORKSPACE, else the "
                                 "current directory or a parent).", show_envvar=False)
WhereOpt = typer.Option(None, "--where",
                        help="SQL predicate selecting rows, e.g. \"edit_type = 'replace'\"; "
                             "values as $name or :name with -p.")
ParamOpt = typer.Option(None, "--param", "-p", help="Bind a --where parameter: -p NAME VALUE "
                        "(or -p NAME=VALUE); repeatable.")
LimitOpt = typer.Option(None, "--limit", help="At most this many rows (lowest ids first).")
SampleOpt = typer.Option(None, "--sample", help="A random sample of N selected rows.")
SeedOpt = typer.Option(0, "--seed", help="Seed for --sample and for the job's randomness.")
ForceOpt = typer.Option(False, "--force", help="Redo rows this stage already finished.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")
EngineOpt = typer.Option("local", "--engine", help="local, or ray.")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (auto, or host:port; "
                                                  "default: a local cluster).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if present).")
BatchOpt = typer.Option(None, "--batch-size", help="Rows per batch (default: the stage's).")


def workspace(path: Optional[str]) -> Workspace:
    return Workspace.find(path)


def parse_params(params: Optional[List[str]]) -> dict[str, Any]:
    out = {}
    for p in params or []:
        name, sep, value = p.partition("=")
        if not sep or not name:
            from ..errors import SelectionError
            raise SelectionError(f"-p expects NAME VALUE, got '{p}'")
        out[name] = coerce_param(value)
    return out


def selection(where: Optional[str], params: Optional[List[str]],
              limit: Optional[int] = None, sample: Optional[int] = None,
              seed: int = 0) -> Selection:
    return Selection(where=where,
                     params=parse_params(params),
                     limit=limit, sample=sample, seed=seed)


def emit(data: Any, as_json: bool, text: Optional[str] = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))


def print_summary(summary, as_json: bool) -> None:
    if as_json:
        emit(summary.to_json(), True)
    else:
        typer.echo(f"{summary.stage}: run {summary.run_id} {summary.state}: "
                   f"{summary.rows_done} done, {summary.rows_failed} failed "
                   f"of {summary.rows_in} rows")
        for note in getattr(summary, "extra", {}).get("notes", []):
            typer.echo(f"  {note}")
