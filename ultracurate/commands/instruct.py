"""`instruct` (write candidate edits from anchors' captions) and `import-instructions`
(UltraEdit / InstructPix2Pix / MagicBrush instruction files)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("instruct")(instruct)
    app.command("import-instructions")(import_instructions)


def instruct(
        per_anchor: Optional[int] = c.Count(None, "--per-anchor", "-n", min=1, max=10_000,
                                            help="Edits to write per anchor (default 1)."),
        types: Optional[str] = typer.Option(None, "--types", metavar="TYPE,TYPE",
                                            help="Comma-separated edit types to deal "
                                                 "round-robin (default all: add, "
                                                 "change_global, change_local, change_color, "
                                                 "transform_global, transform_local, replace, "
                                                 "turn, others)."),
        quota: Optional[str] = typer.Option(None, "--quota", metavar="TYPE=N,TYPE=N",
                                            help="Total edits per type for this job, e.g. "
                                                 "add=30,replace=50 (spread evenly "
                                            "over the anchors; overrides --types)."),
        backend: Optional[c.LLMBackend] = typer.Option(None, "--backend", help="rule (offline), openai "
                                              "(chat-completions server) or transformers "
                                              "(local model). Default: the workspace's llm "
                                              "role when set, else rule."),
        model: Optional[str] = typer.Option(None, "--model", help="Model name (openai) or hub "
                                            "id / folder (transformers)."),
        base_url: Optional[str] = typer.Option(None, "--base-url", envvar=[
            "ULTRACURATE_LLM_BASE_URL", "OPENAI_BASE_URL"], show_envvar=False,
            help="Chat-completions base URL, e.g. http://localhost:8000/v1 "
                 "(default: $ULTRACURATE_LLM_BASE_URL or $OPENAI_BASE_URL)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", callback=c.secret,
                                              help="API key (default: "
                                              "$ULTRACURATE_LLM_API_KEY or $OPENAI_API_KEY); "
                                              "never stored or printed."),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template: a "
                                             "packaged version (instruct-v1) or a .txt file."),
        exemplars: Optional[Path] = typer.Option(None, "--exemplars", help="Exemplar jsonl "
                                                 "(default: the packaged "
                                                 "ultracurate/data/exemplars.jsonl)."),
        n_instructions: Optional[int] = c.Count(None, "--n-instructions", max=10_000,
                                                help="Instruction examples sampled into each "
                                                     "prompt (default 50)."),
        n_full: Optional[int] = c.Count(None, "--n-full", max=10_000,
                                        help="Full examples sampled into each prompt "
                                             "(default 10)."),
        max_attempts: Optional[int] = c.Count(None, "--max-attempts", min=1, max=100,
                                              help="Tries per edit before it is recorded as "
                                                   "invalid (default 3)."),
        mode: Optional[c.EditMode] = typer.Option(None, "--mode", help="auto (the default: "
                                                  "region when there is an edit object), "
                                                  "free or region."),
        caption_source: Optional[str] = typer.Option(
            None, "--caption-source", metavar="SOURCE,SOURCE",
            help="Write from captions of these sources only, comma-separated: ingest, "
            "coco, caption:<model>, or a prefix with '*' "
            "(caption:*). Default: every source."),
        concurrency: Optional[int] = c.ConcurrencyOpt, timeout: Optional[float] = c.TimeoutOpt,
        max_retries: Optional[int] = c.MaxRetriesOpt,
        temperature: Optional[float] = c.Number(None, "--temperature", min=0, max=10,
                                                help="LLM sampling temperature (0: greedy; "
                                                     "default 0.7)."),
        max_new_tokens: Optional[int] = c.Count(None, "--max-new-tokens", min=1,
                                                max=1_000_000,
                                                help="Longest LLM answer, in tokens "
                                                     "(default 256)."),
        dtype: Optional[c.DType] = typer.Option(None, "--dtype", help="transformers: float32, "
                                                "float16 or bfloat16."),
        where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
        limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
        seed: int = c.SeedOpt, force: bool = c.ForceOpt,
        engine: Optional[c.EngineName] = c.EngineOpt,
        address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
        workers: Optional[int] = c.WorkersOpt,
        gpus_per_worker: Optional[float] = c.GpusPerWorkerOpt,
        cpus_per_worker: Optional[float] = c.CpusPerWorkerOpt,
        batch_size: Optional[int] = c.BatchOpt,
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Write candidate edits (instruction, target caption, edit object, type, mode) from the
    selected anchors' captions. Invalid answers are retried, then kept with edit_status
    'invalid' and their reasons; an anchor without a usable caption fails with the reason."""
    ws = c.workspace(workspace)
    c.run_stage(
        ws, "instruct", c.selection(where, params, limit, sample, seed), as_json=as_json,
        engine=engine, address=address, device=device, batch_size=batch_size, force=force,
        per_anchor=per_anchor, types=types, quota=quota, backend=backend, model=model,
        base_url=base_url, api_key=api_key, prompt=prompt, seed=seed, exemplars=exemplars,
        n_instruction_examples=n_instructions, n_full_examples=n_full,
        max_attempts=max_attempts, mode=mode, concurrency=concurrency, timeout=timeout,
        max_retries=max_retries, temperature=temperature, max_new_tokens=max_new_tokens,
        dtype=dtype, caption_source=caption_source, workers=workers,
        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)


def import_instructions(
        path: Path = typer.Argument(..., help="The instruction file."),
        fmt: c.InstructionsFormat = typer.Option(..., "--format", "-f",
                                                 help="ultraedit, ip2p or magicbrush."),
        images: Optional[Path] = typer.Option(None, "--images", help="Folder the file's image "
                                              "paths are relative to (default: the file's)."),
        mode: Optional[c.EditMode] = typer.Option(None, "--mode", help="auto (the default: "
                                                  "region when the record has an edit "
                                                  "object), free or region."),
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Import existing instructions as edits; their images become anchors when they exist."""
    from ..runner import run
    ws = c.workspace(workspace)
    out = run(ws, "import-instructions", **c.given(path=path, format=fmt, images=images,
                                                   mode=mode)).result
    text = (f"import-instructions: run {out['run_id']}: {out['imported']} edits imported, "
            f"{out['skipped']} skipped of {out['records']} records; "
            f"{out['anchors_created']} anchors created")
    for reason, n in out["reasons"].items():
        text += f"\n  skipped {n}: {reason}"
    c.emit(out, as_json, text)
