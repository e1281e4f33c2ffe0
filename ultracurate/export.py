"""Export selected candidates as a dataset a trainer can load.

One vocabulary in every format: UltraEdit's published column names (`idx`, `source_caption`,
`target_caption`, `edit_prompt`, `source_image`, `edited_image`, `edit_object`, `mask_image`,
the six scores), then `soft_mask_image` (`soft_masks=True`), then the catalog's extra columns
(`extra_columns=True`). Splits are `train`, and `validation` when asked (cut by anchor).

Formats (docs/export.md has the table of every column in each):
  hf     parquet shards with `datasets` features and a dataset card; `datasets.load_dataset(OUT)`
         gives `train` (and `validation`); configs `free_form` and `region_based` hold one mode
         each. layout="ultraedit" writes the published layout instead: the free-form dataset
         (`FreeForm_0..N`, one per shard of rows) and the region subset (`RegionBase`) as two
         datasets.
  jsonl  `<split>-NNNNN-of-NNNNN.jsonl` (image columns are paths) beside `images/` and `masks/`.
  ip2p   InstructPix2Pix's layout: `seeds.json`, one folder per edit with `prompt.json` and
         `<idx>_0.jpg` / `<idx>_1.jpg` per candidate (one such tree per split).
  wds    WebDataset tars `<split>-NNNNN-of-NNNNN.tar`: `<key>.source_image.<ext>`,
         `<key>.edited_image.<ext>`, `<key>.mask_image.png`, `<key>.json`.

Sessions (`sessions=True`, any format): beside the flat rows, `OUT/sessions/` holds the
multi-turn sessions (`chain`) whose turns the selection holds, in MagicBrush's layout:
`images/<id>/<id>-input.png`, `<id>-output<i>.png`, `<id>-mask<i>.png`, `edit_sessions.json`
({id: [{input, mask, output, instruction}, ...]}) and `global_descriptions.json` ({id: {file:
caption}}), which `ultracurate eval --benchmark magicbrush` reads as references. A session is
cut at its first turn the selection lacks (a turn's input is the previous turn's output).

Geometry: an exported mask has exactly its pair's geometry. Generation centre-crops the anchor
to its size (recorded in gen_params) and so does the mask it blends with (`masks.crop_mask`);
the export applies the same (`masks.pair_mask`), and, with soft_masks, rebuilds the soft mask
from the settings generation recorded (`masks.recorded_soft_mask`). Image bytes are copied from
the media store as they are (no decode, no re-encode) wherever the geometry already matches,
which is always for generated pairs; ip2p's `.jpg` files and masks as PNG are the exceptions.

Safety: an export is written into a hidden `.OUT.partial-*` folder beside OUT and renamed into
place at the end, so a failure (a missing media file, a full disk, Ctrl-C) leaves nothing
behind. A finished export carries a marker file (`.ultracurate-export`); `overwrite` replaces
only a folder that has it, never a workspace, an ancestor of one, or the current directory or
its ancestors. Leftovers of killed exports are removed by the next export beside them and by
`gc`. Every export is a run in the catalog's `runs` table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .catalog import Catalog
from .errors import UltracurateError
from .names import EXPORT_FORMATS, EXPORT_LAYOUTS, PUBLISHED_SCORES
from .runner import SetStage
from .selection import Selection, selected_keys_sql
from .stages.balance import POOL_WHERE
from .workspace import CONFIG_NAME, Workspace

# Accepted (a human decision overrides the filter), not a duplicate, kept by balance if it ran.
DEFAULT_WHERE = f"{POOL_WHERE} AND selected IS NOT FALSE"
DEFAULT_SHARD_SIZE = 2000   # the published UltraEdit chunks hold 2,000 rows
ROW_GROUP_SIZE = 100        # rows per parquet row group: small enough to stream images
LOAD_THREADS = 4            # media reads ahead of the writer
MARKER = ".ultracurate-export"
TRAIN, VALIDATION = "train", "validation"
MODE_CONFIGS = {"free": "free_form", "region": "region_based"}
# The published layout (BleachNick/UltraEdit and BleachNick/UltraEdit_Region_Based_100k).
UE_FREE_DATASET, UE_REGION_DATASET = "UltraEdit", "UltraEdit_Region_Based_100k"
UE_FREE_SPLIT, UE_REGION_SPLIT = "FreeForm_{}", "RegionBase"
# Stages whose later runs change what balance chose from.
_CHANGES_POOL = ("dedup", "filter", "review-pull")

# The published schema's columns, in its order (docs/method.md); then ours.
PUBLISHED_COLUMNS = ("idx", "source_caption", "target_caption", "edit_prompt", "source_image",
                     "edited_image", "edit_object", "mask_image") + PUBLISHED_SCORES
SOFT_MASK_COLUMN = "soft_mask_image"
IMAGE_COLUMNS = ("source_image", "edited_image", "mask_image", SOFT_MASK_COLUMN)
# Catalog columns added by extra_columns=True: name -> datasets dtype.
EXTRA_COLUMNS = {
    "candidate_id": "int64", "edit_id": "int64", "anchor_id": "int64",
    "candidate_index": "int32", "edit_type": "string", "mode": "string",
    "mask_class": "string", "mask_area": "float64", "seed": "int64",
    "gen_behaviour": "string", "gen_params": "string", "source_is_anchor": "bool",
    "l1": "float64", "l2": "float64", "status": "string", "dataset": "string",
    "anchor_path": "string", "session_id": "int64", "turn": "int32",
    "judge_instruction": "int32", "judge_preservation": "int32", "judge_quality": "int32",
    "judge_rationale": "string", "judge_model": "string", "judge_prompt": "string",
}
# Columns of candidates_v an export reads.
_READ = ("candidate_id, edit_id, anchor_id, anchor_duplicate_of, candidate_index, "
         "source_caption, target_caption, instruction, edit_object, mode, edit_type, mask_rle, "
         "mask_height, mask_width, mask_class, mask_area, ground_boxes, source_image, "
         "edited_image, clip_sim_source, clip_sim_target, clip_sim_dir, clip_sim_image, "
         "dinov2_sim, ssim, l1, l2, seed, gen_behaviour, gen_params, source_is_anchor, status, "
         "dataset, anchor_path, instruct_run, ground_run, classify_run, gen_run, score_run, "
         "filter_run, balance_run, dedup_run, session_id, turn, judge_instruction, "
         "judge_preservation, judge_quality, judge_rationale, judge_model, judge_prompt, "
         "judge_run")
RUN_COLUMNS = ("instruct_run", "ground_run", "classify_run", "gen_run", "score_run",
                "filter_run", "balance_run", "dedup_run", "judge_run")
SESSIONS_DIR = "sessions"   # MagicBrush's layout of the multi-turn sessions, under OUT



@dataclass
class ExportSummary:
    out: str
    format: str
    layout: str
    rows: int
    splits: dict[str, int]
    files: int
    bytes: int
    seconds: float
    run_id: int | None = None
    pushed_to: str | None = None
    edit_types: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sessions: dict[int, int] = field(default_factory=dict)   # turns -> sessions written

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ExportOptions:
    """What shapes the written files (everything but the rows and where they go)."""
    fmt: str = "hf"
    layout: str = "default"
    shard_size: int = DEFAULT_SHARD_SIZE
    extra_columns: bool = False
    soft_masks: bool = False
    val_fraction: float = 0.0
    seed: int = 0
    license: str = "unknown"
    language: tuple[str, ...] = ("en",)
    citation: str | None = None
    sessions: bool = False

    def check(self) -> None:
        if self.fmt not in EXPORT_FORMATS:
            raise UltracurateError(f"unknown export format '{self.fmt}' "
                                   f"(one of {', '.join(EXPORT_FORMATS)})")
        if self.layout not in EXPORT_LAYOUTS:
            raise UltracurateError(f"unknown export layout '{self.layout}' "
                                   f"(one of {', '.join(EXPORT_LAYOUTS)})")
        if self.layout == "ultraedit" and self.fmt != "hf":
            raise UltracurateError("--layout ultraedit needs --format hf")
        if self.layout == "ultraedit" and self.val_fraction:
            raise UltracurateError("--layout ultraedit has the published splits only; "
                                   "--val-fraction needs the default layout")
        if not 1 <= self.shard_size <= 10_000_000:
            raise UltracurateError(f"--shard-size must be between 1 and 10000000, "
                                   f"got {self.shard_size}")
        if not (0.0 <= self.val_fraction < 1.0):  # also false for nan
            raise UltracurateError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license):
            raise UltracurateError(f"--license '{self.license}' is not a license identifier "
                                   "as the Hub uses them (e.g. cc-by-4.0, apache-2.0, other)")
        for lang in self.language:
            if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)*", lang):
                raise UltracurateError(f"--language '{lang}' is not a language code "
                                       "(ISO 639-1, e.g. en)")

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["language"] = list(self.language)
        return d


# -- selecting rows --------------------------------------------------------------------------
def select_rows(cat: Catalog, selection: Selection | None) -> list[dict]:
    """The candidates an export writes: the selection (default: DEFAULT_WHERE), in
    candidate_id order."""
    selection = _with_default(selection)
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection,
                                    columns=_READ)
    return cat.query(sql + " ORDER BY candidate_id", params)


def _with_default(selection: Selection | None) -> Selection:
    selection = selection or Selection()
    if selection.where is None:
        selection = Selection(DEFAULT_WHERE, {}, selection.limit, selection.sample,
                              selection.seed)
    return selection


def split_by_anchor(rows: list[dict], val_fraction: float, seed: int = 0
                    ) -> dict[str, list[dict]]:
    """{train: rows, validation: rows}: whole anchors (a near-duplicate anchor counts as its
    original) go to validation, in a seeded order, until it holds about val_fraction of the
    rows (at least one anchor; never all); so no anchor is in both. Rows keep their order
    within a split."""
    if not val_fraction:
        return {TRAIN: rows}
    groups: dict[int, int] = Counter(_anchor_group(r) for r in rows)
    if len(groups) < 2:
        raise UltracurateError("--val-fraction needs rows from at least two anchors "
                               f"(the selection has {len(groups)})")

    def order(g: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest()

    want, have, val = val_fraction * len(rows), 0, set()
    for g in sorted(groups, key=order):
        if have >= want or len(val) == len(groups) - 1:
            break
        if val and have + groups[g] - want > want - have:
            continue  # this anchor overshoots more than leaving it out falls short
        val.add(g)
        have += groups[g]
    return {TRAIN: [r for r in rows if _anchor_group(r) not in val],
            VALIDATION: [r for r in rows if _anchor_group(r) in val]}


def _anchor_group(row: dict) -> int:
    return int(row["anchor_duplicate_of"] or row["anchor_id"])


# -- reading a row: media as stored, masks in the pair's geometry ------------------------------
@dataclass
class Media:
    data: bytes
    name: str   # media store name (sha256.ext); a re-encoded image gets its own
    ext: str


@dataclass
class Item:
    """One candidate ready to write: its row and its files."""
    row: dict
    source: Media
    edited: Media
    mask: bytes | None = None        # PNG, L, 0 / 255, in the pair's geometry
    soft_mask: bytes | None = None   # PNG, L, round(255 * M), in the pair's geometry


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else "bin"


def _media(ws: Workspace, row: dict, column: str) -> Media:
    name = row[column]
    what = column.replace("_", " ")
    cid = row["candidate_id"]
    if not name:
        raise UltracurateError(f"candidate {cid}: has no {what} (status {row['status']}); "
                               "narrow --where to generated rows")
    try:
        path = ws.media.path(name)
        return Media(path.read_bytes(), name, _ext(name))
    except UltracurateError as e:  # the store refuses a name that is not one of its own
        raise UltracurateError(f"candidate {cid}: {what}: {e}") from None
    except FileNotFoundError:
        raise UltracurateError(f"candidate {cid}: {what} {name} is missing from the media "
                               f"store ({path})") from None
    except OSError as e:
        raise UltracurateError(f"candidate {cid}: cannot read {what} {name} "
                               f"({e.strerror or e})") from None


def _size(m: Media, cid: int, what: str) -> tuple[int, int]:
    """(width, height) from the image header (no decode)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(m.data)) as im:
            return im.size
    except Exception as e:
        raise UltracurateError(f"candidate {cid}: {what} {m.name} is not a readable image "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                               ) from None


