"""Export selected candidates as a dataset a trainer can load.

Formats:
  hf     parquet shards with `datasets` Image features in UltraEdit's published schema, one split
         per mode (`free_form`, `region_based`), and a dataset card; `datasets.load_dataset(OUT)`
         loads it. `push_to_hub` uploads it.
  jsonl  `train.jsonl` (instruction, input image, output image, mask or null, mode; free-form
         and region rows mixed) beside `images/` and `masks/`.
  ip2p   InstructPix2Pix's layout: `seeds.json` and one folder per edit holding `prompt.json`
         and `<seed>_0.jpg` / `<seed>_1.jpg` per candidate.
  wds    WebDataset tar shards (`<key>.source.<ext>`, `<key>.edited.<ext>`, `<key>.mask.png`,
         `<key>.json`).

Image bytes are copied from the media store as they are (no decode, no re-encode), except where
a layout fixes the file type (ip2p's `.jpg`, masks as PNG). An export is all-or-nothing: it is
written into a hidden folder beside OUT and renamed into place at the end, so a failure (a missing
media file, a full disk, Ctrl-C) leaves no partial dataset at OUT.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .catalog import Catalog
from .errors import UltracurateError
from .selection import Selection, selected_keys_sql
from .workspace import Workspace

FORMATS = ("hf", "jsonl", "ip2p", "wds")
SPLITS = {"free": "free_form", "region": "region_based"}
# Accepted (a human decision overrides the filter), kept by balance if it ran, not a duplicate.
DEFAULT_WHERE = "status = 'accepted' AND selected IS NOT FALSE AND duplicate_of IS NULL"
DEFAULT_SHARD_SIZE = 2000   # the published UltraEdit chunks hold 2,000 rows
ROW_GROUP_SIZE = 100        # rows per parquet row group: small enough to stream images
LOAD_THREADS = 4            # media reads ahead of the writer

# The published schema's columns, in its order (../shared/method.md).
IMAGE_COLUMNS = ("source_image", "edited_image", "mask_image")
PUBLISHED_SCORES = ("clip_sim_source", "clip_sim_target", "clip_sim_dir", "clip_sim_image",
                    "dinov2_sim", "ssim")
# Catalog columns added by extra_columns=True: name -> datasets dtype.
EXTRA_COLUMNS = {
    "candidate_id": "int64", "edit_id": "int64", "anchor_id": "int64",
    "candidate_index": "int32", "edit_type": "string", "mode": "string",
    "mask_class": "string", "mask_area": "float64", "seed": "int64",
    "gen_behaviour": "string", "gen_params": "string", "source_is_anchor": "bool",
    "l1": "float64", "l2": "float64", "status": "string", "dataset": "string",
    "anchor_path": "string",
}
# Columns of candidates_v an export reads.
_READ = ("candidate_id, edit_id, anchor_id, candidate_index, source_caption, target_caption, "
         "instruction, edit_object, mode, edit_type, mask_rle, mask_height, mask_width, "
         "mask_class, mask_area, source_image, edited_image, clip_sim_source, clip_sim_target, "
         "clip_sim_dir, clip_sim_image, dinov2_sim, ssim, l1, l2, seed, gen_behaviour, "
         "gen_params, source_is_anchor, status, dataset, anchor_path, instruct_run, ground_run, "
         "classify_run, gen_run, score_run, filter_run, balance_run")
_RUN_COLUMNS = ("instruct_run", "ground_run", "classify_run", "gen_run", "score_run",
                "filter_run", "balance_run")


@dataclass
class ExportSummary:
    out: str
    format: str
    rows: int
    splits: dict[str, int]
    files: int
    bytes: int
    seconds: float
    pushed_to: str | None = None
    edit_types: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


# -- selecting rows --------------------------------------------------------------------------
def select_rows(cat: Catalog, selection: Selection | None) -> list[dict]:
    """The candidates an export writes: the selection (default: DEFAULT_WHERE), in
    candidate_id order."""
    selection = selection or Selection()
    if selection.where is None:
        selection = Selection(DEFAULT_WHERE, {}, selection.limit, selection.sample,
                              selection.seed)
    sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection,
                                    columns=_READ)
    return cat.query(sql + " ORDER BY candidate_id", params)


def _media_bytes(ws: Workspace, row: dict, column: str) -> bytes:
    name = row[column]
    what = column.replace("_", " ")
    if not name:
        raise UltracurateError(f"candidate {row['candidate_id']}: has no {what} "
                               f"(status {row['status']}); narrow --where to generated rows")
    path = ws.media.path(name)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UltracurateError(f"candidate {row['candidate_id']}: {what} {name} is missing from "
                               f"the media store ({path})") from None


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else "bin"


def mask_png(row: dict) -> bytes | None:
    """The candidate's edit mask as a PNG (L mode, 0 / 255), or None for a free-form row."""
    if row.get("mode") != "region" or not row.get("mask_rle"):
        return None
    from PIL import Image
    from .masks import decode
    try:
        m = decode(row["mask_rle"], row["mask_height"], row["mask_width"])
    except UltracurateError as e:
        raise UltracurateError(f"candidate {row['candidate_id']}: mask of edit "
                               f"{row['edit_id']} is {e}") from None
    buf = io.BytesIO()
    # compress_level 1: masks are two-valued, so fast deflate is nearly as small as level 6
    Image.fromarray((m > 0).astype("uint8") * 255, "L").save(buf, format="PNG",
                                                              compress_level=1)
    return buf.getvalue()


