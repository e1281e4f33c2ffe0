"""Recipes: a pipeline as data. A recipe is a TOML file listing stages in order, each with its
options and selection; `ultracurate run RECIPE.toml` runs them one after the other through
`runner.run`, and a rerun resumes: the stages an unfinished earlier attempt of the same recipe
finished are skipped, and the stage it stopped in goes on from its pending rows.

    [recipe]
    name = "quick"

    [[steps]]
    stage = "ingest"
    paths = ["photos/demo_anchors.jsonl"]   # paths are relative to the workspace

    [[steps]]
    stage = "generate"
    candidates = 3
    size = 64
    select = { where = "mode = 'free'", limit = 100 }   # the step's selection
    engine = "local"                                       # also address, workers, device,
                                                           # batch_size, force

Every other key of a step is the stage's option (`ultracurate.stages.STAGES`, each stage's
constructor). The whole recipe is checked before anything runs: an unknown stage or option
is one line naming the file and the step. The recipe's run (stage `recipe`) records its path,
its digest and its steps; each stage's run names it in `parent_run`. Adaptive candidate
rounds (`stages.adaptive`) run their rounds through the same machinery (`run_steps`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UltracurateError
from .selection import Selection
from .workspace import Workspace

# A step's keys that are not its stage's options.
RUN_KEYS = ("engine", "address", "workers", "device", "batch_size", "force")
SELECT_KEYS = ("where", "params", "limit", "sample", "seed")


@dataclass
class Step:
    """One stage of a recipe: its options, its selection and how it runs."""

    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    select: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    selection: Selection | None = None   # given directly (adaptive rounds), else from select
    name: str | None = None              # the step's own name (default: its stage's)

    @property
    def label(self) -> str:
        return self.name or self.stage

    def to_json(self) -> dict:
        out = {"stage": self.stage, **({"name": self.name} if self.name else {}),
               **self.options}
        if self.select:
            out["select"] = self.select
        out.update(self.run)
        return out

    def resolved_selection(self) -> Selection:
        if self.selection is not None:
            return self.selection
        return Selection(**{k: v for k, v in self.select.items()})


@dataclass
class Recipe:
    name: str
    steps: list[Step]
    path: str | None = None

    @property
    def digest(self) -> str:
        """What identifies a recipe across reruns: its steps, not where the file is."""
        text = json.dumps([s.to_json() for s in self.steps], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"recipe": self.name, "path": self.path, "digest": self.digest,
                "steps": [s.to_json() for s in self.steps]}


def load_recipe(source: str | Path, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe from a TOML file (or a packaged one by name: quick, ultraedit), checked step
    by step. overrides: `OPTION=VALUE` for every step that takes the option, or
    `STAGE.OPTION=VALUE` for that stage's steps (VALUE is TOML: 3, "x", [1, 2])."""
    path = _find(source)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise UltracurateError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UltracurateError(f"{path}: not a valid TOML recipe ({e})") from None
    return parse_recipe(doc, str(path), overrides)


def _find(source: str | Path) -> Path:
    path = Path(source)
    if not path.suffix and not path.exists():   # a packaged recipe's name
        import importlib.resources
        packaged = importlib.resources.files("ultracurate").joinpath("recipes", f"{path}.toml")
        if packaged.is_file():
            return Path(str(packaged))
    if not path.is_file():
        raise UltracurateError(f"{path}: no such recipe (a .toml file, or one of "
                               f"{', '.join(packaged_recipes())})")
    return path


