"""Commands around the workspace and catalog: init, ingest, stats, sql, show, models."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UltracurateError
from . import _common as c


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("ingest")(ingest)
    app.command("stats")(stats)
    app.command("sql")(sql)
    app.command("show")(show)
    app.command("select")(select)
    app.command("gc")(gc)
    models_app = typer.Typer(help="Model checkpoints by role.", no_args_is_help=True)
    models_app.command("make-tiny")(make_tiny)
    models_app.command("list")(models_list)
    app.add_typer(models_app, name="models")


def init(directory: Path = typer.Argument(..., help="Folder to create the workspace in."),
         profile: c.Profile = typer.Option("ultraedit", help="Models profile: ultraedit (the "
                                           "real checkpoints) or tiny (random-weight test "
                                           "models)."),
         tiny_dir: Optional[str] = typer.Option(None, help="Where the tiny models are "
                                                "(default: DIR/models/tiny)."),
         as_json: bool = c.JsonOpt):
    """Create a workspace: catalog, LanceDB folder, media store and config."""
    from ..workspace import Workspace
    models = {"profile": profile}
    if tiny_dir:
        models["tiny_dir"] = str(Path(tiny_dir).resolve())
    ws = Workspace.init(directory, {"models": models})
    c.emit({"workspace": str(ws.root)}, as_json, f"created workspace {ws.root}")


def ingest(paths: List[Path] = typer.Argument(..., help="Image folders, COCO captions JSON, "
                                              "jsonl/csv/parquet tables, HF dataset folders."),
           captions: Optional[Path] = typer.Option(None, help="Captions table (path, caption) "
                                                   "for an image folder."),
           max_pixels: Optional[int] = c.Count(None, "--max-pixels", min=1,
                                               help="Reject images over this many pixels "
                                                    "(default 64,000,000)."),
           batch_size: Optional[int] = c.BatchOpt,
           force: bool = c.ForceOpt, workspace: Optional[str] = c.WorkspaceOpt,
           as_json: bool = c.JsonOpt):
    """Ingest real photos as anchors (content-hash dedup; bad files recorded with a reason).
    UltraEdit's published parquet layout is imported as anchors, edits and candidates."""
    from ..importers.ultraedit import is_ultraedit_layout
    ws = c.workspace(workspace)
    if paths and all(is_ultraedit_layout(p) for p in paths):  # published UltraEdit parquet
        c.run_stage(ws, "import-ultraedit", as_json=as_json, paths=paths, force=force,
                    batch_size=batch_size)
        return
    c.run_stage(ws, "ingest", as_json=as_json, paths=paths, captions=captions,
                max_pixels=max_pixels, force=force, batch_size=batch_size)