def _png(arr) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    # compress_level 1: masks are nearly two-valued, fast deflate is nearly as small as 6
    Image.fromarray(arr, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def gen_params(row: dict) -> dict:
    gp = row.get("gen_params")
    if isinstance(gp, str):
        try:
            gp = json.loads(gp)
        except json.JSONDecodeError:
            return {}
    return gp if isinstance(gp, dict) else {}


def load_item(ws: Workspace, row: dict, soft_masks: bool = False) -> Item:
    """A row's files: source and edited media as stored, and its masks in the pair's geometry
    (the source image's size; an edited image of another size is resized to it)."""
    import numpy as np

    from .masks import pair_mask, recorded_soft_mask
    cid = row["candidate_id"]
    item = Item(row, _media(ws, row, "source_image"), _media(ws, row, "edited_image"))
    region = row.get("mode") == "region" and bool(row.get("mask_rle"))
    if not region:
        return item
    w, h = _size(item.source, cid, "source image")
    if _size(item.edited, cid, "edited image") != (w, h):
        item.edited = _resized(item.edited, (w, h))
    gp = gen_params(row)
    crop = gp.get("size") if isinstance(gp.get("size"), int) else None
    try:
        mask = pair_mask(row["mask_rle"], row["mask_height"], row["mask_width"], crop, (h, w))
        item.mask = _png(mask.astype(np.uint8) * 255)
        settings = gp.get("mask")
        if soft_masks and isinstance(settings, dict):
            boxes = (json.loads(row["ground_boxes"]).get("boxes")
                     if row.get("ground_boxes") else None)
            soft = recorded_soft_mask(row["mask_rle"], row["mask_height"], row["mask_width"],
                                      settings, (h, w), boxes)
            item.soft_mask = _png(np.rint(np.clip(soft, 0, 1) * 255).astype(np.uint8))
    except UltracurateError as e:
        raise UltracurateError(f"candidate {cid}: mask of edit {row['edit_id']}: {e}") from None
    return item


def _resized(m: Media, size: tuple[int, int]) -> Media:
    """An image brought to size (bicubic), as PNG: only where a pair's images disagree."""
    from PIL import Image

    from .images import to_png_bytes
    with Image.open(io.BytesIO(m.data)) as im:
        data = to_png_bytes(im.convert("RGB").resize(size, Image.BICUBIC))
    return Media(data, hashlib.sha256(data).hexdigest() + ".png", "png")


def _loaded(ws: Workspace, rows: list[dict], soft_masks: bool,
            threads: int = LOAD_THREADS) -> Iterator[Item]:
    """load_item(row) in order, read on threads a bounded window ahead (file reads and PNG
    encoding release the GIL), so the writer never waits on the disk. The first failing
    row, in order, raises."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    window: deque = deque()
    with ThreadPoolExecutor(threads) as pool:
        try:
            for r in rows:
                window.append(pool.submit(load_item, ws, r, soft_masks))
                if len(window) >= threads * 8:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


# -- one vocabulary ----------------------------------------------------------------------------
def column_names(opts: ExportOptions) -> list[str]:
    cols = list(PUBLISHED_COLUMNS)
    if opts.soft_masks:
        cols.append(SOFT_MASK_COLUMN)
    if opts.extra_columns:
        cols += list(EXTRA_COLUMNS)
    return cols


def record(item: Item, opts: ExportOptions) -> dict:
    """A row in the export's vocabulary, in column order; image columns hold Media (or None)
    for the writer to place."""
    r = item.row
    rec: dict[str, Any] = {
        "idx": r["candidate_id"], "source_caption": r["source_caption"],
        "target_caption": r["target_caption"], "edit_prompt": r["instruction"],
        "source_image": item.source, "edited_image": item.edited,
        # The published data has an object only on region rows ('NONE' is a global edit).
        "edit_object": r["edit_object"] if r["mode"] == "region" else None,
        "mask_image": (Media(item.mask, f"{r['candidate_id']}.png", "png")
                       if item.mask is not None else None)}
    for s in PUBLISHED_SCORES:
        rec[s] = r[s]
    if opts.soft_masks:
        rec[SOFT_MASK_COLUMN] = (Media(item.soft_mask, f"{r['candidate_id']}_soft.png", "png")
                                 if item.soft_mask is not None else None)
    if opts.extra_columns:
        rec.update(_extra_values(r))
    return rec


def _extra_values(row: dict) -> dict:
    out = {k: row.get(k) for k in EXTRA_COLUMNS}
    out["gen_params"] = json.dumps(public(gen_params(row))) if row.get("gen_params") else None
    out["anchor_path"] = public(out["anchor_path"])
    out["judge_model"] = public(out["judge_model"])  # a local folder: its name only
    return out


_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\'\"#:]+[/\\])+")


def public(value: Any) -> Any:
    """value with every absolute local path cut to its last part (`…/name`): what a card or
    an exported row may say about this machine's files. Walks dicts and lists."""
    if isinstance(value, str):
        return _ABS_PATH.sub("…/", value)
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v) for v in value]
    return value


