"""Visual review in the FiftyOne App, and the human decisions it produces.

One FiftyOne *grouped* dataset per workspace mirrors a selection of candidates: a group per
candidate with the slices

    anchor   the real photo the edit started from
    source   the source image of the pair (the regeneration, or the photo itself)
    edited   the edited image (default slice), with the region mask as a `Segmentation`
    mask     the region mask as an image (region edits only)

Every sample carries the candidate's catalog columns (scores, edit type, mode, instruction,
captions, status, reject reasons, mask class, run ids, human decision...) under their catalog
names, so a filter written in the App reads like a `--where`. Saved views open the failure
cases: rejected (and by reason), borderline (near a keep-rule threshold), each mask class,
each edit type, human-decided; `judge-disagrees-clip` (judged rows whose CLIP verdict and
judge verdict differ, `Thresholds.verdict_rules`) and `judge-invalid`; and `sessions`, the
multi-turn sessions' edited images grouped by session in turn order (a dynamic group per
session: the App shows a session's turns one after the other). CLIP embeddings already in LanceDB are attached and indexed for
FiftyOne Brain's similarity search and embeddings plot; nothing is recomputed.

Decisions flow back: tags set in the App (`accept`, `reject`, `bad_mask`, `bad_instruction`
or any other) are pulled into the catalog's `human_decision` / `human_tags` / `reviewer` /
`decided_at` in one transaction recorded as a `review-pull` run. `candidates_v.status` lets a
human decision override the automatic status, so it survives re-filtering.

Updates are incremental: each group stores a fingerprint of the catalog fields it shows, and a
rebuild touches only groups whose fingerprint changed (or that entered or left the selection).
Tags still in the App are pulled before anything is rewritten, so none is lost.

FiftyOne reads its database settings when first imported: `fiftyone_env()` applies the
workspace's `[review]` settings (database_uri, database_dir) to the environment first, unless
the user's own FIFTYONE_* variables already say otherwise.
"""

from __future__ import annotations

import datetime as _dt
import functools
import getpass
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .catalog import Catalog, now
from .errors import UltracurateError
from .masks import decode as decode_rle
from .runner import SetStage
from .selection import Selection, selected_keys_sql
from .workspace import Workspace

SLICES = ("anchor", "source", "edited", "mask")
DEFAULT_SLICE = "edited"
DECISION_TAGS = ("accept", "reject")
SUGGESTED_TAGS = ("accept", "reject", "bad_mask", "bad_instruction")
MASK_FIELD = "mask"                 # Segmentation on the source and edited slices
MASK_VALUE = 255                    # pixel value of the region in the mask PNGs
FINGERPRINT_FIELD = "review_fingerprint"
DEFAULT_MARGIN = 0.02               # borderline: within this of a keep-rule threshold
DEFAULT_PORT = 5151

# Catalog columns not copied onto samples: media names and the RLE become the slices and the
# Segmentation; the rest are bulky provenance better read with `ultracurate show`.
_NOT_FIELDS = {"anchor_media", "source_image", "edited_image", "mask_rle", "gen_params",
               "ground_boxes", "captions", "exemplar_ids", "anchor_path", "error"}
# FiftyOne's own sample fields: catalog columns of the same name are renamed.
_RESERVED = {"id", "filepath", "tags", "metadata", "group", "created_at", "last_modified_at",
             "media_type", MASK_FIELD, FINGERPRINT_FIELD}

# -- FiftyOne's database ---------------------------------------------------------------------
def fiftyone_env(ws: Workspace | None = None, environ: dict | None = None) -> dict:
    """Set FiftyOne's environment before it is imported (in environ, default os.environ): no
    usage tracking, and the workspace's `[review] database_uri` / `database_dir` unless
    FIFTYONE_* already set them. A user's own MongoDB (FIFTYONE_DATABASE_URI) skips
    FiftyOne's version check. Returns environ."""
    env = os.environ if environ is None else environ
    env.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    cfg = ws.section("review") if ws is not None else {}
    if cfg.get("database_uri") and "FIFTYONE_DATABASE_URI" not in env:
        env["FIFTYONE_DATABASE_URI"] = str(cfg["database_uri"])
    if cfg.get("database_dir") and "FIFTYONE_DATABASE_DIR" not in env:
        env["FIFTYONE_DATABASE_DIR"] = str(Path(cfg["database_dir"]).expanduser())
    if env.get("FIFTYONE_DATABASE_URI"):
        env.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    return env


DB_START_TIMEOUT = 180.0  # seconds to wait for FiftyOne's database, other starters included


def _fo(ws: Workspace | None = None):
    fiftyone_env(ws)
    try:
        import fiftyone as fo
    except Exception as e:  # a broken database package fails at import or first use
        raise UltracurateError(f"FiftyOne is not usable: {str(e).splitlines()[0]} "
                               "(run `ultracurate doctor`)") from None
    connect_database(fo)
    return fo


