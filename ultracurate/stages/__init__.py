"""The stage registry: every job ultracurate runs, by the name `runs.stage` records, in the
order a row flows (a recipe lists them the same way). Each is a row stage or a set stage
(`ultracurate.runner`); `run(ws, name, selection, **options)` builds it from its options.

A new stage is one module and one line here. The modules are imported when a stage is first
asked for, so that the registry itself costs nothing to import.
"""

from __future__ import annotations

import importlib
import inspect

from ..errors import UltracurateError

STAGES: dict[str, str] = {
    "ingest": "ultracurate.stages.ingest:IngestStage",
    "import-ultraedit": "ultracurate.importers.ultraedit:UltraEditImportStage",
    "caption": "ultracurate.stages.caption:CaptionStage",
    "instruct": "ultracurate.stages.instruct:InstructStage",
    "import-instructions": "ultracurate.instruct.importers:ImportInstructionsStage",
    "ground": "ultracurate.stages.ground:GroundStage",
    "classify-masks": "ultracurate.stages.classify_masks:ClassifyMasksStage",
    "generate": "ultracurate.stages.generate:GenerateStage",
    "score": "ultracurate.stages.score:ScoreStage",
    "adaptive": "ultracurate.stages.adaptive:AdaptiveStage",
    "filter": "ultracurate.stages.filter:FilterStage",
    "judge": "ultracurate.stages.judge:JudgeStage",
    "chain": "ultracurate.stages.chain:ChainStage",
    "review-pull": "ultracurate.review:ReviewPullStage",
    "review": "ultracurate.review:ReviewStage",
    "embed-anchors": "ultracurate.stages.dedup:EmbedAnchorsStage",
    "dedup": "ultracurate.stages.dedup:DedupStage",
    "balance": "ultracurate.stages.balance:BalanceStage",
    "export": "ultracurate.export:ExportStage",
    "report": "ultracurate.report:ReportStage",
}


def stage_class(name: str) -> type:
    """The class registered under name."""
    if name not in STAGES:
        raise UltracurateError(f"unknown stage '{name}' (one of {', '.join(STAGES)})")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_options(name: str) -> dict[str, inspect.Parameter]:
    """The options a registered stage takes (its constructor's keyword parameters)."""
    return {k: p for k, p in inspect.signature(stage_class(name)).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def make_stage(stage, options: dict | None = None):
    """A stage from its registered name and options (an unknown option is one clear error),
    or the Stage given (then options must be empty)."""
    options = {k: v for k, v in (options or {}).items()}
    if not isinstance(stage, str):
        if options:
            raise UltracurateError(f"options {sorted(options)} given with a built stage "
                                   f"{stage.name}: give its name instead")
        return stage
    cls = stage_class(stage)
    known = stage_options(stage)
    unknown = sorted(set(options) - set(known))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in
                           inspect.signature(cls).parameters.values()):
        raise UltracurateError(f"{stage}: unknown option '{unknown[0]}' (it takes "
                               f"{', '.join(known) or 'none'})")
    return cls(**options)


def stages_over(table: str) -> list[str]:
    """Names of the registered stages that mark rows of table in stage_state."""
    from ..runner import RowStage
    out = []
    for name in STAGES:
        cls = stage_class(name)
        if issubclass(cls, RowStage) and cls.table == table and cls.key is None:
            out.append(name)
    return sorted(out)