def hf_features(extra_columns: bool = False, soft_masks: bool = False,
                null_masks: bool = False):
    """The `datasets.Features` of an hf export: UltraEdit's published schema, then the soft
    mask and the catalog's extra columns when asked. null_masks: the published free-form
    dataset's types, where `edit_object` and `mask_image` are always null."""
    import datasets
    opts = ExportOptions(extra_columns=extra_columns, soft_masks=soft_masks)
    f = {}
    for c in column_names(opts):
        if null_masks and c in ("edit_object", "mask_image", SOFT_MASK_COLUMN):
            f[c] = datasets.Value("null")
        elif c in IMAGE_COLUMNS:
            f[c] = datasets.Image()
        elif c == "idx":
            f[c] = datasets.Value("int64")
        elif c in PUBLISHED_SCORES:
            f[c] = datasets.Value("float64")
        elif c in EXTRA_COLUMNS:
            f[c] = datasets.Value(EXTRA_COLUMNS[c])
        else:
            f[c] = datasets.Value("string")
    return datasets.Features(f)


def hf_row(rec: dict) -> dict:
    """A record as parquet values: images as {bytes, path} (bytes untouched)."""
    return {k: ({"bytes": v.data, "path": v.name} if isinstance(v, Media) else v)
            for k, v in rec.items()}


