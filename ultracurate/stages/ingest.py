"""Ingest real photos as anchors.

Sources: folders of images (recursive), a COCO captions JSON with its image folder, a
jsonl/csv/parquet table with path and caption columns, and Hugging Face datasets
(`save_to_disk` folders, or parquet). Each file is decoded fully (so corrupt, truncated and
oversized images are caught), deduplicated by the sha256 of its bytes, and its original bytes
are copied into the media store. A file that cannot be used is recorded in ingest_rejects with
a one-line reason; it never stops the ingest and never leaves half a row.

Captions (with their source: ingest, coco, ...) are merged per content hash into
anchor_captions: several rows for one file, a copy of an anchor's bytes elsewhere, a later
ingest of captions for files already in the catalog; de-duplicated, in order of arrival.

A rerun skips what was recorded (anchors and rejects, by source: the runner leaves out what
sql/queries/ingest.sql `recorded` finds), except for sources that bring captions their anchor
lacks (only those captions are added; the file is not read again); `--force` looks at every
source again, and a source rejected before for the same bytes adds no second reject row
(`record_rejects`, shared with the UltraEdit importer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ..catalog import normalize_caption, now
from ..errors import UltracurateError, reason_text
from ..images import MAX_PIXELS, BadImage, inspect_image, read_bytes
from ..runner import BatchResult, Context, RowStage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
PATH_COLUMNS = ("path", "image", "image_path", "file_name", "filepath", "input_image")
CAPTION_COLUMNS = ("caption", "captions", "text", "source_caption", "input_text")


@dataclass
class Item:
    """One thing to ingest: a file path, or in-memory bytes from a dataset row, with its
    captions (each with its source: ingest, coco, import:<format>, ...)."""
    source: str
    captions: list[str]
    dataset: str
    external_id: str | None = None
    data: bytes | None = None
    caption_source: str = "ingest"      # the source of captions given without one
    caption_sources: list[str] = field(default_factory=list)  # one per caption
    reject: str | None = None   # why this entry cannot be ingested (recorded, never raised)

    def __post_init__(self):
        given, sources = list(self.captions), list(self.caption_sources)
        self.captions, self.caption_sources = [], []
        for i, text in enumerate(given):
            self.add_caption(text, sources[i] if i < len(sources) else self.caption_source)

    def add_caption(self, text, source: str | None = None) -> None:
        """Append a caption unless it is empty or already here (order of arrival kept)."""
        text = normalize_caption(text)
        if text and text not in self.captions:
            self.captions.append(text)
            self.caption_sources.append(source or self.caption_source)

    def merge(self, other: "Item") -> None:
        for text, source in zip(other.captions, other.caption_sources):
            self.add_caption(text, source)
        self.external_id = self.external_id or other.external_id


# -- discovering items ----------------------------------------------------------------------
def discover(paths: list[str | Path], captions_file: str | Path | None = None) -> list[Item]:
    items: list[Item] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UltracurateError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "dataset_info.json").exists() or (
                p.is_dir() and (p / "state.json").exists()):
            items += _from_hf_disk(p)
        elif p.is_dir():
            items += _from_folder(p, captions_file)
        elif p.suffix == ".json":
            items += _from_coco(p)
        elif p.suffix in (".jsonl", ".csv", ".parquet"):
            items += _from_table(p)
        elif p.suffix.lower() in IMAGE_EXTS or p.is_file():
            items.append(Item(str(p.resolve()), [], "files"))
    return merge_items(items)


def merge_items(items: list[Item]) -> list[Item]:
    """One item per source (a folder and a captions table naming the same file, two table
    rows for one path, COCO's several captions): captions merged in order, de-duplicated."""
    merged: dict[str, Item] = {}
    for it in items:
        if it.source in merged:
            merged[it.source].merge(it)
        else:
            merged[it.source] = it
    return list(merged.values())


def _from_folder(folder: Path, captions_file) -> list[Item]:
    caps: dict[str, Item] = {}
    if captions_file:
        caps = {it.source: it for it in merge_items(_from_table(Path(captions_file),
                                                                base=folder))}
    out = []
    for f in sorted(folder.rglob("*")):
        # a symbolic link whose target is gone is kept, and rejected with its reason
        usable = f.is_file() or (f.is_symlink() and not f.exists())
        if usable and (f.suffix.lower() in IMAGE_EXTS or f.suffix == ""):
            src = str(f.resolve()) if f.exists() else str(f.absolute())
            it = Item(src, [], folder.name)
            if src in caps:
                it.merge(caps[src])
            out.append(it)
    return out


def _from_coco(path: Path) -> list[Item]:
    """COCO captions: {"images": [{id, file_name}], "annotations": [{image_id, caption}]}.
    Images are looked up next to the JSON, in ../<split>/ or an `images/` folder. An image or
    annotation entry that cannot be used (no id, no caption, a caption that is not text, an
    unknown image_id) becomes a reject item naming it: ingest records it with the reason."""
    try:
        doc = json.loads(path.read_text())
        raw_images = doc["images"]
        anns = doc.get("annotations", [])
        if not isinstance(raw_images, list) or not isinstance(anns, list):
            raise TypeError("images and annotations must be lists")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UltracurateError(f"{path}: not a COCO captions file ({e})") from None
    rejects: list[Item] = []

    def reject(kind: str, i: int, why: str) -> None:
        rejects.append(Item(f"{path}#{kind}[{i}]", [], "coco",
                            reject=f"{path}: {kind}[{i}] {why}"))

    images: dict[Any, str] = {}
    for i, im in enumerate(raw_images):
        image_id = im.get("id") if isinstance(im, dict) else None
        name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            reject("images", i, "has no id")
        elif not isinstance(name, str) or not name.strip():
            reject("images", i, "has no file_name")
        else:
            images[image_id] = name
    caps: dict[Any, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            reject("annotations", i, "is not an object")
            continue
        image_id, caption = a.get("image_id"), a.get("caption")
        if "image_id" not in a or not isinstance(image_id, (int, str)) \
                or isinstance(image_id, bool):
            reject("annotations", i, "has no image_id")
        elif "caption" not in a or caption is None:
            reject("annotations", i, "has no caption")
        elif not isinstance(caption, str):
            reject("annotations", i, f"has a caption that is not text "
                                     f"({type(caption).__name__})")
        elif image_id not in images:
            reject("annotations", i, f"names image_id {image_id!r}, which is not in images")
        elif caption.strip():
            caps.setdefault(image_id, []).append(caption.strip())
    roots = [path.parent, path.parent / "images", path.parent.parent / "images"]
    out = []
    for image_id, name in images.items():
        f = next((r / name for r in roots if (r / name).exists()), path.parent / name)
        out.append(Item(str(f.resolve()), caps.get(image_id, []), "coco", str(image_id),
                        caption_source="coco"))
    return out + rejects


def _from_table(path: Path, base: Path | None = None) -> list[Item]:
    try:
        if path.suffix == ".jsonl":
            df = pl.read_ndjson(path, infer_schema_length=None)
        elif path.suffix == ".csv":
            df = pl.read_csv(path)
        else:
            df = pl.read_parquet(path)
    except Exception as e:
        raise UltracurateError(f"{path}: cannot read table ({str(e).splitlines()[0]})") from None
    pcol = next((c for c in PATH_COLUMNS if c in df.columns), None)
    ccol = next((c for c in CAPTION_COLUMNS if c in df.columns), None)
    if pcol is None:
        raise UltracurateError(f"{path}: no image path column (one of {', '.join(PATH_COLUMNS)})")
    base = base or path.parent
    out = []
    for row in df.iter_rows(named=True):
        val = row[pcol]
        if isinstance(val, dict) and val.get("bytes"):  # an HF Image column in parquet
            out.append(Item(f"{path}#{len(out)}", _captions(row.get(ccol)), path.stem,
                            str(row.get("idx", len(out))), data=val["bytes"]))
            continue
        f = Path(str(val))
        f = f if f.is_absolute() else base / f
        out.append(Item(str(f.resolve()), _captions(row.get(ccol) if ccol else None),
                        path.stem, str(row.get("id")) if row.get("id") is not None else None))
    return out


def _captions(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(c).strip() for c in v if c]
    return [str(v).strip()] if str(v).strip() else []


def _from_hf_disk(folder: Path) -> list[Item]:
    import datasets
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets(list(ds.values()))
    img_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if img_col is None:
        raise UltracurateError(f"{folder}: dataset has no Image column")
    ccol = next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    ds = ds.cast_column(img_col, datasets.Image(decode=False))
    out = []
    for i, row in enumerate(ds):
        im = row[img_col]
        data = im.get("bytes") or (Path(im["path"]).read_bytes() if im.get("path") else b"")
        out.append(Item(f"{folder}#{i}", _captions(row.get(ccol) if ccol else None),
                        folder.name, str(i), data=data))
    return out


# -- what an ingest has recorded -------------------------------------------------------------
def known_anchors(r, shas: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (anchor_id, source_path) of the anchors among shas (r: a stage's catalog
    handle)."""
    shas = list(dict.fromkeys(shas))
    if not shas:
        return {}
    # a literal IN list: DuckDB answers it from the sha256 index, `IN (SELECT unnest(?))`
    # scans the table (bench/catalog.py: anchor_lookup)
    marks = ", ".join("?" * len(shas))
    return {row["sha256"]: (row["anchor_id"], row["source_path"]) for row in r.query(
        f"SELECT sha256, anchor_id, source_path FROM anchors WHERE sha256 IN ({marks})",
        shas)}


def record_rejects(w, bad: list[dict]) -> None:
    """Insert bad ({source_path, reason, sha256, duplicate_of}) into ingest_rejects, once per
    source and bytes: a source already rejected for the same bytes (a forced rerun, the same
    row twice in a batch) adds no row. Reasons are stored one line, without object reprs."""
    at = now()
    w.ingest_rejects.insert_missing(
        [{"source_path": b["source_path"], "reason": reason_text(b["reason"]),
          "sha256": b.get("sha256"), "duplicate_of": b.get("duplicate_of"),
          "run_id": w.run_id, "rejected_at": at} for b in bad],
        on=("source_path", "sha256"))


# -- the stage ------------------------------------------------------------------------------
class IngestStage(RowStage):
    """Anchors from files and tables (see the module docstring). An item whose file is already
    an anchor (or a recorded copy of one) is not read again, but captions it brings that the
    anchor lacks are added; a file with the same bytes as an anchor adds its captions to that
    anchor and is recorded as a duplicate.

    Its items are outside the catalog: the runner leaves out those the catalog records
    (sql/queries/ingest.sql: `recorded`) unless --force."""

    name = "ingest"
    path_options = ("paths", "captions")
    table = "anchors"
    key = "item"
    recorded = "ingest.recorded"
    # the anchor a pending item's source made or duplicates (only its new captions are added)
    columns = ("item, coalesce((SELECT min(a.anchor_id) FROM anchors a "
               "WHERE a.source_path = sel.source), (SELECT max(r.duplicate_of) FROM "
               "ingest_rejects r WHERE r.source_path = sel.source)) AS anchor_id")
    writes = {"anchors": {"sha256", "media", "source_path", "dataset", "width", "height",
                          "format", "orig_mode", "conversion", "external_id", "ingest_run",
                          "ingested_at"},
              "anchor_captions": {"anchor_id", "caption", "source"},
              "ingest_rejects": {"source_path", "reason", "sha256", "duplicate_of", "run_id",
                                 "rejected_at"}}
    batch_size = 16

    def __init__(self, paths: list[str | Path] | None = None,
                 captions: str | Path | None = None, max_pixels: int = MAX_PIXELS,
                 items: list[Item] | None = None):
        """paths: image folders, COCO captions JSON, jsonl/csv/parquet tables, HF dataset
        folders (captions: a captions table for a folder); or items already discovered."""
        if items is None:
            if not paths:
                raise UltracurateError("ingest needs at least one path")
            items = discover(list(paths), captions)
        super().__init__(paths=[str(p) for p in paths or []],
                         captions=str(captions) if captions else None, n_items=len(items),
                         max_pixels=max_pixels)
        self._items = items
        self.max_pixels = max_pixels
        self.anchors_added = 0
        self.captions_added = 0

    def items(self):
        import pyarrow as pa
        return pa.table({
            "item": pa.array(range(len(self._items)), pa.int64()),
            "source": pa.array([it.source for it in self._items], pa.string()),
            "captions": pa.array([it.captions for it in self._items],
                                 pa.list_(pa.string()))})

    def process(self, rows, prepared, ctx: Context) -> BatchResult:
        ws = ctx.workspace
        good, bad = [], []
        for row in rows:
            it = self._items[row["item"]]
            if it.reject:
                bad.append({"item": row["item"], "source_path": it.source,
                            "reason": it.reject, "sha256": None})
                continue
            captions = list(zip(it.captions, it.caption_sources))
            if row.get("anchor_id") is not None and not ctx.force:
                good.append({"item": row["item"], "anchor_id": row["anchor_id"],
                             "captions": captions})   # already an anchor: its new captions
                continue
            sha = None  # a reject records the bytes it was made of (None: unreadable)
            try:
                data = it.data if it.data is not None else read_bytes(it.source)
                sha = hashlib.sha256(data).hexdigest()
                info, _ = inspect_image(data, it.source, self.max_pixels)
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
                       "TIFF": "tif", "GIF": "gif"}.get(info.format, "img")
                name = ws.media.put_bytes(data, ext)
                good.append({"item": row["item"], "anchor": {
                    "sha256": sha, "media": name, "source_path": it.source,
                    "dataset": it.dataset, "width": info.width, "height": info.height,
                    "format": info.format, "orig_mode": info.mode,
                    "conversion": info.conversion, "external_id": it.external_id},
                    "captions": captions})
            except BadImage as e:
                bad.append({"item": row["item"], "source_path": it.source, "reason": str(e),
                            "sha256": sha})
        return BatchResult(extra={"good": good, "bad": bad},
                           failed={b["item"]: "" for b in bad})

    def write(self, w, result: BatchResult) -> None:
        if "good" not in result.extra:
            return  # the batch raised: nothing to record, its items stay pending for a rerun
        at = now()
        good = result.extra["good"]
        bad = list(result.extra["bad"])
        known = known_anchors(w, [g["anchor"]["sha256"] for g in good if "anchor" in g])
        rows, captions = [], []
        next_id = w.anchors.next_id()
        for g in good:
            a = g.get("anchor")
            if a is None:
                aid = g["anchor_id"]
            elif a["sha256"] in known:
                aid, path = known[a["sha256"]]
                if path != a["source_path"]:  # else: this very file, met again by --force
                    bad.append({"item": g["item"], "source_path": a["source_path"],
                                "sha256": a["sha256"], "duplicate_of": aid,
                                "reason": f"{a['source_path']}: duplicate of anchor {aid} "
                                          "(same bytes)"})
            else:
                aid = next_id
                next_id += 1
                known[a["sha256"]] = (aid, a["source_path"])
                rows.append({"anchor_id": aid, **a, "ingest_run": w.run_id, "ingested_at": at})
            captions += [{"anchor_id": aid, "caption": text, "source": source}
                         for text, source in g["captions"]]
        self.anchors_added += w.anchors.insert(rows)
        self.captions_added += w.anchor_captions.merge(captions, w.run_id)
        record_rejects(w, bad)
        result.failed = {b["item"]: "" for b in bad}

    def report(self, w) -> dict:
        missing = int(w.named("captions", "without_caption")[0]["n"])
        notes = [f"new anchors: {self.anchors_added}, new captions: {self.captions_added}"]
        if missing:
            notes.append(f"anchors without a caption: {missing}; write theirs with "
                         "`ultracurate caption` (or ingest a captions table for them)")
        return {"anchors_added": self.anchors_added, "captions_added": self.captions_added,
                "anchors_without_caption": missing, "notes": notes}
