"""Third-party output: silent unless `-v`, and never on stdout.

The command line configures this once, at its root, before any library is imported (the
commands import them lazily), so no call site has to silence a library:

- environment variables the libraries read when they load: tqdm's, Hugging Face's and
  diffusers' progress bars and verbosity, Lance's Rust logger, Ray's driver logger, FiftyOne's
  progress bars; FiftyOne's log handler, which writes to stdout, is never installed (its
  records reach the one handler below instead);
- one logging handler on the root logger, on stderr: without -v it prints only ultracurate's
  own records; with -v every library's too. One handler also means no line twice (a library
  calling `logging.warning()` would otherwise add a second one with `basicConfig`);
- Python warnings: ignored without -v, except ultracurate's own.

What stdout holds is ultracurate's result alone (with --json, only JSON); progress bars and
messages go to stderr. `restore()` undoes all of it (for callers of `main()` in-process).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .errors import redact

# Read by the libraries when they load: set only without -v, and never over a user's own value.
QUIET_ENV = {
    "TQDM_DISABLE": "1",                   # every tqdm bar a library does not force on
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # the hub's and transformers' bars
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "LANCE_LOG": "error",                  # Lance's Rust logger (deprecation warnings)
    "LANCEDB_LOG": "error",                # and LanceDB's
    "RAY_LOGGER_LEVEL": "error",           # ray.init's "Started a local Ray instance", ...
    "FIFTYONE_SHOW_PROGRESS_BARS": "false",
}
# Set whatever -v says: FiftyOne logs to stdout unless its destination is one it does not
# know, when its records propagate to the root logger (on stderr).
ALWAYS_ENV = {"FIFTYONE_LOGGING_DESTINATION": "root"}

OWN = "ultracurate"   # the logger (and module) prefix of ultracurate's own output


def _own(name: str) -> bool:
    return name == OWN or name.startswith(OWN + ".")


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (a test's capture too)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property ignores it
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if not (self.verbose or _own(record.name)):
            return False
        # secrets never reach a terminal or a log file (see errors.redact)
        record.msg, record.args = redact(record.getMessage()), None
        return super().filter(record)


_state: dict | None = None


def configure(verbose: bool = False) -> None:
    """Quiet third-party output (or, verbose, let it through, on stderr)."""
    global _state
    restore()
    env: dict[str, str | None] = {}
    wanted = dict(ALWAYS_ENV)
    if not verbose:
        wanted.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})
    for k, v in wanted.items():
        env[k] = os.environ.get(k)
        os.environ[k] = v
    root = logging.getLogger()
    handler = _StderrHandler(verbose)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"
                                           if verbose else "%(message)s"))
    own = logging.getLogger(OWN)
    filters = warnings.catch_warnings()
    filters.__enter__()
    _state = {"env": env, "handler": handler, "own_level": own.level, "filters": filters}
    root.addHandler(handler)
    own.setLevel(logging.INFO)
    if verbose:
        logging.captureWarnings(True)   # library warnings as records, through the handler
    else:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=rf"{OWN}(\.|$)")
    _quiet_loaded(verbose)


def _quiet_loaded(verbose: bool) -> None:
    """Libraries loaded before configure() (a second command in one process) read their
    environment already: tell those that have a switch."""
    if verbose:
        return
    for mod in ("transformers", "diffusers"):
        if mod in sys.modules:
            try:
                lib = __import__(f"{mod}.utils.logging", fromlist=["x"])
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            except Exception:  # a library without the switch: its env var applies next load
                pass


def restore() -> None:
    """Undo configure(): the environment, the handler and the warning filters as they were."""
    global _state
    if _state is None:
        return
    s, _state = _state, None
    for k, v in s["env"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    logging.getLogger().removeHandler(s["handler"])
    logging.getLogger(OWN).setLevel(s["own_level"])
    logging.captureWarnings(False)
    s["filters"].__exit__(None, None, None)