# -- where files go ----------------------------------------------------------------------------
# Every write of an export goes through these two, so that a disk error is caught in one place
# (and tests can inject one where the machine cannot mount a full filesystem).
def _mkdir(path: Path) -> None:
    path.mkdir()


def _open_write(path: Path):
    return open(path, "wb")


def _write_file(path: Path, data: bytes) -> None:
    with _open_write(path) as f:
        f.write(data)


def shard_name(split: str, i: int, n: int, ext: str) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.{ext}"


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)] or [[]]


@dataclass
class _Ctx:
    ws: Workspace
    opts: ExportOptions
    advance: Callable[[int], None]
    split_bytes: dict[str, int] = field(default_factory=dict)


# -- hf ------------------------------------------------------------------------------------------
def _write_parquet(ctx: _Ctx, rows: list[dict], path: Path, features, split: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = features.arrow_schema
    records = []
    for item in _loaded(ctx.ws, rows, ctx.opts.soft_masks):
        rec = hf_row(record(item, ctx.opts))
        records.append({k: rec[k] for k in features})
        ctx.advance(1)
    table = pa.Table.from_pylist(records, schema=schema)
    ctx.split_bytes[split] = ctx.split_bytes.get(split, 0) + table.nbytes
    # Encoded images do not compress: store them as they are, the rest with snappy.
    compression = {c: ("NONE" if c in IMAGE_COLUMNS else "SNAPPY") for c in table.column_names}
    with _open_write(path) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, compression=compression)


def _write_hf(ctx: _Ctx, splits: dict[str, list[dict]], tmp: Path) -> list[dict]:
    """data/<free_form|region_based>/<split>-NNNNN-of-NNNNN.parquet; returns the datasets
    written (one here) for their cards."""
    feats = hf_features(ctx.opts.extra_columns, ctx.opts.soft_masks)
    _mkdir(tmp / "data")
    configs: dict[str, dict[str, int]] = {}
    for mode, config in MODE_CONFIGS.items():
        for split, rows in splits.items():
            mine = [r for r in rows if r["mode"] == mode]
            if not mine:
                continue
            if not (tmp / "data" / config).exists():
                _mkdir(tmp / "data" / config)
            chunks = _chunks(mine, ctx.opts.shard_size)
            for i, chunk in enumerate(chunks):
                _write_parquet(ctx, chunk, tmp / "data" / config /
                               shard_name(split, i, len(chunks), "parquet"), feats, split)
            configs.setdefault(config, {})[split] = len(mine)
    default = {s: len(rows) for s, rows in splits.items() if rows}
    return [{"folder": tmp, "title": "Instruction-based image-editing pairs",
             "configs": {"default": (default, "data/*/{split}-*"),
                         **{c: (n, f"data/{c}/{{split}}-*") for c, n in configs.items()}},
             "features": {c: feats for c in ("default", *configs)},
             "splits": splits}]


