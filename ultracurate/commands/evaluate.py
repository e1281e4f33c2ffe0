"""`ultracurate eval`: benchmark metrics (MagicBrush, Emu Edit) of a model's edited images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def eval_cmd(benchmark: c.Benchmark = typer.Option(..., "--benchmark", "-b",
                                                   help="magicbrush or emuedit."),
             predictions: Path = typer.Option(..., "--predictions",
                                              help="Folder of the model's edited images. "
                                                   "MagicBrush: <id>/<id>_1.png, "
                                                   "<id>_inde_<i>.png, <id>_iter_<i>.png; Emu "
                                                   "Edit: <idx>.png."),
             references: Path = typer.Option(..., "--references",
                                             help="MagicBrush: folder of <id>/output<i>.png; "
                                                  "Emu Edit: the test set (saved dataset, hub "
                                                  "snapshot folder, or parquet/jsonl table)."),
             captions: Optional[Path] = typer.Option(None, "--captions",
                                                     help="MagicBrush global_descriptions.json "
                                                          "(needed for CLIP-T)."),
             split: str = typer.Option("test", "--split", help="Emu Edit split."),
             clip: str = typer.Option("ViT-B-32:openai", "--clip",
                                      help="CLIP checkpoint (open_clip name:tag or folder)."),
             dino: str = typer.Option("facebook/dino-vits16", "--dino",
                                      help="DINO checkpoint (hub id or folder)."),
             metrics: Optional[str] = typer.Option(None, "--metrics", metavar="METRIC,METRIC",
                                                   help="Comma-separated subset of metrics."),
             out: Optional[Path] = typer.Option(None, "--out", "-o",
                                                help="Write the results (with per-sample "
                                                     "scores) as JSON here (default: "
                                                     "PREDICTIONS/eval_<benchmark>.json)."),
             device: Optional[str] = c.DeviceOpt,
             batch_size: int = c.Count(32, "--batch-size", min=1, max=c.MAX_BATCH,
                                       help="Images per model call."),
             as_json: bool = c.JsonOpt):
    """Score edited images with a benchmark's reference metrics; print a table, write JSON."""
    from ..evaluate import evaluate, render_table
    from ..runner import default_device
    chosen = [m.strip() for m in metrics.split(",")] if metrics else None
    result = evaluate(benchmark, predictions, references, captions=captions, clip=clip,
                      dino=dino, metrics=chosen, split=split, device=device or default_device(),
                      batch_size=batch_size, progress=True)
    out = out or Path(predictions) / f"eval_{benchmark}.json"
    out.write_text(json.dumps(result.to_json(), indent=2))
    if as_json:
        c.emit({**result.to_json(per_sample=False), "written": str(out)}, True)
    else:
        render_table(result)
        typer.echo(f"written {out}")
