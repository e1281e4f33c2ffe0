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
           fmt: Optional[c.ExportFormat] = typer.Option(
               None, "--format", "-f", help="hf (the default: parquet + dataset card, loads with "
                                           "datasets.load_dataset), jsonl (training jsonl), "
                                           "ip2p (InstructPix2Pix folders), wds (WebDataset "
                                           "tars)."),
           layout: Optional[c.ExportLayout] = typer.Option(
               None, "--layout", help="default: splits train (and validation); "
                                              "ultraedit: the published UltraEdit layout "
                                              "(FreeForm_0..N and RegionBase, hf only)."),
           shard_size: Optional[int] = c.Count(None, "--shard-size", min=1, max=10_000_000,
                                               help="Rows per parquet / jsonl / tar shard (and "
                                                    "per FreeForm_N split with --layout "
                                                    "ultraedit; default 2000)."),
           val_fraction: Optional[float] = c.Number(None, "--val-fraction", min=0.0, max=0.99,
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
           license: Optional[str] = typer.Option(None, "--license",
                                                 help="License id for the dataset card (e.g. "
                                                      "cc-by-4.0; default unknown)."),
           language: Optional[str] = typer.Option(None, "--language", metavar="CODE,CODE",
                                                  help="Language code(s) of the text, "
                                                       "comma-separated (default en)."),
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
    from ..runner import run
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    s = run(ws, "export", sel, **c.given(
        out=out, format=fmt, layout=layout, shard_size=shard_size,
        extra_columns=extra_columns or None, soft_masks=soft_masks or None,
        val_fraction=val_fraction, seed=seed, license=license, language=language,
        citation=citation.read_text(errors="replace").strip() if citation else None,
        overwrite=force or None, push_to_hub=push_to_hub, private=private or None,
        sessions=sessions or None)).result
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