def _write_hf_ultraedit(ctx: _Ctx, rows: list[dict], tmp: Path) -> list[dict]:
    """The published layout: <tmp>/UltraEdit (splits FreeForm_0..N, shard_size rows each,
    edit_object and mask_image typed null) and <tmp>/UltraEdit_Region_Based_100k (one split,
    RegionBase, in shards)."""
    out = []
    free = [r for r in rows if r["mode"] == "free"]
    region = [r for r in rows if r["mode"] == "region"]
    if free:
        folder = tmp / UE_FREE_DATASET
        _mkdir(folder)
        _mkdir(folder / "data")
        feats = hf_features(ctx.opts.extra_columns, ctx.opts.soft_masks, null_masks=True)
        splits = {}
        for i, chunk in enumerate(_chunks(free, ctx.opts.shard_size)):
            split = UE_FREE_SPLIT.format(i)
            _write_parquet(ctx, chunk, folder / "data" / shard_name(split, 0, 1, "parquet"),
                           feats, split)
            splits[split] = chunk
        out.append({"folder": folder, "title": "UltraEdit-layout free-form edits",
                    "configs": {"default": ({s: len(v) for s, v in splits.items()},
                                            "data/{split}-*")},
                    "features": {"default": feats}, "splits": splits})
    if region:
        folder = tmp / UE_REGION_DATASET
        _mkdir(folder)
        _mkdir(folder / "data")
        feats = hf_features(ctx.opts.extra_columns, ctx.opts.soft_masks)
        chunks = _chunks(region, ctx.opts.shard_size)
        for i, chunk in enumerate(chunks):
            _write_parquet(ctx, chunk, folder / "data" /
                           shard_name(UE_REGION_SPLIT, i, len(chunks), "parquet"), feats,
                           UE_REGION_SPLIT)
        out.append({"folder": folder, "title": "UltraEdit-layout region-based edits",
                    "configs": {"default": ({UE_REGION_SPLIT: len(region)}, "data/{split}-*")},
                    "features": {"default": feats}, "splits": {UE_REGION_SPLIT: region}})
    return out


# -- jsonl ---------------------------------------------------------------------------------------
def _place(tmp: Path, media: Media | None, folder: str, written: set) -> str | None:
    """Write one file under tmp/folder (once per name); its path relative to the export."""
    if media is None:
        return None
    rel = f"{folder}/{media.name}"
    if rel not in written:
        _write_file(tmp / rel, media.data)
        written.add(rel)
    return rel


def _write_jsonl(ctx: _Ctx, splits: dict[str, list[dict]], tmp: Path) -> list[dict]:
    _mkdir(tmp / "images")
    _mkdir(tmp / "masks")
    written: set = set()
    for split, rows in splits.items():
        chunks = _chunks(rows, ctx.opts.shard_size)
        for i, chunk in enumerate(chunks):
            with _open_write(tmp / shard_name(split, i, len(chunks), "jsonl")) as f:
                for item in _loaded(ctx.ws, chunk, ctx.opts.soft_masks):
                    rec = record(item, ctx.opts)
                    for c in IMAGE_COLUMNS:
                        if c in rec:
                            folder = "images" if c in ("source_image", "edited_image") else "masks"
                            rec[c] = _place(tmp, rec[c], folder, written)
                    f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                    ctx.advance(1)
    return []


# -- InstructPix2Pix -----------------------------------------------------------------------------
def _as_jpeg(m: Media) -> bytes:
    """ip2p's loader opens `<seed>_0.jpg`: JPEG bytes pass through, anything else is converted
    (quality 100, as the method saves its outputs)."""
    if m.data[:3] == b"\xff\xd8\xff":
        return m.data
    from PIL import Image

    from .images import to_jpeg_bytes
    return to_jpeg_bytes(Image.open(io.BytesIO(m.data)), quality=100)


def _write_ip2p(ctx: _Ctx, splits: dict[str, list[dict]], tmp: Path) -> list[dict]:
    """One IP2P tree per split: at the root when there is only train, else train/ and
    validation/ (each loads with IP2P's EditDataset)."""
    for split, rows in splits.items():
        root = tmp if len(splits) == 1 else tmp / split
        if root != tmp:
            _mkdir(root)
        seeds: dict[str, list[int]] = {}
        for item in _loaded(ctx.ws, rows, ctx.opts.soft_masks):
            r = item.row
            rec = record(item, ctx.opts)
            name = f"{r['edit_id']:08d}"
            folder = root / name
            if name not in seeds:
                _mkdir(folder)
                # prompt.json's keys are IP2P's own (its loader reads "edit")
                prompt = {"input": rec["source_caption"], "edit": rec["edit_prompt"],
                          "output": rec["target_caption"], "edit_object": rec["edit_object"]}
                _write_file(folder / "prompt.json",
                            json.dumps(prompt, ensure_ascii=False).encode())
                seeds[name] = []
            # The file stem is the candidate id (unique), not the generation seed, which two
            # candidates of one edit could share.
            idx = int(r["candidate_id"])
            seeds[name].append(idx)
            _write_file(folder / f"{idx}_0.jpg", _as_jpeg(rec["source_image"]))
            _write_file(folder / f"{idx}_1.jpg", _as_jpeg(rec["edited_image"]))
            meta = {}
            for c, v in rec.items():
                if c in ("source_image", "edited_image"):
                    continue
                if c in ("mask_image", SOFT_MASK_COLUMN):
                    if v is not None:
                        stem = "mask" if c == "mask_image" else "soft_mask"
                        _write_file(folder / f"{idx}_{stem}.png", v.data)
                        v = f"{idx}_{stem}.png"
                meta[c] = v
            _write_file(folder / f"{idx}.json", json.dumps(meta, ensure_ascii=False).encode())
            ctx.advance(1)
        _write_file(root / "seeds.json", json.dumps([[k, v] for k, v in seeds.items()]).encode())
    return []


