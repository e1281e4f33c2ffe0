"""Options every command shares, and the one place that defines the CLI's option types, so each
command reads, checks and behaves the same way.

Every value is checked at the boundary, before any library code runs: counts are whole numbers
in a range (`--batch-size -1`, `--limit -1`, 2**63 are refused), numbers are finite (`nan`,
`inf` are refused) and in range, and enumerated options accept only their choices (listed in
--help). A refused option is one line: `error: ...`, exit 2.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, List, Literal, Optional

import typer

from ..catalog import VIEWS
from ..errors import SelectionError, register_secret
from ..selection import Selection
from ..names import EDIT_MODES, EXPORT_FORMATS, EXPORT_LAYOUTS, MODES
from ..runs import STATES as RUN_STATES
from ..thresholds import PRESETS
from ..workspace import Workspace

MAX_INT = 2**63 - 1        # DuckDB's BIGINT: ids, seeds and counts beyond it cannot be stored
MAX_BATCH = 1_000_000      # rows per batch; beyond this a batch is the whole job anyway


# -- option types ----------------------------------------------------------------------------
def Count(default: Any, *decls: str, help: str, min: int = 0, max: int = MAX_INT,
          **kw) -> Any:
    """A whole-number option in [min, max] (--help shows the range)."""
    kw.setdefault("metavar", "N")
    return typer.Option(default, *decls, help=help, min=min, max=max, **kw)


def _finite(lo: float | None, hi: float | None):
    def parse(value) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"'{value}' is not a number") from None
        if not math.isfinite(v):
            raise typer.BadParameter(f"'{value}' is not a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = (f"between {lo:g} and {hi:g}" if lo is not None and hi is not None
                    else f"at least {lo:g}" if lo is not None else f"at most {hi:g}")
            raise typer.BadParameter(f"{v:g} is not {span}")
        return v
    return parse


def Number(default: Any, *decls: str, help: str, min: float | None = None,
           max: float | None = None, **kw) -> Any:
    """A finite decimal option in [min, max] (nan and inf refused)."""
    return typer.Option(default, *decls, help=help, parser=_finite(min, max),
                        metavar="NUMBER", **kw)


def _device(value) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?|mps", str(value)):
        raise typer.BadParameter(f"'{value}' is not a device (cpu, cuda, cuda:N or mps)")
    return str(value)


# Choices. Where the library names a set in a module the CLI imports anyway, it is used here;
# the others are checked against their library constants by tests/test_cli.py.
TableFormat = Literal["table", "csv", "json"]
ViewName = Literal[tuple(VIEWS)]                              # anchors, edits, candidates, sessions
EngineName = Literal["local", "ray"]                          # runner.ENGINES
Mode = Literal[tuple(MODES)]                                  # free, region
EditMode = Literal[tuple(EDIT_MODES)]                         # auto, free, region
ExportFormat = Literal[tuple(EXPORT_FORMATS)]                 # hf, jsonl, ip2p, wds
ExportLayout = Literal[tuple(EXPORT_LAYOUTS)]                 # default, ultraedit
RunState = Literal[tuple(RUN_STATES)]                         # running, completed, ...
Preset = Literal[tuple(PRESETS)]                              # ultraedit, ip2p
Profile = Literal["ultraedit", "tiny"]                        # models.resolve
Behaviour = Literal["method", "ultraedit-compat"]             # generation.behaviour.BEHAVIOURS
SoftVariant = Literal["ultraedit", "feathered"]               # masks.soft_mask variants
InstructionsFormat = Literal["ultraedit", "ip2p", "magicbrush"]  # instruct.importers.FORMATS
LLMBackend = Literal["rule", "openai", "transformers"]        # instruct.backends.BACKENDS
CaptionBackend = Literal["transformers", "openai"]           # captioners.BACKENDS
JudgeBackend = Literal["transformers", "openai"]             # judge.BACKENDS
DType = Literal["float32", "float16", "bfloat16"]
GroundBackend = Literal["grounding-dino", "owlv2"]            # models.grounding
DedupWhat = Literal["anchors", "edited", "both"]              # stages.dedup.DedupStage
Benchmark = Literal["magicbrush", "emuedit"]                  # evaluate.BENCHMARKS


def _judge_bound(value) -> str:
    """One --judge-min ASPECT=N, its form checked here (its range is the keep rule's check)."""
    from ..errors import UltracurateError
    from ..thresholds import parse_judge_min
    try:
        parse_judge_min([value])
    except UltracurateError as e:
        raise typer.BadParameter(str(e).removeprefix("--judge-min ")) from None
    return str(value)


def JudgeBounds(*decls: str, help: str) -> Any:
    """--judge-min ASPECT=N, repeatable."""
    return typer.Option(None, *decls, help=help, parser=_judge_bound, metavar="ASPECT=N")

# -- shared options --------------------------------------------------------------------------
WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="ULTRACURATE_WORKSPACE",
                            metavar="DIR",
                            help="Workspace folder (default: $ULTRACURATE_WORKSPACE, else the "
                                 "current directory or a parent).", show_envvar=False)
