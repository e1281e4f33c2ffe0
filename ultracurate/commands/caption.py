"""`caption`: write captions for anchors that have none, with a captioning model."""

from __future__ import annotations

from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)


def caption(
        backend: Optional[c.CaptionBackend] = typer.Option(None, "--backend", help="transformers (a local "
                                              "image-text-to-text model) or openai (a vision "
                                              "chat endpoint). Default: from the workspace's "
                                              "captioner role."),
        model: Optional[str] = typer.Option(None, "--model", help="Hub id or folder "
                                            "(transformers), or the served model's name "
                                            "(openai). Default: the captioner role."),
        base_url: Optional[str] = typer.Option(None, "--base-url", help="Vision chat "
                                               "endpoint, e.g. http://localhost:8000/v1 "
                                               "(default: $ULTRACURATE_VLM_BASE_URL)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", callback=c.secret,
                                              help="API key (default: "
                                              "$ULTRACURATE_VLM_API_KEY or $OPENAI_API_KEY); "
                                              "never stored or printed."),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption prompt for chat "
                                             "models: a packaged version (caption-v1) or a "
                                             ".txt file."),
        prefix: Optional[str] = typer.Option(None, "--prefix", help="Text a captioner without "
                                             "a chat template continues (BLIP: 'a photo of'; "
                                             "Florence-2: '<MORE_DETAILED_CAPTION>')."),
        grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain a local "
                                              "model's decoding to a word grammar: a packaged "
                                              "name (tiny-caption) or a .json file."),
        all_anchors: bool = typer.Option(False, "--all", help="Caption every selected anchor, "
                                         "not only those without a usable caption."),
        max_attempts: Optional[int] = c.Count(None, "--max-attempts", min=1, max=100,
                                              help="Tries per photo when an answer is invalid "
                                                   "(served models, or sampling; default 2)."),
        concurrency: Optional[int] = c.ConcurrencyOpt, timeout: Optional[float] = c.TimeoutOpt,
        max_retries: Optional[int] = c.MaxRetriesOpt,
        temperature: Optional[float] = c.Number(None, "--temperature", min=0, max=10,
                                                help="Sampling temperature (0: greedy, the "
                                                     "default)."),
        max_new_tokens: Optional[int] = c.Count(None, "--max-new-tokens", min=1,
                                                max=1_000_000,
                                                help="Longest caption, in tokens (default "
                                                     "60)."),
        image_size: Optional[int] = c.Count(None, "--image-size", min=8, max=16_384,
                                            help="openai: photos are sent with their long "
                                                 "side at most this many pixels (default "
                                                 "1024)."),
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
    """Write captions (source caption:<model>) for the selected anchors that have no usable
    caption. Invalid answers are kept with their reasons; an anchor left without a caption
    fails with the reason and is retried by a rerun. --force replaces this captioner's
    earlier captions of the anchors it redoes."""
    ws = c.workspace(workspace)
    c.run_stage(
        ws, "caption", c.selection(where, params, limit, sample, seed), as_json=as_json,
        engine=engine, address=address, device=device, batch_size=batch_size, force=force,
        backend=backend, model=model, base_url=base_url, api_key=api_key, prompt=prompt,
        prefix=prefix, grammar=grammar, all_anchors=all_anchors or None,
        max_attempts=max_attempts, seed=seed, concurrency=concurrency, timeout=timeout,
        max_retries=max_retries, max_new_tokens=max_new_tokens, temperature=temperature,
        image_size=image_size, dtype=dtype, workers=workers,
        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
