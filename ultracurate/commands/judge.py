"""`judge`: rate candidate pairs with a vision-language model (instruction, preservation,
quality 1-5 and a rationale)."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("judge")(judge)


def judge(
        backend: Optional[c.JudgeBackend] = typer.Option(
            None, "--backend", help="transformers (a local chat VLM) or openai (a vision chat "
                                    "endpoint). Default: from the workspace's judge role."),
        model: Optional[str] = typer.Option(None, "--model", help="Hub id or folder "
                                            "(transformers), or the served model's name "
                                            "(openai). Default: the judge role."),
        base_url: Optional[str] = typer.Option(None, "--base-url", help="Vision chat "
                                               "endpoint, e.g. http://localhost:8000/v1 "
                                               "(default: $ULTRACURATE_VLM_BASE_URL)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", callback=c.secret,
                                              help="API key (default: "
                                              "$ULTRACURATE_VLM_API_KEY or $OPENAI_API_KEY); "
                                              "never stored or printed."),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="Judge prompt: a packaged "
                                             "version (judge-v1) or a .txt file with "
                                             "$instruction."),
        grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain a local "
                                              "model's decoding to a word grammar: a packaged "
                                              "name (tiny-judge) or a .json file."),
        json_schema: Optional[bool] = typer.Option(None, "--json-schema/--no-json-schema",
                                         help="openai: ask for the answer's JSON schema "
                                              "through response_format (answers are validated "
                                              "either way; default on)."),
        max_attempts: Optional[int] = c.Count(None, "--max-attempts", min=1, max=100,
                                    help="Tries per pair when an answer is invalid (served "
                                         "models, or sampling; default 2)."),
        concurrency: Optional[int] = c.ConcurrencyOpt, timeout: Optional[float] = c.TimeoutOpt,
        max_retries: Optional[int] = c.MaxRetriesOpt,
        temperature: Optional[float] = c.Number(None, "--temperature", min=0, max=10,
                                      help="Sampling temperature (default 0: greedy)."),
        max_new_tokens: Optional[int] = c.Count(None, "--max-new-tokens", min=1, max=1_000_000,
                                      help="Longest answer, in tokens (default 128)."),
        image_size: Optional[int] = c.Count(None, "--image-size", min=8, max=16_384,
                                  help="openai: images are sent with their long side at most "
                                       "this many pixels (default 1024)."),
        dtype: Optional[c.DType] = typer.Option(None, "--dtype", help="transformers: float32, "
                                                "float16 or bfloat16."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print how many candidates and "
                                     "requests a run would take; judge nothing."),
        where: Optional[str] = typer.Option(
            None, "--where", help="SQL predicate over candidates_v (default: the rows CLIP "
                                  "already passed: the last filter run's score rules, before "
                                  "top-k)."),
        params: Optional[List[str]] = c.ParamOpt, limit: Optional[int] = c.LimitOpt,
        sample: Optional[int] = c.SampleOpt, seed: int = c.SeedOpt,
        force: bool = c.ForceOpt, engine: c.EngineName = c.EngineOpt,
        address: Optional[str] = c.AddressOpt, device: Optional[str] = c.DeviceOpt,
        workers: Optional[int] = c.WorkersOpt,
        gpus_per_worker: Optional[float] = c.GpusPerWorkerOpt,
        cpus_per_worker: Optional[float] = c.CpusPerWorkerOpt,
        batch_size: Optional[int] = c.BatchOpt,
        workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Rate candidate pairs with a vision-language judge: instruction, preservation and
    quality (1-5) and a short rationale, with the model and prompt version.
    Prints the expected request count first; invalid answers are asked again, then kept with
    their reason. Gate on the scores with `filter --judge-min instruction=4`."""
    from ..stages.judge import plan_judge
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    opts = c.given(backend=backend, model=model, base_url=base_url, api_key=api_key,
                   prompt=prompt, grammar=grammar, max_attempts=max_attempts,
                   concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   image_size=image_size, json_schema=json_schema, dtype=dtype)
    plan = plan_judge(ws, sel, force=force, **opts)
    if dry_run:
        c.emit(plan.to_json(), as_json, plan.text() + " (dry run: nothing judged)")
        return
    if not as_json:
        typer.echo(plan.text(), err=True)
    c.run_stage(ws, "judge", sel, as_json=as_json, engine=engine, address=address,
                seed=seed, device=device, force=force, batch_size=batch_size,
                workers=workers, gpus_per_worker=gpus_per_worker,
                cpus_per_worker=cpus_per_worker, **opts)