# -- WebDataset ----------------------------------------------------------------------------------
def _write_wds(ctx: _Ctx, splits: dict[str, list[dict]], tmp: Path) -> list[dict]:
    import webdataset as wds
    for split, rows in splits.items():
        chunks = _chunks(rows, ctx.opts.shard_size)
        for i, chunk in enumerate(chunks):
            with _open_write(tmp / shard_name(split, i, len(chunks), "tar")) as f, \
                    wds.TarWriter(f) as sink:
                for item in _loaded(ctx.ws, chunk, ctx.opts.soft_masks):
                    rec = record(item, ctx.opts)
                    sample: dict[str, Any] = {"__key__": f"{item.row['candidate_id']:010d}"}
                    meta = {}
                    for c, v in rec.items():
                        if c in IMAGE_COLUMNS:
                            if v is not None:
                                sample[f"{c}.{v.ext}"] = v.data
                        else:
                            meta[c] = v
                    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
                    sink.write(sample)
                    ctx.advance(1)
    return []


_WRITERS = {"hf": _write_hf, "jsonl": _write_jsonl, "ip2p": _write_ip2p, "wds": _write_wds}


# -- multi-turn sessions in MagicBrush's layout ---------------------------------------------------
def session_turns(rows: list[dict]) -> dict[int, list[dict]]:
    """{session id: its rows in turn order} for the sessions among rows, each cut at its first
    turn rows lack (turn i's input is turn i - 1's output); sessions without turn 1 left out."""
    by_session: dict[int, dict[int, dict]] = {}
    for r in rows:
        if r.get("session_id") is not None:
            by_session.setdefault(int(r["session_id"]), {})[int(r["turn"])] = r
    out = {}
    for sid, turns in sorted(by_session.items()):
        kept = []
        while len(kept) + 1 in turns:
            kept.append(turns[len(kept) + 1])
        if kept:
            out[sid] = kept
    return out


def _png_of(m: Media) -> bytes:
    from PIL import Image

    from .images import to_png_bytes
    if m.data[:8] == b"\x89PNG\r\n\x1a\n":
        return m.data
    with Image.open(io.BytesIO(m.data)) as im:
        return to_png_bytes(im.convert("RGB"))


def _write_sessions(ctx: _Ctx, rows: list[dict], folder: Path) -> dict[int, int]:
    """MagicBrush's layout under folder: images/<id>/<id>-input.png (turn 1's source image),
    <id>-output<i>.png (turn i's edited image), <id>-mask<i>.png (turn i's region, L, 255 =
    editable; the whole image for a free-form turn), edit_sessions.json and
    global_descriptions.json (nothing when rows hold no session). Returns {turns:
    sessions}."""
    import numpy as np
    sessions = session_turns(rows)
    if not sessions:
        return {}
    _mkdir(folder)
    _mkdir(folder / "images")
    edit_sessions: dict[str, list[dict]] = {}
    captions: dict[str, dict[str, str]] = {}
    lengths: dict[int, int] = {}
    for sid, turns in sessions.items():
        name = str(sid)
        _mkdir(folder / "images" / name)
        steps, caps = [], {}
        previous = f"{name}-input.png"
        for i, item in enumerate(_loaded(ctx.ws, turns, False), 1):
            r = item.row
            if i == 1:
                _write_file(folder / "images" / name / previous, _png_of(item.source))
                caps[previous] = r["source_caption"]
            output, mask = f"{name}-output{i}.png", f"{name}-mask{i}.png"
            _write_file(folder / "images" / name / output, _png_of(item.edited))
            if item.mask is None:  # a free-form turn may change the whole image
                w, h = _size(item.edited, r["candidate_id"], "edited image")
                item.mask = _png(np.full((h, w), 255, np.uint8))
            _write_file(folder / "images" / name / mask, item.mask)
            steps.append({"input": previous, "mask": mask, "output": output,
                          "instruction": r["instruction"]})
            caps[output] = r["target_caption"]
            previous = output
        edit_sessions[name], captions[name] = steps, caps
        lengths[len(steps)] = lengths.get(len(steps), 0) + 1
    for fname, data in (("edit_sessions.json", edit_sessions),
                        ("global_descriptions.json", captions)):
        _write_file(folder / fname, json.dumps(data, indent=1, ensure_ascii=False).encode())
    return dict(sorted(lengths.items()))


# -- the public entry point ------------------------------------------------------------------
def export_dataset(ws: Workspace, selection: Selection | None, out: str | Path, fmt: str = "hf",
                   *, progress: bool = True, **options) -> ExportSummary:
    """`run(ws, "export", selection, out=out, format=fmt, ...)`: its ExportSummary (see
    ExportStage for the options)."""
    from .runner import run
    return run(ws, "export", selection, out=out, format=fmt, progress=progress,
               **options).result