_connected = False


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def connect_database(fo, timeout: float = DB_START_TIMEOUT) -> None:
    """Connect to FiftyOne's database, starting it if needed. Two processes that start it at
    once each launch a mongod on the same folder and one fails (ServiceListenTimeout), so the
    start is serialised by a lock file in the database folder: the second process waits and
    then joins the first one's database. Only a database of this process's own folder is
    joined (`_folder_service_class`). A start that still fails is retried until timeout, then
    ends in one UltracurateError line."""
    global _connected
    if _connected:
        return
    import time

    import fiftyone.core.odm.database as fod
    import fiftyone.core.service as fos
    from pymongo.errors import ConnectionFailure
    deadline = time.monotonic() + timeout
    lock = None
    own = not fo.config.database_uri and not os.environ.get("FIFTYONE_DISABLE_SERVICES")
    if own:  # FiftyOne starts its own mongod in database_dir
        try:
            import fcntl
            folder = Path(fo.config.database_dir)
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / ".ultracurate-start.lock", "a")
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UltracurateError(
                            f"FiftyOne's database in {folder} did not start within "
                            f"{timeout:g} s (another process is starting it); try again"
                        ) from None
                    time.sleep(0.2)
        except (ImportError, OSError):  # no flock here: rely on the retries alone
            lock = None
    try:
        while True:
            try:
                if own and fod._db_service is None:
                    # a port inherited from a FiftyOne-using parent may serve another folder
                    os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
                    fod._db_service = _folder_service_class()()
                    os.environ["FIFTYONE_PRIVATE_DATABASE_PORT"] = str(fod._db_service.port)
                fod.ensure_connection()
                _connected = True
                return
            except (fos.ServiceException, ConnectionError, ConnectionFailure) as e:
                if time.monotonic() > deadline:
                    raise UltracurateError(
                        f"FiftyOne's database did not start within {timeout:g} s: "
                        f"{type(e).__name__}: {_first_line(e)} (run `ultracurate doctor`)"
                    ) from None
                # forget the failed start so that the next try looks for a running one again
                fod._db_service = None
                fod._client = None
                os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
                time.sleep(1.0)
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def _served_folder(process) -> str | None:
    """The folder (resolved) of the mongod that a FiftyOne database service runs: the service's
    command line ends with mongod's. None if it cannot be read."""
    try:
        args = process.cmdline()
    except Exception:  # psutil.Error: it ended, or is not ours to read
        return None
    for flag, value in zip(args, args[1:]):
        if flag == "--dbpath":
            return os.path.realpath(value)
    return None


@functools.cache
def _folder_service_class():
    """FiftyOne's DatabaseService, joining only a running service whose mongod serves this
    process's database folder. FiftyOne's own joins the first database service it finds on
    the machine, whatever its folder (MultiClientService.start searches processes by name):
    a process then kept its data in another's folder, and lost its database when that
    process ended and its folder was removed (mongod aborts without its files)."""
    import fiftyone.core.config as focn
    import fiftyone.core.service as fos
    import fiftyone.service.util as fosu

    class FolderDatabaseService(fos.DatabaseService):
        def start(self):
            folder = os.path.realpath(focn.load_config().database_dir)
            for process in fosu.find_processes_by_args(self._service_args):
                if _served_folder(process) != folder:
                    continue
                try:
                    reply = fosu.send_ipc_message(process, ("register", os.getpid()))
                except OSError:  # not listening yet, or gone
                    continue
                if reply is True:  # an exiting service answers with an exception
                    self.attached, self.child = True, process
                    return
            fos.Service.start(self)  # a new service (skips MultiClientService's search)

    return FolderDatabaseService


_HEALTH_SCRIPT = r"""
import json, sys
out = {}
try:
    import fiftyone as fo
    import fiftyone.core.odm.database as fod
    from ultracurate.review import connect_database
    # a user's MongoDB is asked once; our own may be starting in another process meanwhile
    connect_database(fo, 0 if fo.config.database_uri else 60)
    out["fiftyone_version"] = fo.__version__
    out["database_uri"] = fo.config.database_uri
    out["database_dir"] = fo.config.database_dir
    conn = fod.get_db_conn()
    out["mongodb_version"] = conn.client.server_info()["version"]
    out["datasets"] = len(fo.list_datasets())
    out["ok"] = True
except BaseException as e:
    out["ok"] = False
    out["error"] = (type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0])[:300]
sys.stdout.write("\n@@HEALTH@@" + json.dumps(out))
"""


def fiftyone_health(ws: Workspace | None = None, timeout: float = 120.0) -> dict:
    """Whether FiftyOne's database starts and answers, checked in a child process (a database
    that cannot start makes FiftyOne hang or exit): {'ok', 'fiftyone_version',
    'mongodb_version', 'database_uri', 'database_dir', 'datasets'} or {'ok': False, 'error'}."""
    env = fiftyone_env(ws, dict(os.environ))
    try:
        proc = subprocess.run([sys.executable, "-c", _HEALTH_SCRIPT], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"FiftyOne's database did not answer in {timeout:.0f} s"}
    marker = proc.stdout.rfind("@@HEALTH@@")
    if marker < 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"FiftyOne check exited {proc.returncode}: {tail[:300]}"}
    return json.loads(proc.stdout[marker + len("@@HEALTH@@"):])