WhereOpt = typer.Option(None, "--where", metavar="SQL",
                        help="SQL predicate selecting rows, e.g. \"edit_type = 'replace'\"; "
                             "values as $name or :name with -p.")
ParamOpt = typer.Option(None, "--param", "-p", metavar="NAME VALUE", help="Bind a --where parameter: -p NAME VALUE "
                        "(or -p NAME=VALUE); repeatable. The value is text, cast to the type "
                        "its place in the predicate needs.")
LimitOpt = Count(None, "--limit", help="At most this many rows (lowest ids first).")
SampleOpt = Count(None, "--sample", help="A random sample of N selected rows.")
SeedOpt = Count(0, "--seed", help="Seed for --sample and for the job's randomness.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")

# The HTTP client's options, shared by every command that talks to a served model
ConcurrencyOpt = Count(None, "--concurrency", min=1, max=1024,
                       help="Concurrent HTTP requests (default 8).")
TimeoutOpt = Number(None, "--timeout", min=0.001, max=86_400,
                    help="HTTP request timeout (s; default 60).")
MaxRetriesOpt = Count(None, "--max-retries", max=100,
                      help="HTTP retries on timeouts, 429 and 5xx (default 4).")
EngineOpt = typer.Option(None, "--engine", help="local (the default), or ray.")
AddressOpt = typer.Option(None, "--address", metavar="ADDRESS", help="Ray cluster address (auto, or host:port; "
                                                  "default: a local cluster).")
WorkersOpt = Count(None, "--workers", min=1, max=4096,
                   help="Ray: stage replicas, spread over the cluster's nodes (default: one "
                        "per GPU, else one).")
GpusPerWorkerOpt = Number(None, "--gpus-per-worker", min=0, max=64,
                          help="Ray: GPUs each replica asks for (default: 1 when the cluster "
                               "has GPUs, else 0; fractions share a GPU).")
CpusPerWorkerOpt = Number(None, "--cpus-per-worker", min=0, max=1024,
                          help="Ray: CPUs each replica asks for (default 1).")
DeviceOpt = typer.Option(None, "--device", parser=_device, metavar="DEVICE",
                         help="cpu, cuda, cuda:N (default: cuda if present).")
BatchOpt = Count(None, "--batch-size", min=1, max=MAX_BATCH,
                 help="Rows per batch (default: the stage's).")
ForceOpt = typer.Option(False, "--force", help="Redo rows this stage already finished.")


def workspace(path: Optional[str]) -> Workspace:
    return Workspace.find(path)


_PARAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_params(params: Optional[List[str]]) -> dict[str, str]:
    """-p NAME=VALUE pairs as {name: text}. The text is bound as it is; DuckDB casts it to the
    type its place in the predicate needs ('-p t nan' against a text column stays text)."""
    out: dict[str, str] = {}
    for p in params or []:
        name, sep, value = p.partition("=")
        if not sep or not name:
            raise SelectionError(f"-p expects NAME VALUE, got '{p}'")
        if not _PARAM_NAME.fullmatch(name):
            raise SelectionError(f"-p {name}: a parameter name is a letter followed by "
                                 "letters, digits or _")
        if name in out and out[name] != value:
            raise SelectionError(f"-p {name} is given twice")
        out[name] = value
    return out


def selection(where: Optional[str], params: Optional[List[str]],
              limit: Optional[int] = None, sample: Optional[int] = None,
              seed: int = 0) -> Selection:
    return Selection(where=where,
                     params=parse_params(params),
                     limit=limit, sample=sample, seed=seed)


def secret(value: Optional[str]) -> Optional[str]:
    """An option's value that is a secret (an API key): redacted from every later message."""
    register_secret(value)
    return value


def emit(data: Any, as_json: bool, text: Optional[str] = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))


def given(**options) -> dict:
    """The options the user gave (not None): the library fills in the defaults of the rest,
    so that each default lives in one place."""
    return {k: v for k, v in options.items() if v is not None}


def run_stage(ws: Workspace, stage: str, selection_: Selection | None = None, *,
              as_json: bool = False, engine: Optional[str] = None,
              address: Optional[str] = None, **options):
    """Run a stage through the library's one entry point and print its summary."""
    from ..runner import run
    summary = run(ws, stage, selection_, engine=engine, address=address, **given(**options))
    print_summary(summary, as_json)
    return summary


def print_summary(summary, as_json: bool) -> None:
    if as_json:
        emit(summary.to_json(), True)
    else:
        typer.echo(f"{summary.stage}: run {summary.run_id} {summary.state}: "
                   f"{summary.rows_done} done, {summary.rows_failed} failed "
                   f"of {summary.rows_in} rows")
        for note in getattr(summary, "extra", {}).get("notes", []):
            typer.echo(f"  {note}")