def packaged_recipes() -> list[str]:
    import importlib.resources
    folder = importlib.resources.files("ultracurate").joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def parse_recipe(doc: dict, where: str = "recipe",
                 overrides: list[str] | dict | None = None) -> Recipe:
    """A Recipe from its parsed TOML, every step checked (stage, options, selection)."""
    from .stages import STAGES, stage_class, stage_options
    unknown = sorted(set(doc) - {"recipe", "steps"})
    if unknown:
        raise UltracurateError(f"{where}: unknown section '{unknown[0]}' (a recipe has "
                               "[recipe] and [[steps]])")
    meta = doc.get("recipe", {})
    raw = doc.get("steps")
    if not isinstance(raw, list) or not raw:
        raise UltracurateError(f"{where}: no [[steps]] (each names a stage: "
                               f"{', '.join(STAGES)})")
    sets = _overrides(overrides, where)
    steps = []
    for i, item in enumerate(raw, 1):
        at = f"{where}: step {i}"
        if not isinstance(item, dict) or not isinstance(item.get("stage"), str):
            raise UltracurateError(f"{at}: no stage = \"NAME\" (one of {', '.join(STAGES)})")
        item = dict(item)
        name = item.pop("stage")
        if name not in STAGES:
            raise UltracurateError(f"{at}: unknown stage '{name}' (one of "
                                   f"{', '.join(STAGES)})")
        at = f"{where}: step {i} ({name})"
        label = item.pop("name", None)
        if label is not None and not isinstance(label, str):
            raise UltracurateError(f"{at}: name must be text")
        select = item.pop("select", {})
        if not isinstance(select, dict) or set(select) - set(SELECT_KEYS):
            bad = sorted(set(select) - set(SELECT_KEYS)) if isinstance(select, dict) else []
            raise UltracurateError(f"{at}: select takes {', '.join(SELECT_KEYS)}"
                                   + (f", not '{bad[0]}'" if bad else ""))
        try:
            Selection(**select)
        except (TypeError, UltracurateError) as e:
            raise UltracurateError(f"{at}: select: {e}") from None
        run = {k: item.pop(k) for k in RUN_KEYS if k in item}
        known = stage_options(name)
        for key, value in sets:
            stage, _, option = key.rpartition(".")
            if (stage == name or not stage) and option in known:
                item[option] = value
            elif stage == name:
                raise UltracurateError(f"{where}: --set {key}: {name} has no option "
                                       f"'{option}'")
        cls = stage_class(name)
        takes_more = any(p.kind == p.VAR_KEYWORD
                         for p in inspect.signature(cls).parameters.values())
        bad = sorted(set(item) - set(known))
        if bad and not takes_more:
            raise UltracurateError(f"{at}: unknown option '{bad[0]}' (it takes "
                                   f"{', '.join(known) or 'none'})")
        if not cls.path_options:  # built now, so that a bad option is refused up front
            try:
                cls(**item)
            except (UltracurateError, TypeError, ValueError) as e:
                raise UltracurateError(f"{at}: {e}") from None
        steps.append(Step(name, item, select, run, name=label))
    name = meta.get("name") or Path(where).stem
    return Recipe(str(name), steps, where if where != "recipe" else None)


def _overrides(overrides, where: str) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UltracurateError(f"--set expects OPTION=VALUE or STAGE.OPTION=VALUE, got "
                                   f"'{item}'")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word is text
        out.append((key.strip(), value))
    return out


# -- running ----------------------------------------------------------------------------------
@dataclass
class StepResult:
    index: int
    stage: str                 # the step's name (its stage's, unless it names itself)
    state: str                 # completed | skipped | failed | interrupted
    run_id: int | None = None
    rows_in: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    seconds: float = 0.0
    summary: Any = None        # the runner's RunSummary

    @property
    def rate(self) -> float | None:
        return self.rows_done / self.seconds if self.seconds and self.rows_done else None

    def to_json(self) -> dict:
        out = {"step": self.index, "stage": self.stage, "state": self.state,
               "run_id": self.run_id, "rows_in": self.rows_in, "rows_done": self.rows_done,
               "rows_failed": self.rows_failed, "seconds": self.seconds, "rate": self.rate}
        if self.summary is not None:
            out["summary"] = self.summary.to_json()
        return out


@dataclass
class RecipeResult:
    recipe: str
    run_id: int
    resumed_from: int | None
    steps: list[StepResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "run_id": self.run_id,
                "resumed_from": self.resumed_from, "steps": [s.to_json() for s in self.steps]}


def run_recipe(ws: Workspace, recipe: Recipe, *, progress: bool = True,
               restart: bool = False) -> RecipeResult:
    """Run the recipe's steps in order. A rerun after an unfinished attempt (killed,
    interrupted, failed) of the same recipe skips the steps it finished; restart runs them
    all again (each still skips the rows it finished)."""
    done, resumed = set(), None
    if not restart:
        done, resumed = _finished_steps(ws, recipe)
    return run_steps(ws, recipe.steps, recipe.name, recipe.to_json(), progress=progress,
                     done=done, resumed_from=resumed, path=recipe.path)


def _finished_steps(ws: Workspace, recipe: Recipe) -> tuple[set[int], int | None]:
    """The steps the last attempt of this recipe finished, when that attempt did not finish."""
    from .catalog import named_queries
    with ws.catalog(read_only=True) as cat:
        rows = cat.query(named_queries("runs")["last_recipe"], ["recipe", recipe.digest])
    if not rows or rows[0]["state"] == "completed":
        return set(), None
    # steps run in order and a skipped one was finished before: the finished steps are the
    # first rows_done
    return set(range(int(rows[0]["rows_done"] or 0))), rows[0]["run_id"]