def stats(workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Counts by status, edit type, mode, mask class and reject reason."""
    from ..stats import catalog_stats, render_stats
    ws = c.workspace(workspace)
    with ws.catalog(read_only=True) as cat:
        data = catalog_stats(cat)
    if as_json:
        c.emit(data, True)
    else:
        render_stats(data)


def sql(query: str = typer.Argument(..., help="One read-only query: SELECT (FROM ..., "
                                             "DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one."),
        fmt: c.TableFormat = typer.Option("table", "--format", "-f", help="table, csv or json."),
        params: Optional[List[str]] = c.ParamOpt,
        allow_files: bool = typer.Option(False, "--allow-files",
                                         help="Let the query read files (read_csv, "
                                              "read_parquet, ...); it never writes them."),
        workspace: Optional[str] = c.WorkspaceOpt,
        as_json: bool = typer.Option(False, "--json", help="The rows as JSON (as -f json).")):
    """Run one read-only query on the catalog, with no file or network access (see
    --allow-files), no extensions and the time and memory bounds of every user statement.
    List and struct values are JSON in csv and table output."""
    from ..stats import write_rows
    ws = c.workspace(workspace)
    with ws.catalog(read_only=True, allow_files=allow_files) as cat:
        df = cat.read_query(query, c.parse_params(params))
    write_rows(df, "json" if as_json else fmt)


def select(table: c.ViewName = typer.Option("candidates", "--from", help="anchors, edits, "
                                            "candidates or sessions."),
           columns: Optional[str] = typer.Option(None, metavar="COLUMN,COLUMN",
                                                 help="Comma-separated columns "
                                                 "(default: the key and a few essentials)."),
           where: Optional[str] = c.WhereOpt, params: Optional[List[str]] = c.ParamOpt,
           limit: Optional[int] = c.LimitOpt, sample: Optional[int] = c.SampleOpt,
           seed: int = c.SeedOpt,
           fmt: c.TableFormat = typer.Option("table", "--format", "-f",
                                             help="table, csv or json."),
           count: bool = typer.Option(False, "--count", help="Print only how many rows match."),
           workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """List the rows a --where selection picks (what a job with the same options runs over).
    List and struct values are JSON in csv and table output."""
    from ..catalog import KEYS, VIEWS
    from ..selection import selected_keys_sql
    if table not in VIEWS:
        raise UltracurateError(f"--from must be one of {', '.join(VIEWS)}")
    defaults = {"anchors": "anchor_id, source_path, width, height",
                "edits": "edit_id, anchor_id, edit_type, mode, edit_status, instruction",
                "candidates": "candidate_id, edit_id, edit_type, status, clip_sim_dir",
                "sessions": "session_id, root_anchor_id, n_turns, session_state, "
                            "turn_candidates"}
    ws = c.workspace(workspace)
    sel = c.selection(where, params, limit, sample, seed)
    with ws.catalog(read_only=True) as cat:
        cols = columns or defaults[table]
        view_cols = set(cat.columns(VIEWS[table]))
        unknown = [x.strip() for x in cols.split(",") if x.strip() not in view_cols]
        if unknown:
            raise UltracurateError(f"--columns: unknown column '{unknown[0]}' of {VIEWS[table]}")
        sql, bound = selected_keys_sql(cat.con, VIEWS[table], KEYS[table], sel,
                                       columns="count(*) AS n" if count else cols)
        df = cat.pl(sql + ("" if count else f" ORDER BY {KEYS[table]}"), bound)
    if count:
        c.emit({"count": int(df["n"][0])}, as_json, str(int(df["n"][0])))
    else:
        from ..stats import write_rows
        write_rows(df, "json" if as_json else fmt)


def show(candidate_or_edit: str = typer.Argument(..., help="Candidate id, or e<ID> for an "
                                                  "edit, a<ID> for an anchor."),
         full: bool = typer.Option(False, "--full", help="Every field, every value whole "
                                   "(the mask's RLE too)."),
         workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Everything known about one candidate, edit or anchor: a readable summary (the mask as
    its class, area and bbox; the scores as a table), and the stages that touched it (done or
    failed, in which run, with the error); --full or --json for all of it."""
    from ..stats import format_row, show_row
    ws = c.workspace(workspace)
    with ws.catalog(read_only=True) as cat:
        data = show_row(cat, candidate_or_edit)
    c.emit(data, as_json, format_row(data, full=full))


def gc(dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; "
                                    "remove nothing."),
       workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Remove media files that no catalog row references (and partial files of killed jobs,
    and what killed exports left beside their output folders)."""
    from ..export import export_leftovers, remove_leftovers
    ws = c.workspace(workspace)
    # the catalog's write lock is held throughout, so no job writes media meanwhile
    with ws.catalog() as cat:
        names = ws.unreferenced_media(cat)
        freed = sum(ws.media.path(n).stat().st_size for n in names)
        partial = 0
        stale = export_leftovers(ws, cat)
        if not dry_run:
            for n in names:
                ws.media.path(n).unlink(missing_ok=True)
            partial = ws.media.clean_tmp()
            remove_leftovers(stale)
    verb = "would remove" if dry_run else "removed"
    c.emit({"files": names, "bytes": freed, "partial": partial,
            "export_leftovers": [str(p) for p in stale], "dry_run": dry_run}, as_json,
           f"{verb} {len(names)} unreferenced media files ({freed / 1e6:.1f} MB)"
           + (f" and {partial} partial files" if partial else "")
           + (f" and {len(stale)} leftovers of killed exports" if stale else ""))


def make_tiny(directory: Path = typer.Argument(..., help="Folder for the tiny checkpoints."),
              roles: Optional[str] = typer.Option(None, metavar="ROLE,ROLE",
                                                  help="Comma-separated roles "
                                                  "(default: all)."),
              as_json: bool = c.JsonOpt):
    """Build tiny random-weight models from configs and save them as real checkpoints."""
    from ..models import ROLES
    from ..models import make_tiny as build
    chosen = tuple(r.strip() for r in roles.split(",")) if roles else ROLES
    out = build(directory, chosen)
    c.emit(out, as_json, "\n".join(f"{k}: {v}" for k, v in out.items()))


def models_list(workspace: Optional[str] = c.WorkspaceOpt, as_json: bool = c.JsonOpt):
    """Which checkpoint each role uses in this workspace."""
    from ..models import ROLES, describe
    ws = c.workspace(workspace)
    data = describe(ws, ROLES)
    c.emit(data, as_json, "\n".join(f"{k:>10}: {v}" for k, v in data.items()))
