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
        per_anchor: int = c.Count(1, "--per-anchor", "-n", min=1, max=10_000,
                                  help="Edits to write per anchor."),
        types: str = typer.Option("all", "--types", metavar="TYPE,TYPE",
                                  help="Comma-separated edit types to deal round-robin "
                                       "(add, change_global, change_local, change_color,"
                                  " transform_global, transform_local, replace, turn, others)."),
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
                                                 "(default: examples/exemplars.jsonl)."),
        n_instructions: int = c.Count(50, "--n-instructions", max=10_000,
                                      help="Instruction examples sampled into each prompt."),
        n_full: int = c.Count(10, "--n-full", max=10_000,
                              help="Full examples sampled into each prompt."),
        max_attempts: int = c.Count(3, "--max-attempts", min=1, max=100,
                                    help="Tries per edit before it is recorded as invalid."),
        mode: c.EditMode = typer.Option("auto", "--mode", help="auto (region when there is an "
                                        "edit object), free or region."),
        caption_source: Optional[str] = typer.Option(
            None, "--caption-source", metavar="SOURCE,SOURCE",
            help="Write from captions of these sources only, comma-separated: ingest, "
            "coco, caption:<model>, or a prefix with '*' "
            "(caption:*). Default: every source."),
        concurrency: int = c.Count(8, "--concurrency", min=1, max=1024,
                                   help="Concurrent HTTP requests."),
        timeout: float = c.Number(60.0, "--timeout", min=0.001, max=86_400,
                                  help="HTTP request timeout (s)."),
        max_retries: int = c.Count(4, "--max-retries", max=100,
                                   help="HTTP retries on timeouts, 429 and 5xx."),
        temperature: float = c.Number(0.7, "--temperature", min=0, max=10,
                                      help="LLM sampling temperature (0: greedy)."),
        max_new_tokens: int = c.Count(256, "--max-new-tokens", min=1, max=1_000_000,
                                      help="Longest LLM answer, in tokens."),
        dtype: Optional[c.DType] = typer.Option(None, "--dtype", help="transformers: float32, "
                                                "float16 or bfloat16."),
        where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
        limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
        seed: int = c.SeedOpt, force: bool = c.ForceOpt, engine: c.EngineName = c.EngineOpt,
        address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
        batch_size: Optional[int] = c.BatchOpt,
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Write candidate edits (instruction, target caption, edit object, type, mode) from the
    selected anchors' captions. Invalid answers are retried, then kept with edit_status
    'invalid' and their reasons; an anchor without a usable caption fails with the reason."""
    from ..runner import make_engine
    from ..stages.instruct import run_instruct
    ws = c.workspace(workspace)
    summary = run_instruct(
        ws, c.selection(where, params, limit, sample, seed), per_anchor=per_anchor,
        types=types, quota=quota, backend=backend, model=model, base_url=base_url,
        api_key=api_key, prompt=prompt, seed=seed, exemplars=exemplars,
        n_instruction_examples=n_instructions, n_full_examples=n_full,
        max_attempts=max_attempts, mode=mode, concurrency=concurrency, timeout=timeout,
        max_retries=max_retries, temperature=temperature, max_new_tokens=max_new_tokens,
        dtype=dtype, device=device, force=force, engine=make_engine(engine, address),
        batch_size=batch_size, caption_source=caption_source)
    c.print_summary(summary, as_json)


def import_instructions(
        path: Path = typer.Argument(..., help="The instruction file."),
        fmt: c.InstructionsFormat = typer.Option(..., "--format", "-f",
                                                 help="ultraedit, ip2p or magicbrush."),
        images: Optional[Path] = typer.Option(None, "--images", help="Folder the file's image "
                                              "paths are relative to (default: the file's)."),
        mode: c.EditMode = typer.Option("auto", "--mode", help="auto (region when the record "
                                        "has an edit object), free or region."),
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Import existing instructions as edits; their images become anchors when they exist."""
    from ..instruct.importers import import_instructions as run
    ws = c.workspace(workspace)
    out = run(ws, path, fmt, images_root=images, mode=mode)
    text = (f"import-instructions: run {out['run_id']}: {out['imported']} edits imported, "
            f"{out['skipped']} skipped of {out['records']} records; "
            f"{out['anchors_created']} anchors created")
    for reason, n in out["reasons"].items():
        text += f"\n  skipped {n}: {reason}"
    c.emit(out, as_json, text)
