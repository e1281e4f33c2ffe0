"""Import the published UltraEdit parquet layout (Hugging Face `BleachNick/UltraEdit` and its
subsets): parquet chunks of 2,000 rows, free-form splits and the region-based subset, columns
idx, source_caption, target_caption, edit_prompt, source_image, edited_image, edit_object,
mask_image, clip_sim_source, clip_sim_target, clip_sim_dir, clip_sim_image, dinov2_sim, ssim.

Each published row becomes
  an anchor     its source_image bytes (the released source is the model's regeneration of the
                real photo, not the photo; dataset = `ultraedit:<split>`),
  an edit       instruction = edit_prompt, captions, edit_object, mode `region` when the row has
                a mask (stored as COCO RLE with its area and box) else `free`, and an edit_type
                guessed from the instruction's words (the release has none),
  a candidate   edited_image bytes, the published scores, auto_status `scored`, so that the
                filter, balance and review stages and a re-score run over it.
Image bytes go into the media store unchanged. The import is a stage run (`import-ultraedit`,
recorded in `runs`, with a progress bar) and idempotent: a row is one edit, whatever the runs
and files it comes in.
- Its identity is `ultraedit:<split>:<idx>` (the edit's external_id; a file without an idx
  column, or a row whose idx is null, uses `<file stem>#<row>` for idx): rows already imported
  are skipped, even with --force, so an interrupted import resumes; an idx repeated in the
  files is imported once (its first row not already rejected). `--limit N` takes the first N
  rows of the files.
- A row whose image does not decode is recorded in ingest_rejects (source `<file>#<row>`, with
  the sha256 of its image bytes) and skipped by later runs, as photo ingest skips a rejected
  file; --force retries it, and a retry over the same bytes adds no second reject row.
So a second import of the same files changes no table (it records only its run).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any


from ..catalog import now
from ..errors import UltracurateError
from ..images import BadImage, inspect_image
from ..names import FEATURE_COLUMNS, PUBLISHED_SCORES
from ..runner import BatchResult, Context, RowStage
from ..stages.ingest import known_anchors, record_rejects

PUBLISHED_COLUMNS = ("source_caption", "target_caption", "edit_prompt", "source_image",
                     "edited_image")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif",
               "GIF": "gif"}
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


# -- the layout ------------------------------------------------------------------------------
def parquet_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix == ".parquet" else []
    if p.is_dir():
        return sorted(f for f in p.rglob("*.parquet") if not any(
            part.startswith(".") for part in f.relative_to(p).parts))
    return []


def is_ultraedit_layout(path: str | Path) -> bool:
    """True when path is a parquet file, or a folder of them, in the published schema."""
    import pyarrow.parquet as pq
    files = parquet_files(path)
    if not files:
        return False
    try:
        names = set(pq.read_schema(files[0]).names)
    except Exception:
        return False
    return set(PUBLISHED_COLUMNS) <= names


def split_of(file: Path) -> str:
    """The split a chunk belongs to: `<split>-00012-of-00099.parquet` (the hub's naming), else
    the file's stem."""
    m = _SHARD.match(file.stem)
    return m.group("split") if m else file.stem


_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
           "white", "gray", "grey", "golden", "silver", "color", "colour")
_GLOBAL = ("style", "painting", "sketch", "cartoon", "watercolor", "weather", "season",
           "night", "sunset", "sunrise", "winter", "summer", "autumn", "spring", "snow", "rain",
           "lighting", "atmosphere", "whole", "entire", "scene", "photo", "image", "picture",
           "vintage", "black and white")


def guess_edit_type(instruction: str, edit_object: str | None) -> str:
    """One of the nine edit types from the instruction's words (the published data carries
    none): a keyword rule, good enough to rebalance by, recorded as a guess."""
    s = " " + re.sub(r"[^a-z ]", " ", (instruction or "").lower()) + " "
    has_object = bool(edit_object) and edit_object.strip().upper() != "NONE"

    def any_of(words):
        return any(f" {w} " in s for w in words)

    if any_of(("replace", "swap", "substitute")) or " instead of " in s:
        return "replace"
    if re.search(r" (turn|transform|convert) .* into ", s):
        return "turn"
    if any_of(("add", "put", "place", "insert", "include")):
        return "add"
    if any_of(("move", "rotate", "resize", "bigger", "smaller", "larger", "shrink", "enlarge",
               "flip", "zoom")):
        return "transform_local" if has_object else "transform_global"
    if any_of(_COLORS):
        return "change_color"
    if any_of(_GLOBAL) and not has_object:
        return "change_global"
    if any_of(("change", "make", "alter", "modify")):
        return "change_local" if has_object else "change_global"
    return "others"