class ExportStage(SetStage):
    """Export the selected candidates (default: accepted, not duplicates, selected by balance
    if it ran) to out in format.

    All-or-nothing: out appears complete or not at all. With overwrite, an existing out is
    replaced, once the new export is complete, only if it is an earlier export of this tool.
    val_fraction cuts a validation split by anchor (seeded by seed, default the selection's).
    push_to_hub (hf format) uploads out to that dataset repo through huggingface_hub.
    sessions: also write the selected rows' multi-turn sessions in MagicBrush's layout under
    OUT/sessions/ (see the module docstring). The files are written with no catalog
    connection held; a refusal (an empty selection, a
    catalog value that is not a media name, a target it may not replace) records no run."""

    name = "export"
    path_options = ("out",)
    table = "candidates"
    has_produce = True

    def __init__(self, out: str | Path, format: str = "hf", layout: str = "default",
                 shard_size: int = DEFAULT_SHARD_SIZE, extra_columns: bool = False,
                 soft_masks: bool = False, val_fraction: float = 0.0,
                 seed: int | None = None, license: str = "unknown",
                 language: str | list[str] = "en", citation: str | None = None,
                 overwrite: bool = False, push_to_hub: str | None = None,
                 private: bool = False, sessions: bool = False):
        parts = language.split(",") if isinstance(language, str) else list(language)
        langs = tuple(p.strip() for p in parts if p.strip())
        self.opts = ExportOptions(format, layout, int(shard_size), extra_columns, soft_masks,
                                  float(val_fraction), 0 if seed is None else int(seed),
                                  license, langs, citation, bool(sessions))
        self.opts.check()
        if push_to_hub and (format != "hf" or layout != "default"):
            raise UltracurateError("--push-to-hub needs --format hf and the default layout "
                                   "(the ultraedit layout is two datasets: push each folder "
                                   "yourself)")
        self.seed, self.overwrite = seed, overwrite
        self.push_to_hub, self.private = push_to_hub, private
        self.out = Path(out).expanduser().resolve()
        super().__init__(out=str(self.out))

    def check(self, r, selection) -> None:
        check_target(self.out, r.workspace, self.overwrite)

    def effective_selection(self, selection):
        return _with_default(selection)

    def plan(self, r, selection):
        from .card import run_provenance
        sel = _with_default(selection)
        if self.seed is None:
            self.opts.seed = sel.seed
        self.params.update(self.opts.to_json())
        rows = select_rows(r.cat, selection)
        if not rows:
            raise UltracurateError("the selection has no candidates to export")
        sql, params = selected_keys_sql(r.cat.con, "candidates_v", "candidate_id", sel,
                                        columns="candidate_id, source_image, edited_image")
        r.workspace.check_media_names(r.cat, sql, params, "candidate_id",
                                      ("source_image", "edited_image"))
        splits = split_by_anchor(rows, self.opts.val_fraction, self.opts.seed) \
            if self.opts.layout == "default" else {}
        provenance = run_provenance(r.cat, rows, sel)
        warnings = (_stale_balance(r.cat) if selection is None or selection.where is None
                    else [])
        return rows, splits, provenance, warnings

    def produce(self, plan, ctx) -> ExportSummary:
        rows, splits, provenance, warnings = plan
        started = time.perf_counter()
        try:
            summary = _write_export(ctx.workspace, rows, splits, self.out, self.opts,
                                    provenance, ctx.show_progress)
        except OSError as e:
            raise UltracurateError(f"cannot write the export to {self.out}: "
                                   f"{e.strerror or e}") from None
        summary.warnings = warnings
        summary.seconds = round(time.perf_counter() - started, 3)
        if self.push_to_hub:
            summary.pushed_to = upload_to_hub(self.out, self.push_to_hub, private=self.private)
        return summary

    def apply(self, w, plan, summary: ExportSummary) -> ExportSummary:
        w.run.rows_in, w.run.rows_done = len(plan[0]), summary.rows
        summary.run_id = w.run_id
        return summary


def _write_export(ws, rows, splits, out: Path, opts: ExportOptions, provenance: dict,
                  progress: bool) -> ExportSummary:
    from .card import dataset_card
    created = _missing_parents(out)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out.parent, out.name)
        _mkdir(tmp)
        _write_file(tmp / MARKER, json.dumps({"tool": "ultracurate", "state": "partial",
                                              "pid": os.getpid(),
                                              "host": socket.gethostname()}).encode())
        with _bar(len(rows), f"export {opts.fmt}", progress) as advance:
            ctx = _Ctx(ws, opts, advance)
            if opts.layout == "ultraedit":
                datasets_written = _write_hf_ultraedit(ctx, rows, tmp)
                splits = {s: r for d in datasets_written for s, r in d["splits"].items()}
            else:
                datasets_written = _WRITERS[opts.fmt](ctx, splits, tmp)
            written_sessions = (_write_sessions(ctx, rows, tmp / SESSIONS_DIR)
                                if opts.sessions else {})
        for d in datasets_written:
            _write_file(d["folder"] / "README.md",
                        dataset_card(d, opts, provenance, ctx.split_bytes).encode())
        _write_file(tmp / MARKER, json.dumps(
            {"tool": "ultracurate", "format": opts.fmt, "layout": opts.layout,
             "rows": len(rows), "splits": {s: len(r) for s, r in splits.items()}}).encode())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # folders this export made for OUT, innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    files = [p for p in out.rglob("*") if p.is_file() and p.name != MARKER]
    return ExportSummary(str(out), opts.fmt, opts.layout, len(rows),
                         {s: len(r) for s, r in splits.items()}, len(files),
                         sum(p.stat().st_size for p in files), 0.0,
                         edit_types={s: edit_type_counts(r) for s, r in splits.items()},
                         sessions=written_sessions)


