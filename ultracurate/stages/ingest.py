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

A rerun skips what was recorded (anchors and rejects, by source), except for sources that bring
captions their anchor lacks (only those captions are added; the file is not read again);
`--force` looks at every source again, and a source rejected before for the same bytes adds no
second reject row (`recorded_sources` and `record_rejects`, shared with the UltraEdit importer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ..catalog import Catalog, named_queries, normalize_caption, now
from ..errors import UltracurateError, reason_text
from ..images import MAX_PIXELS, BadImage, inspect_image, read_bytes
from ..runner import BatchResult, Context, Stage
from ..selection import Selection

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
def recorded_sources(cat: Catalog, anchors: bool = True) -> set[str]:
    """Sources an ingest has recorded, as a reject (and, with anchors, as an anchor): a rerun
    without --force skips them."""
    sql = "SELECT source_path FROM ingest_rejects"
    if anchors:
        sql += " UNION SELECT source_path FROM anchors"
    return {r[0] for r in cat.con.execute(sql).fetchall()}


def known_anchors(cat: Catalog, shas: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (anchor_id, source_path) of the anchors among shas."""
    shas = list(dict.fromkeys(shas))
    if not shas:
        return {}
    # a literal IN list: DuckDB answers it from the sha256 index, `IN (SELECT unnest(?))`
    # scans the table (bench/catalog.py: anchor_lookup)
    marks = ", ".join("?" * len(shas))
    return {sha: (aid, src) for sha, aid, src in cat.con.execute(
        f"SELECT sha256, anchor_id, source_path FROM anchors WHERE sha256 IN ({marks})",
        shas).fetchall()}


def record_rejects(cat: Catalog, bad: list[dict], run_id: int) -> None:
    """Insert bad ({source_path, reason, sha256, duplicate_of}) into ingest_rejects, once per
    source and bytes: a source already rejected for the same bytes (a forced rerun, the same
    row twice in a batch) adds no row. Reasons are stored one line, without object reprs."""
    if not bad:
        return
    once: dict[tuple, dict] = {}
    for b in bad:
        once.setdefault((b["source_path"], b.get("sha256")), b)
    at = now()
    df = pl.DataFrame([{"source_path": b["source_path"], "reason": reason_text(b["reason"]),
                        "sha256": b.get("sha256"), "duplicate_of": b.get("duplicate_of"),
                        "run_id": run_id, "rejected_at": at}
                       for b in once.values()],
                      schema_overrides={"sha256": pl.String, "duplicate_of": pl.Int64})
    cat.con.register("_rejects", df.to_arrow())
    try:
        cat.con.execute(
            "INSERT INTO ingest_rejects (source_path, reason, sha256, duplicate_of, run_id, "
            "rejected_at) SELECT source_path, reason, sha256, duplicate_of, run_id, "
            "rejected_at FROM _rejects r "
            "WHERE NOT EXISTS (SELECT 1 FROM ingest_rejects x WHERE x.source_path = "
            "r.source_path AND x.sha256 IS NOT DISTINCT FROM r.sha256)")
    finally:
        cat.con.unregister("_rejects")


# -- the stage ------------------------------------------------------------------------------
class IngestStage(Stage):
    """Anchors from items. An item whose file is already an anchor (or a recorded copy of one)
    is not read again, but captions it brings that the anchor lacks are added; a file with
    the same bytes as an anchor adds its captions to that anchor and is recorded as a
    duplicate."""

    name = "ingest"
    table = "anchors"
    writes = {"anchors": {"sha256", "media", "source_path", "dataset", "width", "height",
                          "format", "orig_mode", "conversion", "external_id", "ingest_run",
                          "ingested_at"}}
    batch_size = 16
    track_state = False

    def __init__(self, items: list[Item], max_pixels: int = MAX_PIXELS):
        super().__init__(n_items=len(items), max_pixels=max_pixels)
        self._items = items
        self.max_pixels = max_pixels
        self.anchors_added = 0
        self.captions_added = 0

    def items(self, cat: Catalog, selection: Selection, force: bool) -> pl.DataFrame:
        """Sources not yet recorded (as an anchor or a reject), so an ingest resumes; and
        recorded ones (anchors, copies of anchors) that bring captions their anchor lacks,
        with that anchor's id. force: every item, read again."""
        n = len(self._items)
        if force:
            return pl.DataFrame({"item": range(n), "anchor_id": [None] * n},
                                schema={"item": pl.Int64, "anchor_id": pl.Int64})
        import pyarrow as pa
        cat.con.register("_sources", pa.table({
            "item": pa.array(range(n), pa.int64()),
            "source": pa.array([it.source for it in self._items], pa.string())}))
        cat.con.register("_item_captions", pa.table({
            "item": pa.array([i for i, it in enumerate(self._items) for _ in it.captions],
                             pa.int64()),
            "caption": pa.array([c for it in self._items for c in it.captions], pa.string())}))
        try:
            seen = cat.pl(named_queries("ingest")["recorded_items"])
        finally:
            cat.con.unregister("_sources")
            cat.con.unregister("_item_captions")
        # recorded: skipped, unless its anchor lacks some of its captions (then only those)
        todo = pl.DataFrame({"item": range(n)}, schema={"item": pl.Int64}).join(
            seen, on="item", how="left")
        return todo.filter(pl.col("new_captions").is_null() | (
            (pl.col("new_captions") > 0) & pl.col("anchor_id").is_not_null())
        ).select("item", "anchor_id").sort("item")

    def key_of(self, row: dict) -> int:
        return row["item"]

    def process(self, rows, prepared, ctx: Context) -> BatchResult:
        ws = ctx.workspace
        good, bad = [], []
        for row in rows:
            it = self._items[row["item"]]
            if it.reject:
                bad.append({"source_path": it.source, "reason": it.reject, "sha256": None})
                continue
            captions = list(zip(it.captions, it.caption_sources))
            if row.get("anchor_id") is not None:  # already an anchor: its new captions only
                good.append({"anchor_id": row["anchor_id"], "captions": captions})
                continue
            sha = None  # a reject records the bytes it was made of (None: unreadable)
            try:
                data = it.data if it.data is not None else read_bytes(it.source)
                sha = hashlib.sha256(data).hexdigest()
                info, _ = inspect_image(data, it.source, self.max_pixels)
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
                       "TIFF": "tif", "GIF": "gif"}.get(info.format, "img")
                name = ws.media.put_bytes(data, ext)
                good.append({"anchor": {
                    "sha256": sha, "media": name, "source_path": it.source,
                    "dataset": it.dataset, "width": info.width, "height": info.height,
                    "format": info.format, "orig_mode": info.mode,
                    "conversion": info.conversion, "external_id": it.external_id},
                    "captions": captions})
            except BadImage as e:
                bad.append({"source_path": it.source, "reason": str(e), "sha256": sha})
        return BatchResult(extra={"good": good, "bad": bad},
                           failed={i: "" for i in range(len(bad))})

    def write(self, cat: Catalog, result: BatchResult, run_id: int) -> None:
        if "good" not in result.extra:
            return  # the batch raised: nothing to record, its items stay pending for a rerun
        at = now()
        good = result.extra["good"]
        bad = list(result.extra["bad"])
        known = known_anchors(cat, [g["anchor"]["sha256"] for g in good if "anchor" in g])
        rows, captions = [], []
        next_id = cat.next_id("anchors")
        for g in good:
            a = g.get("anchor")
            if a is None:
                aid = g["anchor_id"]
            elif a["sha256"] in known:
                aid, path = known[a["sha256"]]
                if path != a["source_path"]:  # else: this very file, met again by --force
                    bad.append({"source_path": a["source_path"], "sha256": a["sha256"],
                                "duplicate_of": aid,
                                "reason": f"{a['source_path']}: duplicate of anchor {aid} "
                                          "(same bytes)"})
            else:
                aid = next_id
                next_id += 1
                known[a["sha256"]] = (aid, a["source_path"])
                rows.append({"anchor_id": aid, **a, "ingest_run": run_id, "ingested_at": at})
            captions += [{"anchor_id": aid, "caption": text, "source": source}
                         for text, source in g["captions"]]
        if rows:
            cat.insert_rows("anchors", pl.DataFrame(rows, schema_overrides={
                "external_id": pl.String}))
        self.anchors_added += len(rows)
        self.captions_added += cat.add_captions(captions, run_id)
        record_rejects(cat, bad, run_id)
        result.failed = {i: "" for i in range(len(bad))}

    def report(self, cat: Catalog, run_id: int) -> dict:
        missing = cat.anchors_without_caption()
        notes = [f"new anchors: {self.anchors_added}, new captions: {self.captions_added}"]
        if missing:
            notes.append(f"anchors without a caption: {missing}; write theirs with "
                         "`ultracurate caption` (or ingest a captions table for them)")
        return {"anchors_added": self.anchors_added, "captions_added": self.captions_added,
                "anchors_without_caption": missing, "notes": notes}
