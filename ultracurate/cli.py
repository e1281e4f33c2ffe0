"""The `ultracurate` command: a thin layer over the library. Every sub-command lives in a module
of `ultracurate.commands` that exposes `register(app)`; this file only assembles them and turns
errors into one clear line and a non-zero exit code."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from . import __version__, commands
from .errors import UltracurateError

app = typer.Typer(
    name="ultracurate",
    help="Curate instruction-based image-editing datasets: ingest real photos, write edit "
         "instructions, ground regions, generate candidate edits, score, filter, balance, "
         "review and export. Every job runs over a SQL-selected subset of the catalog and is "
         "resumable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"ultracurate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """ultracurate: curation of instruction-based image-editing datasets."""


def _register_all() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        if mod.startswith("_"):
            continue
        importlib.import_module(f"ultracurate.commands.{mod}").register(app)


_register_all()


def join_param_pairs(argv: list[str]) -> list[str]:
    """`-p NAME VALUE` (sqlite-utils' form) becomes `-p NAME=VALUE` for the parser."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-p", "--param") and i + 2 < len(argv) and "=" not in argv[i + 1]:
            out += [a, f"{argv[i + 1]}={argv[i + 2]}"]
            i += 3
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    argv = join_param_pairs(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, standalone_mode=False)
    except UltracurateError as e:
        typer.echo(f"error: {e}", err=True)
        from .runner import Interrupted
        sys.exit(130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click's usage errors (typer vendors click) show themselves
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
