"""`ultracurate export`: write selected candidates as a dataset (hf, jsonl, ip2p, wds)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(out: Path = typer.Argument(..., help="Folder to write (must not exist unless "
                                      "--force)."),
           fmt: c.ExportFormat = typer.Option("hf", "--format", "-f",
                                   help="hf (parquet + dataset card, loads with "
                                        "datasets.load_dataset), jsonl (training jsonl), ip2p "
                                        "(InstructPix2Pix folders), wds (WebDataset tars)."),
           shard_size: int = c.Count(2000, "--shard-size", min=1, max=c.MAX_BATCH,
                                     help="Rows per parquet / tar shard."),
           extra_columns: bool = typer.Option(False, "--extra-columns",
                                              help="Add catalog columns (edit_type, mask_class, "
                                                   "seed, candidate_id, ...)."),
           push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO",
                                                     help="Upload the hf export to this dataset "
                                                          "repo (token from $HF_TOKEN)."),
           private: bool = typer.Option(False, "--private",
                                        help="Create the hub repo as private."),
           where: Optional[str] = typer.Option(
               None, "--where", help="SQL predicate over candidates_v (default: "
                                     "status = 'accepted' AND selected IS NOT FALSE AND "
                                     "duplicate_of IS NULL)."),
           params: Optional[List[str]] = c.ParamOpt, limit: Optional[int] = c.LimitOpt,
           sample: Optional[int] = c.SampleOpt, seed: int = c.SeedOpt,
           force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only "
                                                              "once the new export is complete)."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Export selected candidates as a training dataset (all-or-nothing)."""
    from ..export import export_dataset
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    s = export_dataset(ws, sel, out, fmt, shard_size=shard_size, extra_columns=extra_columns,
                       overwrite=force, push_to_hub=push_to_hub, private=private,
                       progress=not as_json)
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items())
    text = (f"exported {s.rows} rows ({splits}) as {s.format} to {s.out}: {s.files} files, "
            f"{s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s")
    if s.pushed_to:
        text += f"; pushed to {s.pushed_to}"
    c.emit(s.to_json(), as_json, text)