# -- names, thresholds -----------------------------------------------------------------------
def dataset_name(ws: Workspace) -> str:
    """The workspace's FiftyOne dataset: `[review] dataset` in its config, else a name made
    from the folder's name and a hash of its absolute path (two workspaces never share one)."""
    cfg = ws.section("review")
    if cfg.get("dataset"):
        return str(cfg["dataset"])
    digest = hashlib.sha1(str(ws.root).encode()).hexdigest()[:8]
    return f"ultracurate-{ws.root.name}-{digest}"


def keep_rule(cat: Catalog | None = None):
    """The keep rule: the last completed filter run's thresholds when the catalog has one,
    else the defaults (ultracurate.thresholds)."""
    from .thresholds import Thresholds
    t = None
    if cat is not None:
        from .stages.filter import latest_thresholds
        t = latest_thresholds(cat)
    return t or Thresholds.preset("ultraedit")


def keep_thresholds(cat: Catalog | None = None) -> dict[str, dict[str, float]]:
    """{score column: {mode: threshold}} of the keep rule (`keep_rule`)."""
    from .names import MODES
    t = keep_rule(cat)
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        if mode in t.modes:
            for rule in t.rules(mode):
                out.setdefault(rule.column, {})[mode] = rule.value
    return out


def _slug(text: str) -> str:
    s = "".join(ch.lower() if ch.isalnum() else "-" for ch in str(text))
    s = "-".join(p for p in s.split("-") if p)
    return s or "none"