# -- reading rows ------------------------------------------------------------------------------
class _Index:
    """Which (file, row) each item is, with the rows' published idx, read from the idx column
    alone (images are read per batch)."""

    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq
        self.files = files
        self.items: list[tuple[int, int]] = []
        self.keys: list[str] = []
        for fi, f in enumerate(files):
            pf = pq.ParquetFile(f)
            n = pf.metadata.num_rows
            idx = (pf.read(columns=["idx"]).column("idx").to_pylist()
                   if "idx" in pf.schema_arrow.names else [None] * n)
            split = split_of(f)
            for r in range(n):
                self.items.append((fi, r))
                # without an idx, the row's place: row numbers restart in every chunk
                self.keys.append(f"ultraedit:{split}:"
                                 + (str(idx[r]) if idx[r] is not None else f"{f.stem}#{r}"))

    def source(self, item: int) -> str:
        """Where item is, as rejects and anchors record it: `<file>#<row>`."""
        fi, r = self.items[item]
        return f"{self.files[fi]}#{r}"

    def read(self, items: list[int]) -> list[dict]:
        """The rows of items (any order), reading only the row groups that hold them."""
        import pyarrow.parquet as pq
        by_file: dict[int, list[tuple[int, int]]] = {}
        for it in items:
            fi, r = self.items[it]
            by_file.setdefault(fi, []).append((it, r))
        out: dict[int, dict] = {}
        for fi, wanted in by_file.items():
            pf = pq.ParquetFile(self.files[fi])
            starts, s = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(s)
                s += pf.metadata.row_group(g).num_rows
            groups = sorted({max(g for g, st in enumerate(starts) if st <= r) for _, r in wanted})
            table = pf.read_row_groups(groups)
            first = {g: sum(pf.metadata.row_group(x).num_rows for x in groups if x < g)
                     for g in groups}
            for it, r in wanted:
                g = max(g for g, st in enumerate(starts) if st <= r)
                row = table.slice(first[g] + r - starts[g], 1).to_pylist()[0]
                row["_file"], row["_row"], row["_source"] = str(self.files[fi]), r, \
                    self.source(it)
                out[it] = row
        return [out[it] for it in items]


def _row_sha256(row: dict) -> str:
    """The sha256 of a row's image bytes (source, edited, mask, each length-prefixed): what a
    reject of the row records, so that a retry can tell the same bytes from new ones."""
    h = hashlib.sha256()
    for col in ("source_image", "edited_image", "mask_image"):
        b = _image_bytes(row.get(col)) or b""
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _image_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


