"""The `ultracurate` command: a thin layer over the library. Every sub-command lives in a module
of `ultracurate.commands` that exposes `register(app)`; this file only assembles them and turns
errors into one clear line (secrets redacted) and a non-zero exit code."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys

import typer

from . import __version__, commands, quiet
from .errors import UltracurateError, redact

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
    context_settings={"help_option_names": ["-h", "--help"]},  # every sub-command inherits it
)


def _version(value: bool):
    if value:
        typer.echo(f"ultracurate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", envvar="ULTRACURATE_VERBOSE",
                                       show_envvar=False,
                                       help="Let libraries' own output through (progress "
                                            "bars, warnings, logs), on stderr. Default: only "
                                            "ultracurate's (also $ULTRACURATE_VERBOSE=1).")):
    """ultracurate: curation of instruction-based image-editing datasets."""
    # -v takes effect in main(), before parsing and before any library loads (see quiet.py)


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


VERBOSE = ("-v", "--verbose")


def hoist_verbose(argv: list[str]) -> list[str]:
    """-v is the root's option, but a user adds it anywhere (`ultracurate generate ... -v`):
    move it before the command (no command has a -v of its own; tests check). Tokens after
    `--` are left alone."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    flags = [a for a in head if a in VERBOSE]
    return flags[:1] + [a for a in head if a not in VERBOSE] + tail


class _RedactSecrets(logging.Filter):
    """Every log record passes redact() before any handler prints or stores it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {redact(' '.join(str(message).split()))}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console entry point: every failure a user can cause ends in one line on stderr,
    `error: ...`, and a non-zero exit (2 for a refused option, 130 for Ctrl-C)."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    from . import limits
    hard_exit, limits.HARD_EXIT = limits.HARD_EXIT, True  # see limits.bounded
    argv = hoist_verbose(join_param_pairs(list(sys.argv[1:] if argv is None else argv)))
    # the commands import the libraries after this, so their environment is set first
    quiet.configure(verbose=argv[:1] == ["-v"] or argv[:1] == ["--verbose"]
                    or os.environ.get("ULTRACURATE_VERBOSE", "").lower()
                    in ("1", "true", "t", "yes", "y", "on"))
    try:
        _main(argv)
    finally:  # main() called in-process (tests, scripts) leaves the caller's settings
        limits.HARD_EXIT = hard_exit
        quiet.restore()


def _main(argv: list[str]) -> None:
    for handler in logging.getLogger().handlers + [logging.lastResort]:
        if handler is not None and not any(isinstance(f, _RedactSecrets)
                                           for f in handler.filters):
            handler.addFilter(_RedactSecrets())
    try:
        app(args=argv, prog_name="ultracurate", standalone_mode=False)
    except UltracurateError as e:
        from .runner import Interrupted
        _fail(str(e), 130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _fail("aborted")
    except BrokenPipeError:  # `ultracurate select ... | head`: the reader left
        sys.stderr.close()
        sys.exit(1)
    except OSError as e:  # a full disk, a read-only folder, a missing file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or type(e).__name__}{where}")
    except MemoryError:
        _fail("out of memory")
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            # click's usage errors (typer vendors click): one line naming the command
            ctx = getattr(e, "ctx", None)
            path = ctx.command_path if ctx is not None else "ultracurate"
            _fail(f"{path}: {e.format_message()} (see {path} --help)", e.exit_code)
        import duckdb
        if isinstance(e, duckdb.Error):
            from .catalog import catalog_error
            _fail(str(catalog_error(e)))
        raise


if __name__ == "__main__":
    main()