def load_row(ws: Workspace, row: dict) -> dict:
    """A row's bytes: source and edited media as stored, and the mask as PNG (or None)."""
    return {"source": _media_bytes(ws, row, "source_image"),
            "edited": _media_bytes(ws, row, "edited_image"),
            "mask": mask_png(row)}


def _loaded(ws: Workspace, rows: list[dict], threads: int = LOAD_THREADS
            ) -> Iterator[tuple[dict, dict]]:
    """(row, load_row(row)) in order, read on threads a bounded window ahead (file reads and
    PNG encoding release the GIL), so the writer never waits on the disk. The first failing
    row, in order, raises."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    window = deque()
    it = iter(rows)
    with ThreadPoolExecutor(threads) as pool:
        try:
            for r in it:
                window.append((r, pool.submit(load_row, ws, r)))
                if len(window) >= threads * 8:
                    r0, f0 = window.popleft()
                    yield r0, f0.result()
            while window:
                r0, f0 = window.popleft()
                yield r0, f0.result()
        finally:
            for _, f in window:
                f.cancel()


def _extra_values(row: dict) -> dict:
    out = {k: row.get(k) for k in EXTRA_COLUMNS}
    if out["gen_params"] is not None and not isinstance(out["gen_params"], str):
        out["gen_params"] = json.dumps(out["gen_params"])
    return out


# -- the public entry point ------------------------------------------------------------------
def export_dataset(ws: Workspace, selection: Selection | None, out: str | Path, fmt: str = "hf",
                   *, shard_size: int = DEFAULT_SHARD_SIZE, extra_columns: bool = False,
                   overwrite: bool = False, push_to_hub: str | None = None,
                   private: bool = False, progress: bool = True) -> ExportSummary:
    """Export the selected candidates (default: accepted, selected by balance if it ran, not
    duplicates) to out in fmt.

    All-or-nothing: out appears complete or not at all. With overwrite, an existing out is
    replaced only once the new export is complete. push_to_hub (hf format) uploads out to that
    dataset repo through huggingface_hub (token from $HF_TOKEN or the login cache)."""
    if fmt not in FORMATS:
        raise UltracurateError(f"unknown export format '{fmt}' (one of {', '.join(FORMATS)})")
    if shard_size < 1:
        raise UltracurateError(f"shard size must be at least 1, got {shard_size}")
    if push_to_hub and fmt != "hf":
        raise UltracurateError("--push-to-hub needs --format hf")
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise UltracurateError(f"{out} already exists (pass --force to replace it)")
    started = time.perf_counter()
    with ws.catalog(read_only=True) as cat:
        rows = select_rows(cat, selection)
        if not rows:
            raise UltracurateError("the selection has no candidates to export")
        provenance = _provenance(cat, rows, selection)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = {"hf": _write_hf, "jsonl": _write_jsonl, "ip2p": _write_ip2p,
                  "wds": _write_wds}[fmt]
        with _bar(len(rows), f"export {fmt}", progress) as advance:
            split_bytes: dict[str, int] = {}
            splits = writer(ws, rows, tmp, shard_size=shard_size, extra_columns=extra_columns,
                            advance=advance, split_bytes=split_bytes)
        edit_types = _edit_type_counts(rows)
        if fmt == "hf":
            (tmp / "README.md").write_text(
                dataset_card(rows, splits, edit_types, provenance, extra_columns,
                             split_bytes))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    summary = ExportSummary(str(out), fmt, len(rows), splits, len(files),
                            sum(p.stat().st_size for p in files),
                            round(time.perf_counter() - started, 3), None, edit_types)
    if push_to_hub:
        summary.pushed_to = upload_to_hub(out, push_to_hub, private=private)
    return summary


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed after."""
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
        from .runner import _progress
        self.progress = _progress(self.total, self.description)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n=1: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()