# -- the stage ---------------------------------------------------------------------------------
class UltraEditImportStage(RowStage):
    """Published rows (outside items: `<file>#<row>`) into anchors, edits and candidates.

    A row is one edit, whatever the runs and files it comes in: rows whose edit is already
    imported are not work at all, even with --force (`default_where`), and of the rows naming
    one edit the runner takes the first pending one (`identity`); rejected rows wait for
    --force (sql/queries/ultraedit.sql `rejected`, left out by the runner)."""

    name = "import-ultraedit"
    path_options = ("paths",)
    table = "candidates"
    key = "item"
    recorded = "ultraedit.rejected"
    identity = "ident"
    default_where = ("ident NOT IN (SELECT external_id FROM edits "
                     "WHERE external_id LIKE 'ultraedit:%')")
    columns = "item, ident"
    batch_size = 64
    writes = {"anchors": {"sha256", "media", "width", "height", "format", "orig_mode",
                          "conversion", "source_path", "dataset", "external_id",
                          "ingest_run", "ingested_at"},
              "anchor_captions": {"anchor_id", "source", "caption"},
              "edits": {"anchor_id", "source_caption", "instruction", "target_caption",
                        "edit_object", "edit_type", "mode", "edit_status", "instruct_backend",
                        "instruct_model", "prompt_version", "instruct_run", "external_id",
                        "mask_rle", "mask_height", "mask_width", *FEATURE_COLUMNS,
                        "created_at"},
              "candidates": {"edit_id", "candidate_index", "seed", "gen_behaviour",
                             "gen_params", "source_image", "source_is_anchor", "edited_image",
                             "gen_run", *PUBLISHED_SCORES, "score_run", "auto_status",
                             "created_at"},
              "ingest_rejects": {"source_path", "reason", "sha256", "duplicate_of", "run_id",
                                 "rejected_at"}}

    def __init__(self, paths: list[str | Path]):
        """paths: parquet files of the published layout, or folders of them (a clone of the
        hub repo)."""
        files: dict[Path, None] = {}
        for p in map(Path, paths):
            if not p.exists():
                raise UltracurateError(f"{p}: no such file or folder")
            if not is_ultraedit_layout(p):
                raise UltracurateError(f"{p}: not UltraEdit's published parquet layout (needs "
                                       f"columns {', '.join(PUBLISHED_COLUMNS)})")
            # absolute, so that a row's source is the same from any folder; a file named
            # twice (itself and its folder) is read once
            files.update((f.resolve(), None) for f in parquet_files(p))
        super().__init__(files=[str(f) for f in files])
        self.index = _Index(list(files))

    def items(self):
        import pyarrow as pa
        n = len(self.index.items)
        return pa.table({"item": pa.array(range(n), pa.int64()),
                         "ident": pa.array(self.index.keys, pa.string()),
                         "source": pa.array([self.index.source(i) for i in range(n)],
                                            pa.string())})

    def prepare(self, rows, ctx: Context):
        return self.index.read([r["item"] for r in rows])

    def process(self, rows, prepared, ctx: Context) -> BatchResult:
        from .. import masks
        ws = ctx.workspace
        good, bad = [], []
        for row, data in zip(rows, prepared):
            where = data["_source"]
            try:
                media = {}
                for col in ("source_image", "edited_image"):
                    b = _image_bytes(data.get(col))
                    if b is None:
                        raise BadImage(f"{where}: no {col.replace('_', ' ')}")
                    info, _ = inspect_image(b, f"{where} {col}")
                    media[col] = (b, info)
                rec: dict[str, Any] = {"key": self.index.keys[row["item"]], "where": where,
                                       "split": split_of(Path(data["_file"])),
                                       "idx": data.get("idx"), "row": data}
                src, sinfo = media["source_image"]
                rec["anchor"] = {
                    "sha256": hashlib.sha256(src).hexdigest(),
                    "media": ws.media.put_bytes(src, _FORMAT_EXT.get(sinfo.format, "img")),
                    "width": sinfo.width, "height": sinfo.height, "format": sinfo.format,
                    "orig_mode": sinfo.mode, "conversion": sinfo.conversion}
                ed, einfo = media["edited_image"]
                rec["edited"] = ws.media.put_bytes(ed, _FORMAT_EXT.get(einfo.format, "img"))
                mb = _image_bytes(data.get("mask_image"))
                rec["mask"] = None
                if mb is not None:
                    _, mim = inspect_image(mb, f"{where} mask_image")
                    import numpy as np
                    m = np.asarray(mim.convert("L")) > 127
                    f = masks.features(m)
                    rec["mask"] = {"mask_rle": masks.encode(m), "mask_height": m.shape[0],
                                   "mask_width": m.shape[1], **f.columns()}
                good.append(rec)
            except BadImage as e:
                bad.append({"item": row["item"], "source_path": where, "reason": str(e),
                            "sha256": _row_sha256(data)})
        return BatchResult(extra={"good": good, "bad": bad},
                           failed={b["item"]: b["reason"] for b in bad})

    def write(self, w, result: BatchResult) -> None:
        if "good" not in result.extra:
            return  # the batch raised: nothing to record, its rows stay pending
        at = now()
        run_id = w.run_id
        good = result.extra["good"]
        known = {sha: aid for sha, (aid, _) in
                 known_anchors(w, [g["anchor"]["sha256"] for g in good]).items()}
        anchor_id = w.anchors.next_id()
        edit_id = w.edits.next_id()
        cand_id = w.candidates.next_id()
        anchors, captions, edits, cands = [], [], [], []
        for g in good:
            d = g["row"]
            a = g["anchor"]
            if a["sha256"] not in known:
                known[a["sha256"]] = anchor_id
                anchors.append({"anchor_id": anchor_id, **a, "source_path": g["where"],
                                "dataset": f"ultraedit:{g['split']}",
                                "external_id": f"{g['split']}:{g['idx']}",
                                "ingest_run": run_id, "ingested_at": at})
                anchor_id += 1
            # every row's source caption is kept (merged, de-duplicated) on its anchor
            captions.append({"anchor_id": known[a["sha256"]], "source": "ultraedit",
                             "caption": d.get("source_caption")})
            mask = g["mask"] or {}
            obj = d.get("edit_object")
            mode = "region" if g["mask"] else "free"
            edits.append({
                "edit_id": edit_id, "anchor_id": known[a["sha256"]],
                "source_caption": d.get("source_caption") or "",
                "instruction": d.get("edit_prompt") or "",
                "target_caption": d.get("target_caption") or "",
                "edit_object": obj if obj else "NONE",
                "edit_type": guess_edit_type(d.get("edit_prompt"), obj),
                "mode": mode, "edit_status": "grounded" if mode == "region" else "proposed",
                "instruct_backend": "published", "instruct_model": "BleachNick/UltraEdit",
                "prompt_version": "edit_type=keyword-guess", "instruct_run": run_id,
                "external_id": g["key"], **mask, "created_at": at})
            cands.append({
                "candidate_id": cand_id, "edit_id": edit_id, "candidate_index": 0,
                "seed": -1,  # not published
                "gen_behaviour": "published",
                "gen_params": json.dumps({"source": "BleachNick/UltraEdit", "split": g["split"],
                                          "idx": g["idx"], "file": d["_file"],
                                          "row": d["_row"]}),
                "source_image": a["media"], "source_is_anchor": True,
                "edited_image": g["edited"], "gen_run": run_id,
                **{s: (float(d[s]) if d.get(s) is not None else None)
                   for s in PUBLISHED_SCORES},
                "score_run": run_id, "auto_status": "scored", "created_at": at})
            edit_id += 1
            cand_id += 1
        w.anchors.insert(anchors)
        w.anchor_captions.merge(captions, run_id)
        w.edits.insert(edits)
        w.candidates.insert(cands)
        record_rejects(w, result.extra["bad"])