def run_steps(ws: Workspace, steps: list[Step], name: str, params: dict, *,
              progress: bool = True, done: set[int] | None = None,
              resumed_from: int | None = None, kind: str = "recipe",
              path: str | None = None, echo: bool = True) -> RecipeResult:
    """Run steps in order under one parent run (stage `kind`): each step's run names it in
    parent_run; the parent's rows_done counts the steps finished, for a rerun to skip."""
    done = set(done or ())
    with ParentRun(ws, kind, params, len(steps), done_before=len(done)) as parent:
        result = RecipeResult(name, parent.run_id, resumed_from)
        for i, step in enumerate(steps):
            if i in done:
                result.steps.append(StepResult(i, step.label, "skipped"))
                _say(echo and progress, f"== {step.label}: skipped (finished by run "
                                        f"{resumed_from})")
                continue
            _say(echo and progress, f"== {step.label}")
            try:
                result.steps.append(parent.run_step(i, step, progress))
            except UltracurateError as e:
                if type(e) is not UltracurateError:  # interrupted, busy: as they are
                    raise
                raise UltracurateError(f"{kind} {name}: step {i + 1} ({step.label}): {e}") \
                    from None
    return result


class ParentRun:
    """The run of a job made of stage runs (a recipe, adaptive rounds): recorded first, named
    by every step's run (parent_run); rows_done counts the finished steps. Ends completed, or
    failed / interrupted with the step that stopped it."""

    def __init__(self, ws: Workspace, kind: str, params: dict, n_steps: int,
                 done_before: int = 0, parent_run: int | None = None,
                 selection: Selection | None = None):
        self.ws, self.kind, self.params = ws, kind, params
        self.n_steps, self.done = n_steps, done_before
        self.parent_run, self.selection = parent_run, selection or Selection()
        self.state, self.message = "completed", None

    def __enter__(self) -> "ParentRun":
        from .runner import _start
        with self.ws.catalog() as cat:
            with cat.transaction():
                self.run_id = _start(cat, _Named(self.kind, self.params), self.selection, {},
                                     "local", self.parent_run)
                cat.runs.update([{"run_id": self.run_id, "rows_in": self.n_steps,
                                  "rows_done": self.done}])
        return self

    def run_step(self, i: int, step: Step, progress: bool = True) -> StepResult:
        """Run one step (its run's parent is this run); a failure ends this run with it."""
        from .runner import Interrupted, run
        t0 = time.perf_counter()
        try:
            s = run(self.ws, step.stage, step.resolved_selection(), progress=progress,
                    parent_run=self.run_id, **step.run,
                    **_resolve_paths(self.ws, step.stage, step.options))
        except BaseException as e:
            self.state = "interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) \
                else "failed"
            self.message = f"step {i + 1} ({step.stage}): {e}"
            raise
        self.done += 1
        with self.ws.catalog() as cat:  # what a rerun skips, should this one stop
            cat.runs.update([{"run_id": self.run_id, "rows_done": self.done,
                              "rows_in": max(self.n_steps, self.done)}])
        return StepResult(i, step.label, "completed", s.run_id, s.rows_in, s.rows_done,
                          s.rows_failed, round(time.perf_counter() - t0, 3), s)

    def __exit__(self, kind, e, tb) -> None:
        from .runner import _OPEN_RUNS, _end
        if e is not None and self.state == "completed":
            self.state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.message = str(e)
        with self.ws.catalog() as cat:
            _end(cat, self.run_id, self.state, self.message, rows_done=self.done)
        _OPEN_RUNS.discard(self.run_id)


class _Named:
    """What the ledger records for a recipe's own run."""

    def __init__(self, name: str, params: dict):
        self.name, self.params = name, params


def _resolve_paths(ws: Workspace, stage: str, options: dict) -> dict:
    """A recipe's paths are relative to the workspace (the stage's `path_options`)."""
    from .stages import stage_class
    names = getattr(stage_class(stage), "path_options", ())
    out = dict(options)
    for k in names:
        v = out.get(k)
        if isinstance(v, str):
            out[k] = str(ws.root / v) if not Path(v).is_absolute() else v
        elif isinstance(v, list):
            out[k] = [str(ws.root / p) if not Path(p).is_absolute() else p for p in v]
    return out


def _say(on: bool, text: str) -> None:
    if on:
        print(text, file=sys.stderr, flush=True)


def format_steps(result: RecipeResult) -> str:
    """The per-stage table: rows, time and rate."""
    lines = [f"{'step':>4}  {'stage':<20} {'state':<11} {'rows':>9} {'failed':>7} "
             f"{'time':>9} {'rate':>12}"]
    for s in result.steps:
        rate = f"{s.rate:.1f} rows/s" if s.rate else ""
        rows = f"{s.rows_done}" if s.state != "skipped" else ""
        lines.append(f"{s.index + 1:>4}  {s.stage:<20} {s.state:<11} {rows:>9} "
                     f"{s.rows_failed if s.state != 'skipped' else '':>7} "
                     f"{s.seconds:>8.1f}s {rate:>12}")
    total = sum(s.seconds for s in result.steps)
    lines.append(f"recipe {result.recipe}: run {result.run_id}, {total:.1f} s"
                 + (f" (resumed run {result.resumed_from})" if result.resumed_from else ""))
    return "\n".join(lines)