# -- masks -----------------------------------------------------------------------------------
def mask_png(ws: Workspace, rle: str, height: int, width: int) -> Path:
    """The mask as a PNG (region = 255) under WORKSPACE/review/masks/, named by a hash of the
    RLE and its size: written once, reused by every rebuild and every candidate of the edit."""
    import numpy as np
    from PIL import Image
    key = hashlib.sha256(f"{int(height)}x{int(width)}:{rle}".encode()).hexdigest()
    path = ws.root / "review" / "masks" / key[:2] / f"{key}.png"
    if path.exists():
        return path
    try:
        m = np.asarray(decode_rle(rle, int(height), int(width))).astype(bool)
    except Exception as e:
        raise UltracurateError(f"mask RLE does not decode ({height}x{width}): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                               ) from None
    buf = io.BytesIO()
    Image.fromarray(np.where(m, MASK_VALUE, 0).astype(np.uint8), mode="L").save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


# -- reading the catalog ---------------------------------------------------------------------
def _field_names(columns: Iterable[str]) -> dict[str, str]:
    """catalog column -> sample field name, for the columns copied onto samples."""
    out = {}
    for c in columns:
        if c in _NOT_FIELDS:
            continue
        out[c] = f"candidate_{c}" if c in _RESERVED else c
    return out


def _fo_field(duck_type: str):
    """(FiftyOne field class, kwargs) for a DuckDB column type."""
    import fiftyone.core.fields as fof
    t = duck_type.upper()
    if t.endswith("[]"):
        sub, _ = _fo_field(t[:-2])
        return fof.ListField, {"subfield": sub}
    if t in ("DOUBLE", "FLOAT", "REAL") or t.startswith("DECIMAL"):
        return fof.FloatField, {}
    if "INT" in t:
        return fof.IntField, {}
    if t == "BOOLEAN":
        return fof.BooleanField, {}
    if t.startswith("TIMESTAMP") or t == "DATE":
        return fof.DateTimeField, {}
    return fof.StringField, {}


def _declare_fields(ds, types: dict[str, str], fields: dict[str, str], fo) -> None:
    """Declare every copied column's field with its type up front, so that a column that is
    NULL on every row so far still exists (and takes values on a later update), and samples
    are added without FiftyOne inferring a schema per sample."""
    import fiftyone.core.fields as fof
    for s in SLICES:
        if s not in (ds.group_slices or []):
            ds.add_group_slice(s, "image")
    if ds.default_group_slice != DEFAULT_SLICE:
        ds.default_group_slice = DEFAULT_SLICE
    have = ds.get_field_schema()
    wanted = {}
    for col, name in fields.items():
        if name not in have:
            ftype, kw = _fo_field(types[col])
            wanted[name] = (ftype, kw)
    if FINGERPRINT_FIELD not in have:
        wanted[FINGERPRINT_FIELD] = (fof.StringField, {})
    if MASK_FIELD not in have:
        wanted[MASK_FIELD] = (fof.EmbeddedDocumentField, {"document_type": fo.Segmentation})
    if not wanted:
        return
    merge = getattr(ds, "_merge_sample_field_schema", None)
    if merge is not None:  # one schema update instead of a database round trip per field
        schema = {}
        for name, (ftype, kw) in wanted.items():
            if ftype is fof.EmbeddedDocumentField:
                schema[name] = ftype(kw["document_type"], null=True)
            else:
                schema[name] = ftype(null=True, **kw)
        merge(schema)
        return
    for name, (ftype, kw) in wanted.items():
        if ftype is fof.EmbeddedDocumentField:
            ds.add_sample_field(name, ftype, embedded_doc_type=kw["document_type"])
        else:
            ds.add_sample_field(name, ftype, **kw)


def _plain(v: Any) -> Any:
    """A value FiftyOne stores as is (lists of str, floats, ints, datetimes, str)."""
    if v is None or isinstance(v, (bool, int, float, str, _dt.datetime)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, _dt.date):
        return _dt.datetime(v.year, v.month, v.day)
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _fingerprint(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


def _catalog_tags(row: dict) -> list[str]:
    """The tags a candidate's group shows: its human tags and its decision."""
    tags = set(row.get("human_tags") or [])
    if row.get("human_decision") in DECISION_TAGS:
        tags.add(row["human_decision"])
    return sorted(tags)


def selected_candidates(cat: Catalog, selection: Selection | None) -> list[dict]:
    """Rows of candidates_v the selection picks that have an edited image to look at."""
    selection = selection or Selection()
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection,
                                    "edited_image IS NOT NULL")
    return cat.query(sql + " ORDER BY candidate_id", params or None)


# -- the dataset -----------------------------------------------------------------------------
@dataclass
class ReviewSummary:
    """What a build did. `views` are the saved views' names; `embeddings` the attached fields."""

    dataset: str
    selected: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    pulled: int = 0
    views: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    run_id: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def open_review_dataset(ws: Workspace, name: str | None = None, create: bool = False):
    """The workspace's FiftyOne dataset (None when it does not exist and not create)."""
    fo = _fo(ws)
    name = name or dataset_name(ws)
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    if not create:
        return None
    ds = fo.Dataset(name)
    ds.persistent = True
    ds.add_group_field("group", default=DEFAULT_SLICE)
    ds.info = {"ultracurate_workspace": str(ws.root)}
    ds.mask_targets = {MASK_FIELD: {MASK_VALUE: "edit region"}}
    ds.tags = ["ultracurate"]
    ds.save()
    return ds


def _slice_paths(ws: Workspace, row: dict) -> dict[str, str]:
    media = {"anchor": row.get("anchor_media"), "source": row.get("source_image"),
             "edited": row.get("edited_image")}
    # FiftyOne opens files: media in a bucket is fetched once into the workspace's cache
    out = {s: str(ws.media.local_path(n, ws.root / "cache" / "media"))
           for s, n in media.items() if n}
    if row.get("mask_rle") and row.get("mask_height") and row.get("mask_width"):
        try:
            out["mask"] = str(mask_png(ws, row["mask_rle"], row["mask_height"],
                                       row["mask_width"]))
        except UltracurateError as e:
            raise UltracurateError(f"candidate {row['candidate_id']}: {e}") from None
    return out


def _fill(sample, row: dict, fields: dict[str, str], fp: str, paths: dict[str, str],
          slice_name: str, fo) -> None:
    for col, name in fields.items():
        sample[name] = _plain(row.get(col))
    sample[FINGERPRINT_FIELD] = fp
    if slice_name in ("source", "edited"):
        sample[MASK_FIELD] = (fo.Segmentation(mask_path=paths["mask"]) if "mask" in paths
                              else None)


def build_review_dataset(ws: Workspace, selection: Selection | None = None, *,
                         name: str | None = None, reviewer: str | None = None,
                         prune: bool = True, embeddings: bool = True,
                         visualize: bool = True, margin: float = DEFAULT_MARGIN,
                         progress: bool = True) -> ReviewSummary:
    """`run(ws, "review", selection, ...)`: create or update the workspace's grouped FiftyOne
    dataset from the selected candidates; its ReviewSummary (see ReviewStage)."""
    from .runner import run
    return run(ws, "review", selection, dataset=name, reviewer=reviewer, prune=prune,
               embeddings=embeddings, visualize=visualize, margin=margin,
               progress=progress).result


class ReviewStage(SetStage):
    """Create or update the workspace's grouped FiftyOne dataset from the selected candidates
    (those with an edited image). Only groups whose catalog fields changed are rewritten;
    groups that left the selection are removed when prune. Tags set in the App are pulled into
    the catalog first (a review-pull run, as `reviewer`), so a rewrite never loses them.
    Attaches CLIP embeddings from LanceDB when present (Brain similarity, and a PCA
    embeddings plot when visualize) and re-saves the failure-case views. The dataset is
    written with no catalog connection held (other jobs can write meanwhile); the run records
    the counts."""

    name = "review"
    table = "candidates"
    has_produce = True

    def __init__(self, dataset: str | None = None, reviewer: str | None = None,
                 prune: bool = True, embeddings: bool = True, visualize: bool = True,
                 margin: float = DEFAULT_MARGIN):
        self.dataset, self.reviewer, self.prune = dataset, reviewer, prune
        self.embeddings, self.visualize, self.margin = embeddings, visualize, margin
        super().__init__(dataset=dataset, margin=margin, prune=prune)

    def requires(self) -> list:
        return [ReviewPullStage(self.dataset, self.reviewer, missing_ok=True)]

    def check(self, r, selection) -> None:
        """A bad --where or media name fails before anything changes."""
        self.params["dataset"] = self.dataset = self.dataset or dataset_name(r.workspace)
        sql, params = r.selected(selection, "candidates", where="edited_image IS NOT NULL")
        r.workspace.check_media_names(r.cat, sql, params, "candidate_id",
                                      ("anchor_media", "source_image", "edited_image"))

    def plan(self, r, selection):
        rows = selected_candidates(r.cat, selection)
        types = {row["column_name"]: row["column_type"]
                 for row in r.query("DESCRIBE candidates_v")}
        return rows, types, keep_thresholds(r.cat), keep_rule(r.cat)

    def produce(self, plan, ctx):
        rows, types, thresholds, rule = plan
        ws = ctx.workspace
        summary = ReviewSummary(dataset=self.dataset)
        summary.pulled = sum(b.result.changed for b in self.before
                             if b.result is not None and b.run_id is not None)
        fo = _fo(ws)
        ds = open_review_dataset(ws, self.dataset, create=True)
        fields = _field_names(types)
        _declare_fields(ds, types, fields, fo)
        summary.selected = len(rows)

        existing = _existing_groups(ds)
        wanted = {r["candidate_id"] for r in rows}
        changed = []
        bar = _bar(ctx.show_progress, len(rows), "review")
        with bar:
            task = bar.add_task("review", total=len(rows))
            new_samples, pending = [], 0
            for row in rows:
                cid = row["candidate_id"]
                fp = _fingerprint(row)
                if cid in existing and existing[cid][1] == fp:
                    summary.unchanged += 1
                    bar.advance(task)
                elif cid in existing:
                    changed.append((row, fp))
                else:
                    new_samples += _new_group(ws, row, fields, fp, fo)
                    summary.added += 1
                    pending += 1
                    if pending >= _ADD_CHUNK:
                        ds.add_samples(new_samples, expand_schema=False, progress=False)
                        bar.advance(task, pending)
                        new_samples, pending = [], 0
            if new_samples:  # every field is declared: no per-sample schema inference
                ds.add_samples(new_samples, expand_schema=False, progress=False)
            bar.advance(task, pending)
            summary.updated = _update_groups(ds, changed, existing, fields, ws, fo)
            bar.advance(task, len(changed))

        gone = [existing[c][0] for c in existing if c not in wanted]
        if self.prune and gone:
            ds.delete_groups(gone)
            summary.removed = len(gone)

        summary.views = save_review_views(ds, margin=self.margin, thresholds=thresholds,
                                          rule=rule)
        dirty = summary.added or summary.updated or summary.removed
        if self.embeddings:
            summary.embeddings = attach_embeddings(ws, ds, recompute=bool(dirty),
                                                   visualize=self.visualize)
        return summary

    def apply(self, w, plan, summary: ReviewSummary) -> ReviewSummary:
        w.run.rows_in = summary.selected
        w.run.rows_done = summary.added + summary.updated
        w.run.message = json.dumps({k: v for k, v in summary.to_json().items()
                                    if k in ("added", "updated", "unchanged", "removed",
                                             "pulled")})
        summary.run_id = w.run_id
        return summary


_ADD_CHUNK = 500  # groups per add_samples call (and progress step)


def _new_group(ws: Workspace, row: dict, fields: dict, fp: str, fo) -> list:
    paths = _slice_paths(ws, row)
    group = fo.Group()
    out = []
    for s in SLICES:
        if s not in paths:
            continue
        sample = fo.Sample(filepath=paths[s], group=group.element(s))
        _fill(sample, row, fields, fp, paths, s, fo)
        if s == DEFAULT_SLICE:
            sample.tags = _catalog_tags(row)
        out.append(sample)
    return out


def _bar(progress: bool, total: int, name: str):
    from .progress import bar as _progress
    bar = _progress(total, name)
    if not progress:
        bar.disable = True
    return bar


def _existing_groups(ds) -> dict[int, tuple[str, str]]:
    """candidate_id -> (group id, fingerprint), read from the default slice."""
    if not len(ds) or not ds.has_field("candidate_id"):
        return {}
    view = ds.select_group_slices(DEFAULT_SLICE)
    cids, gids, fps = view.values(["candidate_id", "group.id", FINGERPRINT_FIELD])
    return {int(c): (g, f) for c, g, f in zip(cids, gids, fps) if c is not None}


def _update_groups(ds, changed: list[tuple[dict, str]], existing: dict, fields: dict,
                   ws: Workspace, fo) -> int:
    """Rewrite the fields (and media, slices, tags) of changed groups in place: sample ids
    stay, so the App's selection and Brain results keep pointing at them."""
    if not changed:
        return 0
    from fiftyone import ViewField as F
    by_gid = {existing[row["candidate_id"]][0]: (row, fp) for row, fp in changed}
    view = ds.select_group_slices(_allow_mixed=True).match(
        F("group._id").is_in([_oid(g) for g in by_gid]))
    present: dict[str, set[str]] = {g: set() for g in by_gid}
    stale = []
    paths_of = {g: _slice_paths(ws, row) for g, (row, _) in by_gid.items()}
    for sample in view.iter_samples(autosave=True, progress=False):
        gid = sample.group.id
        row, fp = by_gid[gid]
        paths = paths_of[gid]
        s = sample.group.name
        if s not in paths:
            stale.append(sample.id)
            continue
        present[gid].add(s)
        if sample.filepath != paths[s]:
            sample.filepath = paths[s]
        _fill(sample, row, fields, fp, paths, s, fo)
        if s == DEFAULT_SLICE:
            sample.tags = _catalog_tags(row)
        else:
            sample.tags = []
    extra = []
    for gid, (row, fp) in by_gid.items():
        paths = paths_of[gid]
        for s in SLICES:
            if s in paths and s not in present[gid]:
                sample = fo.Sample(filepath=paths[s], group=fo.Group(id=gid).element(s))
                _fill(sample, row, fields, fp, paths, s, fo)
                if s == DEFAULT_SLICE:
                    sample.tags = _catalog_tags(row)
                extra.append(sample)
    if stale:
        ds.delete_samples(stale)
    if extra:
        ds.add_samples(extra, expand_schema=False, progress=False)
    return len(by_gid)


def _oid(s: str):
    from bson import ObjectId
    return ObjectId(s)


# -- saved views -----------------------------------------------------------------------------
def review_views(ds, margin: float = DEFAULT_MARGIN,
                 thresholds: dict[str, dict[str, float]] | None = None,
                 rule=None) -> dict[str, Any]:
    """The failure-case views, by name: rejected, rejected-<reason>, borderline,
    borderline-<score>, mask-<class>, type-<edit_type>, human-decided (and human-accept /
    human-reject), judge-disagrees-clip and judge-invalid (when rows were judged), sessions
    (when there are multi-turn sessions), over whatever values the dataset holds now.
    Borderline uses thresholds ({score: {mode: value}}, as `keep_thresholds` gives), the
    verdicts rule (a Thresholds, as `keep_rule` gives); both default to the keep rule's
    defaults."""
    from fiftyone import ViewField as F
    views: dict[str, Any] = {}
    if not len(ds) or not ds.has_field("candidate_id"):
        return views
    edited = ds.select_group_slices(DEFAULT_SLICE)

    def distinct(f):
        return edited.distinct(f) if ds.has_field(f) else []

    views["rejected"] = ds.match(F("status") == "rejected")
    def put(name, view):  # two values with one slug ('a b', 'a-b') keep a view each
        unique, k = name, 2
        while unique in views:
            unique, k = f"{name}-{k}", k + 1
        views[unique] = view

    for reason in sorted(distinct("reject_reasons")):
        put(f"rejected-{_slug(reason)}", ds.match(F("reject_reasons").contains(reason)))
    near = []
    for score, th in (thresholds or keep_thresholds()).items():
        if not ds.has_field(score):
            continue
        if len(set(th.values())) == 1:  # the same in every mode
            cond = (F(score) - next(iter(th.values()))).abs() <= margin
        else:
            cond = None
            for mode, t in th.items():
                c = (F("mode") == mode) & ((F(score) - t).abs() <= margin)
                cond = c if cond is None else cond | c
        cond = (F(score) != None) & cond  # noqa: E711 (a MongoDB null test)
        near.append(cond)
        views[f"borderline-{_slug(score)}"] = ds.match(cond)
    if near:
        cond = near[0]
        for c in near[1:]:
            cond = cond | c
        views["borderline"] = ds.match(cond)
    for cls in sorted(distinct("mask_class")):
        put(f"mask-{_slug(cls)}", ds.match(F("mask_class") == cls))
    for t in sorted(distinct("edit_type")):
        put(f"type-{_slug(t)}", ds.match(F("edit_type") == t))
    views["human-decided"] = ds.match((F("human_decision") != None)  # noqa: E711
                                      | (F("human_tags").length() > 0))
    views["human-accept"] = ds.match(F("human_decision") == "accept")
    views["human-reject"] = ds.match(F("human_decision") == "reject")
    from .thresholds import JUDGE_COLUMNS
    if ds.has_field(JUDGE_COLUMNS[0]) and distinct("judge_run"):
        clip, judge = _verdicts(rule or keep_rule())
        judged = F(JUDGE_COLUMNS[0]) != None  # noqa: E711
        for c in JUDGE_COLUMNS[1:]:
            judged = judged & (F(c) != None)  # noqa: E711
        views["judge-disagrees-clip"] = ds.match(judged & ((clip & ~judge) | (~clip & judge)))
        views["judge-invalid"] = ds.match(F("judge_invalid_reason") != None)  # noqa: E711
    if ds.has_field("session_id") and distinct("session_id"):
        views["sessions"] = edited.match(F("session_id") != None).group_by(  # noqa: E711
            "session_id", order_by="turn")
    return views


def _verdicts(rule):
    """(CLIP verdict, judge verdict) of a Thresholds as FiftyOne expressions: the same rules
    as the catalog's `stages.filter.verdict_sql` (a missing score fails)."""
    from fiftyone import ViewField as F

    from .thresholds import MODES

    def passes(mode, rules):
        cond = F("mode") == mode
        for r in rules:
            ok = F(r.column) >= r.value if r.op == ">=" else F(r.column) <= r.value
            cond = cond & (F(r.column) != None) & ok  # noqa: E711
        return cond
    out = []
    for which in (0, 1):
        cond = None
        for m in MODES:
            c = passes(m, rule.verdict_rules(m)[which])
            cond = c if cond is None else cond | c
        out.append(cond)
    return out[0], out[1]


def save_review_views(ds, margin: float = DEFAULT_MARGIN,
                      thresholds: dict[str, dict[str, float]] | None = None,
                      rule=None) -> list[str]:
    """(Re)save the failure-case views; drop saved views of values no longer present."""
    views = review_views(ds, margin=margin, thresholds=thresholds, rule=rule)
    # Saving a view costs a few database round trips: re-save only those whose definition
    # changed (their digests are kept in the dataset's info).
    digests = {name: _view_digest(view) for name, view in views.items()}
    known = dict((ds.info or {}).get("ultracurate_views", {}))
    saved = set(ds.list_saved_views())
    for old in saved:
        if old not in views:
            ds.delete_saved_view(old)
    for name, view in views.items():
        if name not in saved or known.get(name) != digests[name]:
            ds.save_view(name, view, overwrite=True)
    if known != digests:
        ds.info = {**(ds.info or {}), "ultracurate_views": digests}
        ds.save()
    return list(views)


def _view_digest(view) -> str:
    stages = [{k: v for k, v in st.items() if k != "_uuid"} for st in view._serialize()]
    return hashlib.sha1(json.dumps(stages, sort_keys=True, default=str).encode()).hexdigest()


# -- embeddings ------------------------------------------------------------------------------
def read_lance_embeddings(ws: Workspace) -> dict[str, dict[int, Any]]:
    """CLIP image embeddings already in the workspace's LanceDB (ultracurate.embeddings'
    `clip_image` table), as {slice: {id: vector}}: candidate ids for the source and edited
    slices, anchor ids for the anchor slice. Empty when none were computed."""
    if not ws.lance_path.exists() or not any(ws.lance_path.iterdir()):
        return {}
    from .embeddings import EmbeddingStore
    store = EmbeddingStore(ws.lance_path)
    out: dict[str, dict[int, Any]] = {}
    for s, row_table in (("source", "candidates"), ("edited", "candidates"),
                         ("anchor", "anchors")):
        ids, vecs, _ = store.get("clip_image", row_table, side=s)
        if len(ids):
            out[s] = {int(i): v for i, v in zip(ids, vecs)}
    return out


def attach_embeddings(ws: Workspace, ds, recompute: bool = True,
                      visualize: bool = False) -> list[str]:
    """Copy LanceDB's CLIP embeddings onto the slices (`clip_embedding`) and
    index them for Brain similarity (brain key `clip_sim_<slice>`; with visualize also a PCA
    plot `clip_viz_<slice>`). Nothing is recomputed from images. Returns the slices attached;
    [] and no change when LanceDB has none."""
    vecs = read_lance_embeddings(ws)
    done = []
    for s, by_cid in sorted(vecs.items()):
        if s not in ds.group_slices or not by_cid:
            continue
        view = ds.select_group_slices(s)
        ids, keys = view.values(["id", "anchor_id" if s == "anchor" else "candidate_id"])
        values = {i: by_cid[k] for i, k in zip(ids, keys) if k in by_cid}
        if not values:
            continue
        key = f"clip_sim_{s}"
        if not recompute and key in ds.list_brain_runs():
            done.append(s)
            continue
        view.set_values("clip_embedding", values, key_field="id")
        with_emb = view.select(list(values))
        import fiftyone.brain as fob
        for k in (key, f"clip_viz_{s}"):
            if k in ds.list_brain_runs():
                ds.delete_brain_run(k)
        fob.compute_similarity(with_emb, embeddings="clip_embedding", brain_key=key,
                               backend="sklearn", metric="cosine", progress=False)
        if visualize and len(values) >= 2:
            fob.compute_visualization(with_emb, embeddings="clip_embedding",
                                      brain_key=f"clip_viz_{s}", method="pca",
                                      progress=False)
        done.append(s)
    return done


# -- decisions back into the catalog ---------------------------------------------------------
@dataclass
class PullSummary:
    dataset: str
    groups: int = 0
    changed: int = 0
    accepted: int = 0
    rejected: int = 0
    cleared: int = 0
    conflicts: list[int] = field(default_factory=list)  # both accept and reject: left as was
    run_id: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def default_reviewer() -> str:
    return os.environ.get("ULTRACURATE_REVIEWER") or getpass.getuser()


def group_tags(ds) -> dict[int, list[str]]:
    """candidate_id -> the union of its group's sample tags, over every slice."""
    if not len(ds) or not ds.has_field("candidate_id"):
        return {}
    out: dict[int, set[str]] = {}
    view = ds.select_group_slices(_allow_mixed=True)
    for cid, tags in zip(*view.values(["candidate_id", "tags"])):
        if cid is not None:
            out.setdefault(int(cid), set()).update(tags or [])
    return {c: sorted(t) for c, t in out.items()}


def pull_decisions(ws: Workspace, name: str | None = None, reviewer: str | None = None
                   ) -> PullSummary:
    """`run(ws, "review-pull", ...)`: the App's tags into the catalog (see ReviewPullStage)."""
    from .runner import run
    return run(ws, "review-pull", dataset=name, reviewer=reviewer).result


class ReviewPullStage(SetStage):
    """Write the App's tags into the catalog as human decisions: `accept` / `reject` set
    human_decision, every tag goes into human_tags, with reviewer and decided_at; removing all
    tags clears the decision. Only candidates whose tags differ from the catalog change, in one
    transaction recorded as a `review-pull` run (none when nothing changed). A group tagged both
    accept and reject is left as it was and listed in `conflicts`."""

    name = "review-pull"
    table = None
    writes = {"candidates": {"human_decision", "human_tags", "reviewer", "decided_at"}}
    record_empty = False

    def __init__(self, dataset: str | None = None, reviewer: str | None = None,
                 missing_ok: bool = False):
        """missing_ok: no dataset (or an empty one) is nothing to pull, not an error."""
        self.dataset, self.reviewer, self.missing_ok = dataset, reviewer, missing_ok
        super().__init__(dataset=dataset, reviewer=reviewer)

    def plan(self, r, selection):
        name = self.dataset or dataset_name(r.workspace)
        reviewer = self.reviewer or default_reviewer()
        self.params.update(dataset=name, reviewer=reviewer)
        summary = PullSummary(dataset=name)
        ds = open_review_dataset(r.workspace, name)
        if ds is None or (self.missing_ok and not len(ds)):
            if self.missing_ok:
                return summary, []
            raise UltracurateError(f"no review dataset '{name}' yet: build it with "
                                   "`ultracurate review --no-launch`")
        tags = group_tags(ds)
        summary.groups = len(tags)
        current = {}
        if tags:
            import pyarrow as pa
            ids = pa.table({"cid": pa.array(list(tags), pa.int64())})
            with r.registered(ids, "_uc_ids"):
                for row in r.query("SELECT candidate_id, human_decision, human_tags FROM "
                                   "candidates JOIN _uc_ids ON candidate_id = cid"):
                    current[row["candidate_id"]] = row
        updates = []
        when = now()
        for cid, t in sorted(tags.items()):
            row = current.get(cid)
            if row is None or t == _catalog_tags(row):
                continue
            if "accept" in t and "reject" in t:
                summary.conflicts.append(cid)
                continue
            decision = "accept" if "accept" in t else "reject" if "reject" in t else None
            updates.append({"candidate_id": cid, "human_decision": decision,
                            "human_tags": t or None, "reviewer": reviewer,
                            "decided_at": when})
            summary.accepted += decision == "accept"
            summary.rejected += decision == "reject"
            summary.cleared += not t
        summary.changed = len(updates)
        # FiftyOne's side only: the tags move to the default slice, the decisions are the same
        _normalise_tags(ds, tags)
        return summary, updates

    def empty(self, plan) -> bool:
        return not plan[1]

    def preview(self, plan) -> PullSummary:
        return plan[0]

    def apply(self, w, plan, produced) -> PullSummary:
        summary, updates = plan
        w.candidates.update(updates)
        w.run.rows_in, w.run.rows_done = summary.groups, summary.changed
        w.run.message = json.dumps({"accepted": summary.accepted, "rejected": summary.rejected,
                                    "cleared": summary.cleared,
                                    "conflicts": summary.conflicts})
        summary.run_id = w.run_id
        return summary


def _normalise_tags(ds, tags: dict[int, list[str]]) -> None:
    """Keep a group's tags on its default slice only, so that removing a tag there removes it
    (a tag left on another slice would otherwise come back on the next pull)."""
    from fiftyone import ViewField as F
    others = ds.select_group_slices(_allow_mixed=True).match(
        (F("group.name") != DEFAULT_SLICE) & (F("tags").length() > 0))
    if not len(others):
        return
    moved = {int(c) for c in others.values("candidate_id") if c is not None}
    edited = ds.select_group_slices(DEFAULT_SLICE).match(F("candidate_id").is_in(list(moved)))
    ids, cids = edited.values(["id", "candidate_id"])
    edited.set_values("tags", {i: tags.get(int(c), []) for i, c in zip(ids, cids)},
                      key_field="id")
    others.set_values("tags", [[] for _ in range(len(others))])


# -- the App ---------------------------------------------------------------------------------
def launch_review(ws: Workspace, name: str | None = None, *, port: int = DEFAULT_PORT,
                  address: str = "127.0.0.1"):
    """Serve the App for the workspace's dataset on address:port (loopback by default) and
    return the FiftyOne session; its URL is `review_url(address, port)`."""
    fo = _fo(ws)
    ds = open_review_dataset(ws, name)
    if ds is None:
        raise UltracurateError(f"no review dataset '{name or dataset_name(ws)}' yet: build it "
                               "with `ultracurate review --no-launch`")
    return fo.launch_app(ds, remote=True, address=address, port=port, auto=False)


def review_url(address: str, port: int) -> str:
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    return f"http://{host}:{port}/"
