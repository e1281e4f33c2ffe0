"""`ultracurate export`: write selected candidates as a dataset (hf, jsonl, ip2p, wds)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from . import _common as c


class Format(str, Enum):
    hf = "hf"
    jsonl = "jsonl"
    ip2p = "ip2p"
    wds = "wds"


class Layout(str, Enum):
    default = "default"
    ultraedit = "ultraedit"


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(out: Path = typer.Argument(..., help="Folder to write (must not exist unless "
                                      "--force)."),
           fmt: Format = typer.Option(Format.hf, "--format", "-f",
                                      help="hf (parquet + dataset card, loads with "
                                           "datasets.load_dataset), jsonl (training jsonl), "
                                           "ip2p (InstructPix2Pix folders), wds (WebDataset "
                                           "tars)."),
           layout: Layout = typer.Option(Layout.default, "--layout",
                                         help="default: splits train (and validation); "
                                              "ultraedit: the published UltraEdit layout "
                                              "(FreeForm_0..N and RegionBase, hf only)."),
           shard_size: int = typer.Option(2000, "--shard-size", min=1, max=10_000_000,
                                          help="Rows per parquet / jsonl / tar shard (and per "
                                               "FreeForm_N split with --layout ultraedit)."),
           val_fraction: float = c.Number(0.0, "--val-fraction", min=0.0, max=0.99,
                                              help="Cut a validation split of about this "
                                                   "fraction of the rows, by anchor (no "
                                                   "anchor in both splits); seeded by --seed."),
           soft_masks: bool = typer.Option(False, "--soft-masks",
                                           help="Also export the soft mask generation blended "
                                                "with (soft_mask_image)."),
           extra_columns: bool = typer.Option(False, "--extra-columns",
                                              help="Add catalog columns (edit_type, mask_class, "
                                                   "seed, candidate_id, session_id, turn, the "
                                                   "judge's scores, ...)."),
           sessions: bool = typer.Option(False, "--sessions",
                                         help="Also write the rows' multi-turn sessions "
                                              "(chain) in MagicBrush's layout under "
                                              "OUT/sessions/ (what `eval --benchmark "
                                              "magicbrush` reads as references)."),
           license: str = typer.Option("unknown", "--license",
                                       help="License id for the dataset card (e.g. "
                                            "cc-by-4.0)."),
           language: str = typer.Option("en", "--language", metavar="CODE,CODE",
                                        help="Language code(s) of the text, comma-separated."),
           citation: Optional[Path] = typer.Option(None, "--citation", exists=True,
                                                   dir_okay=False,
                                                   help="BibTeX file for the card (default: "
                                                        "UltraEdit's paper)."),
           push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO",
                                                     help="Upload the hf export to this dataset "
                                                          "repo (token from $HF_TOKEN)."),
           private: bool = typer.Option(False, "--private",
                                        help="Create the hub repo as private."),
           where: Optional[str] = typer.Option(
               None, "--where", help="SQL predicate over candidates_v (default: the "
                                     "balanced, de-duplicated set: accepted, not a duplicate, "
                                     "not from a duplicate anchor, selected by balance if it "
                                     "ran)."),
           params: Optional[List[str]] = c.ParamOpt, limit: Optional[int] = c.LimitOpt,
           sample: Optional[int] = c.SampleOpt, seed: int = c.SeedOpt,
           force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier "
                                      "export of ultracurate (only once the new one is "
                                      "complete)."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Export selected candidates as a training dataset (all-or-nothing)."""
    from ..export import export_dataset
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    s = export_dataset(ws, sel, out, fmt.value, layout=layout.value, shard_size=shard_size,
                       extra_columns=extra_columns, soft_masks=soft_masks,
                       val_fraction=val_fraction, seed=seed, license=license,
                       language=language,
                       citation=citation.read_text(errors="replace").strip() if citation else None,
                       overwrite=force, push_to_hub=push_to_hub, private=private,
                       sessions=sessions, progress=True)
    for w in s.warnings:
        typer.echo(f"warning: {w}", err=True)
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items())
    text = (f"exported {s.rows} rows ({splits}) as {s.format} to {s.out}: {s.files} files, "
            f"{s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s (run {s.run_id})")
    if sessions:
        n = sum(s.sessions.values())
        text += (f"; {n} sessions in MagicBrush's layout ("
                 + ", ".join(f"{v} of {k} turn{'s' if k != 1 else ''}"
                             for k, v in s.sessions.items()) + ")" if n else
                 "; no sessions in the selection")
    if s.pushed_to:
        text += f"; pushed to {s.pushed_to}"
    c.emit(s.to_json(), as_json, text)