def _missing_parents(out: Path) -> list[Path]:
    missing = []
    for p in out.parents:
        if p.exists():
            break
        missing.append(p)
    return missing


def _stale_balance(cat: Catalog) -> list[str]:
    """A warning when balance ran before a dedup, filter or review pull that changed the rows
    it chose from: the default selection then differs from what balance printed."""
    last = dict(cat.con.execute(
        "SELECT stage, max(run_id) FROM runs WHERE state = 'completed' AND stage IN "
        "('balance', " + ", ".join(f"'{s}'" for s in _CHANGES_POOL) + ") GROUP BY stage"
    ).fetchall())
    b = last.get("balance")
    if b is None:
        return []
    later = [f"{s} (run {last[s]})" for s in _CHANGES_POOL if last.get(s, 0) > b]
    if not later:
        return []
    return [f"balance (run {b}) ran before {', '.join(later)}: the default selection may "
            "differ from what balance printed; run balance again"]


# -- what --force may replace, and what a killed export leaves -----------------------------------
def _holds_workspace(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if CONFIG_NAME in files or "catalog.duckdb" in files:
            return True
    return False


def is_export(folder: Path) -> bool:
    """A folder this tool exported: it carries the marker file."""
    try:
        return json.loads((folder / MARKER).read_text()).get("tool") == "ultracurate"
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, ws: Workspace, overwrite: bool) -> None:
    """Refuse an OUT that would destroy what this tool did not make (one line, before any
    change)."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UltracurateError(f"refusing to export to {out}: it is the current directory "
                               "or one of its parents")
    if out == ws.root or out in ws.root.parents:
        raise UltracurateError(f"refusing to export to {out}: it holds the workspace "
                               f"{ws.root}")
    for part in (ws.root / "media", ws.root / "lance", ws.root / "models"):
        if out == part or part in out.parents:
            raise UltracurateError(f"refusing to export to {out}: it is inside the "
                                   f"workspace's {part.name}/ folder")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UltracurateError(f"{out} already exists (pass --force to replace an earlier "
                               "export)")
    if not out.is_dir():
        raise UltracurateError(f"refusing to replace {out}: it is a file, not an export of "
                               "ultracurate (--force replaces only earlier exports)")
    if not is_export(out):
        raise UltracurateError(f"refusing to replace {out}: it is not an export of "
                               f"ultracurate (no {MARKER} marker; --force replaces only "
                               "earlier exports)")
    if _holds_workspace(out):
        raise UltracurateError(f"refusing to replace {out}: it holds an ultracurate workspace")


def _alive(folder: Path) -> bool:
    """A partial export whose process still runs on this machine (not a leftover)."""
    try:
        info = json.loads((folder / MARKER).read_text())
        if info.get("state") != "partial" or info.get("host") != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """What killed or replaced exports left in parent: hidden `.X.partial-xxxxxxxx` and
    `.X.old-xxxxxxxx` entries that carry this tool's marker (any X), and, for X = name, those
    without it too (made before exports were marked, or a file --force once moved aside).
    Never a partial export whose process still runs, nor anything holding a workspace."""
    pattern = re.compile(r"^\.(.+)\.(partial|old)-[0-9a-f]{8}$")
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = pattern.match(p.name)
        if not m:
            continue
        folder = p.is_dir() and not p.is_symlink()
        if not (folder and (p / MARKER).exists()) and m.group(1) != name:
            continue
        if folder and (_alive(p) or _holds_workspace(p)):
            continue
        found.append(p)
    return found


def clean_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    return remove_leftovers(leftovers(parent, name))


def remove_leftovers(paths: list[Path]) -> list[Path]:
    """Remove what `leftovers` found; returns what is gone."""
    removed = []
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
    return removed


def export_leftovers(ws: Workspace, cat: Catalog) -> list[Path]:
    """Leftovers beside every export recorded in runs, and in the workspace's exports/."""
    found = set(leftovers(ws.root / "exports"))
    for (out,) in cat.con.execute("SELECT DISTINCT json_extract_string(params, '$.out') "
                                  "FROM runs WHERE stage = 'export'").fetchall():
        if out:
            found.update(leftovers(Path(out).parent, Path(out).name))
    return sorted(found)


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (an earlier export) is moved aside first and
    removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _bar:
    def __init__(self, total: int, description: str, enabled: bool):
        self.total, self.description, self.enabled = total, description, enabled

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n=1: None
        from .progress import bar as _progress
        self.progress = _progress(self.total, self.description)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n=1: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()


def edit_type_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["edit_type"] for r in rows).items()))


# -- Hugging Face Hub ---------------------------------------------------------------------------
def upload_to_hub(folder: str | Path, repo: str, *, private: bool = False,
                  token: str | None = None) -> str:
    """Create the dataset repo (if needed) and upload folder to it; returns the repo URL.
    The token comes from token, else $HF_TOKEN, else huggingface_hub's login cache."""
    from huggingface_hub import HfApi
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    try:
        url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                          ignore_patterns=[MARKER],
                          commit_message="Upload dataset exported by ultracurate")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"push to hub repo {repo} failed ({first}); the export is "
                               f"complete at {folder}") from None
    return str(url)


def load_exported(out: str | Path) -> Any:
    """`datasets.load_dataset` on an hf export (a DatasetDict: train, and validation)."""
    import datasets
    return datasets.load_dataset(str(out))