def _edit_type_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for r in rows:
        counts.setdefault(SPLITS[r["mode"]], Counter())[r["edit_type"]] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}


def _by_split(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(SPLITS[r["mode"]], []).append(r)
    return out


def _chunks(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


# -- hf: parquet with datasets features -------------------------------------------------------
def hf_features(extra_columns: bool = False):
    """The `datasets.Features` of an export: UltraEdit's published schema, plus the catalog's
    extra columns when asked."""
    import datasets
    f = {"idx": datasets.Value("int64"),
         "source_caption": datasets.Value("string"),
         "target_caption": datasets.Value("string"),
         "edit_prompt": datasets.Value("string"),
         "source_image": datasets.Image(),
         "edited_image": datasets.Image(),
         "edit_object": datasets.Value("string"),
         "mask_image": datasets.Image()}
    for s in PUBLISHED_SCORES:
        f[s] = datasets.Value("float64")
    if extra_columns:
        for name, dtype in EXTRA_COLUMNS.items():
            f[name] = datasets.Value(dtype)
    return datasets.Features(f)


def hf_record(ws: Workspace, row: dict, extra_columns: bool = False,
              loaded: dict | None = None) -> dict:
    """One exported row in the published schema; images as {bytes, path} (bytes untouched)."""
    b = loaded or load_row(ws, row)
    mask = b["mask"]
    rec = {"idx": row["candidate_id"],
           "source_caption": row["source_caption"],
           "target_caption": row["target_caption"],
           "edit_prompt": row["instruction"],
           "source_image": {"bytes": b["source"], "path": row["source_image"]},
           "edited_image": {"bytes": b["edited"], "path": row["edited_image"]},
           # The published data has an object only for region rows ('NONE' is a global edit).
           "edit_object": row["edit_object"] if row["mode"] == "region" else None,
           "mask_image": ({"bytes": mask, "path": f"mask_{row['candidate_id']}.png"}
                          if mask is not None else None)}
    for s in PUBLISHED_SCORES:
        rec[s] = row[s]
    if extra_columns:
        rec.update(_extra_values(row))
    return rec


def _write_hf(ws, rows, tmp: Path, *, shard_size, extra_columns, advance,
              split_bytes) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = hf_features(extra_columns).arrow_schema
    (tmp / "data").mkdir()
    splits = {}
    for split, split_rows in _by_split(rows).items():
        shards = list(_chunks(split_rows, shard_size))
        for i, shard in enumerate(shards):
            records = []
            for r, loaded in _loaded(ws, shard):
                records.append(hf_record(ws, r, extra_columns, loaded))
                advance(1)
            table = pa.Table.from_pylist(records, schema=schema)
            split_bytes[split] = split_bytes.get(split, 0) + table.nbytes
            # Encoded images do not compress: store them as they are, the rest with snappy.
            compression = {c: ("NONE" if c in IMAGE_COLUMNS else "SNAPPY")
                           for c in table.column_names}
            pq.write_table(table, tmp / "data" / f"{split}-{i:05d}-of-{len(shards):05d}.parquet",
                           row_group_size=ROW_GROUP_SIZE, compression=compression)
        splits[split] = len(split_rows)
    return splits


# -- jsonl -----------------------------------------------------------------------------------
def _copy_media(row: dict, column: str, data: bytes, folder: Path, written: set) -> str:
    """Write one media file into folder (once per name); returns its path relative to the
    export root."""
    name = row[column]
    rel = f"{folder.name}/{name}"
    if name not in written:
        (folder / name).write_bytes(data)
        written.add(name)
    return rel


def _write_jsonl(ws, rows, tmp: Path, *, shard_size, extra_columns, advance,
                 split_bytes) -> dict[str, int]:
    images, masks = tmp / "images", tmp / "masks"
    images.mkdir()
    masks.mkdir()
    written: set = set()
    splits: Counter = Counter()
    with open(tmp / "train.jsonl", "w") as f:
        for r, b in _loaded(ws, rows):
            mask = b["mask"]
            mask_rel = None
            if mask is not None:
                mask_rel = f"masks/{r['candidate_id']}.png"
                (tmp / mask_rel).write_bytes(mask)
            rec = {"idx": r["candidate_id"],
                   "instruction": r["instruction"],
                   "input_image": _copy_media(r, "source_image", b["source"], images, written),
                   "output_image": _copy_media(r, "edited_image", b["edited"], images, written),
                   "mask_image": mask_rel,
                   "mode": r["mode"],
                   "source_caption": r["source_caption"],
                   "target_caption": r["target_caption"],
                   "edit_object": r["edit_object"] if r["mode"] == "region" else None}
            for s in PUBLISHED_SCORES:
                rec[s] = r[s]
            if extra_columns:
                rec.update(_extra_values(r))
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            splits[SPLITS[r["mode"]]] += 1
            advance(1)
    return dict(splits)


# -- InstructPix2Pix --------------------------------------------------------------------------
def _as_jpeg(data: bytes) -> bytes:
    """ip2p's loader opens `<seed>_0.jpg`: JPEG bytes pass through, anything else is converted
    (quality 100, as the method saves its outputs)."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image
    from .images import to_jpeg_bytes
    return to_jpeg_bytes(Image.open(io.BytesIO(data)), quality=100)


def _write_ip2p(ws, rows, tmp: Path, *, shard_size, extra_columns, advance,
                split_bytes) -> dict[str, int]:
    seeds: dict[str, list[int]] = {}
    splits: Counter = Counter()
    for r, b in _loaded(ws, rows):
        name = f"{r['edit_id']:08d}"
        folder = tmp / name
        if name not in seeds:
            folder.mkdir()
            prompt = {"input": r["source_caption"], "edit": r["instruction"],
                      "output": r["target_caption"], "mode": r["mode"],
                      "edit_object": r["edit_object"], "edit_type": r["edit_type"]}
            (folder / "prompt.json").write_text(json.dumps(prompt, ensure_ascii=False))
            seeds[name] = []
        # The file stem is the candidate id (unique), not the generation seed, which two
        # candidates of one edit could share.
        seed = int(r["candidate_id"])
        seeds[name].append(seed)
        (folder / f"{seed}_0.jpg").write_bytes(_as_jpeg(b["source"]))
        (folder / f"{seed}_1.jpg").write_bytes(_as_jpeg(b["edited"]))
        mask = b["mask"]
        if mask is not None:
            (folder / f"{seed}_mask.png").write_bytes(mask)
        meta = {s: r[s] for s in PUBLISHED_SCORES}
        meta["generation_seed"] = r["seed"]
        if extra_columns:
            meta.update(_extra_values(r))
        (folder / f"{seed}.json").write_text(json.dumps(meta))
        splits[SPLITS[r["mode"]]] += 1
        advance(1)
    (tmp / "seeds.json").write_text(json.dumps([[k, v] for k, v in seeds.items()]))
    return dict(splits)


# -- WebDataset --------------------------------------------------------------------------------
def _write_wds(ws, rows, tmp: Path, *, shard_size, extra_columns, advance,
               split_bytes) -> dict[str, int]:
    import webdataset as wds
    splits: Counter = Counter()
    shards = list(_chunks(rows, shard_size))
    for i, shard in enumerate(shards):
        path = tmp / f"shard-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for r, b in _loaded(ws, shard):
                meta = {"idx": r["candidate_id"], "edit_prompt": r["instruction"],
                        "source_caption": r["source_caption"],
                        "target_caption": r["target_caption"], "mode": r["mode"],
                        "edit_object": r["edit_object"] if r["mode"] == "region" else None}
                for s in PUBLISHED_SCORES:
                    meta[s] = r[s]
                if extra_columns:
                    meta.update(_extra_values(r))
                sample = {"__key__": f"{r['candidate_id']:010d}",
                          f"source.{_ext(r['source_image'])}": b["source"],
                          f"edited.{_ext(r['edited_image'])}": b["edited"],
                          "json": json.dumps(meta).encode()}
                if b["mask"] is not None:
                    sample["mask.png"] = b["mask"]
                sink.write(sample)
                splits[SPLITS[r["mode"]]] += 1
                advance(1)
    return dict(splits)


# -- the dataset card --------------------------------------------------------------------------
def _provenance(cat: Catalog, rows: list[dict], selection: Selection | None) -> dict:
    """The runs that produced the exported rows: stage, options (thresholds, generation
    parameters), models and code version, newest run of each stage first."""
    run_ids = sorted({r[c] for r in rows for c in _RUN_COLUMNS if r.get(c) is not None})
    runs = []
    if run_ids:
        runs = cat.query("SELECT run_id, stage, params, models, code_version, started_at "
                         "FROM runs WHERE run_id IN (SELECT unnest(?)) ORDER BY run_id",
                         [run_ids])
    for r in runs:
        for k in ("params", "models"):
            if isinstance(r[k], str):
                try:
                    r[k] = json.loads(r[k])
                except json.JSONDecodeError:
                    pass
    sel = (selection or Selection()).to_json()
    if sel["where"] is None:
        sel["where"] = DEFAULT_WHERE
    return {"selection": sel, "runs": runs}


def dataset_card(rows: list[dict], splits: dict[str, int], edit_types: dict,
                 provenance: dict, extra_columns: bool = False,
                 split_bytes: dict[str, int] | None = None) -> str:
    """README.md with the YAML header `datasets` reads (configs, features, splits) and a body
    with counts per edit type, thresholds, models and generation parameters."""
    import yaml
    from . import __version__
    features = hf_features(extra_columns)
    header = {
        "tags": ["image-editing", "instruction-based-image-editing", "ultracurate"],
        "task_categories": ["image-to-image"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
        "dataset_info": {"features": features._to_yaml_list(),
                         "splits": [{"name": s, "num_bytes": int((split_bytes or {}).get(s, 0)),
                                     "num_examples": n} for s, n in splits.items()],
                         "dataset_size": int(sum((split_bytes or {}).values()))},
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             "# Instruction-based image-editing dataset", "",
             f"Curated with ultracurate {__version__} following UltraEdit's method: real image "
             "anchors, LLM-written instructions, free-form and region-based edits. Columns follow "
             "UltraEdit's published schema (`BleachNick/UltraEdit`).", "",
             "```python", "from datasets import load_dataset",
             "ds = load_dataset(\"path/or/repo\")  # splits: " + ", ".join(splits), "```", "",
             "## Splits", "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in splits.items()]
    types = sorted({t for c in edit_types.values() for t in c})
    lines += ["", "## Rows per edit type", "",
              "| edit type | " + " | ".join(splits) + " |",
              "|---|" + "---|" * len(splits)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(str(edit_types.get(s, {}).get(t, 0))
                                             for s in splits) + " |")
    lines += ["", "## Columns", "",
              "`idx` is the candidate id in the curating catalog; `edit_prompt` the "
              "instruction; `mask_image` the edit region (white = editable) on region-based rows, "
              "null on free-form rows; scores are CLIP ViT-L/14 and DINOv2 similarities and SSIM "
              "as in UltraEdit."]
    if extra_columns:
        lines += ["", "Extra columns from the catalog: " + ", ".join(f"`{c}`"
                                                                     for c in EXTRA_COLUMNS)]
    lines += ["", "## Selection", "", "```json", json.dumps(provenance["selection"], indent=2),
              "```", "", "## How the rows were made", ""]
    if not provenance["runs"]:
        lines.append("No recorded runs (rows were inserted or imported directly).")
    for run in provenance["runs"]:
        lines += [f"### {run['stage']} (run {run['run_id']}, {run['started_at']}, "
                  f"{run['code_version']})", ""]
        if run["params"]:
            lines += ["Options (thresholds, generation parameters):", "", "```json",
                      json.dumps(run["params"], indent=2, default=str), "```", ""]
        if run["models"]:
            lines += ["Models:", "", "```json",
                      json.dumps(run["models"], indent=2, default=str), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


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
                          commit_message="Upload dataset exported by ultracurate")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"push to hub repo {repo} failed ({first}); the export is "
                               f"complete at {folder}") from None
    return str(url)


def load_exported(out: str | Path) -> Any:
    """`datasets.load_dataset` on an hf export (a DatasetDict with one split per mode)."""
    import datasets
    return datasets.load_dataset(str(out))
