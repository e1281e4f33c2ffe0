"""Import instruction files that already exist as `edits` rows.

Formats:
- ultraedit: UltraEdit's generation jsonl (`edit_instruction`, `input_text`, `input_image`,
  `output_text`, `global_idx`, `edit_object`; `edit_type` when present).
- ip2p: InstructPix2Pix's caption edits jsonl (`input`, `edit`, `output`; an optional image
  column `image`/`input_image`/`path`).
- magicbrush: MagicBrush's `edit_sessions.json` ({img_id: [{input, mask, instruction,
  output}, ...]}, images under images/<img_id>/, captions from global_descriptions.json when
  it is there), or a jsonl/json/parquet table with `instruction` and `source_img`/`input`.

A record whose image exists becomes (or finds, by content hash) an anchor through the ingest
stage; a record without an image is attached to the anchor that has its source caption among
its captions. Records that cannot be placed are counted with their reason, never half-written.
Importing the same file again adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..catalog import normalize_caption, now
from ..errors import UltracurateError
from ..names import EDIT_MODES, EDIT_TYPES
from ..runner import SetStage
from .captions import COLOURS
from .validation import NONE, normalize_type

FORMATS = ("ultraedit", "ip2p", "magicbrush")
IMAGE_KEYS = ("input_image", "image", "path", "source_img", "image_path")


@dataclass
class ImportRecord:
    instruction: str
    source_caption: str = ""
    target_caption: str = ""
    edit_object: str | None = None
    edit_type: str | None = None
    image: str | None = None        # a file path
    data: bytes | None = None       # or the image's bytes (parquet Image column)
    external_id: str | None = None


# -- reading ----------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path).to_dicts()
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except (json.JSONDecodeError, OSError, pl.exceptions.PolarsError) as e:
        raise UltracurateError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def _resolve(value, base: Path, images_root: Path | None) -> str | None:
    if not value or not isinstance(value, str):
        return None
    p = Path(value)
    if not p.is_absolute():
        p = (images_root or base) / p
    return str(p.resolve())


def _str(v) -> str:
    return " ".join(str(v).split()) if v is not None else ""


def read_records(path: str | Path, fmt: str, images_root: str | Path | None = None
                 ) -> list[ImportRecord]:
    path = Path(path)
    if not path.exists():
        raise UltracurateError(f"{path}: no such file")
    if fmt not in FORMATS:
        raise UltracurateError(f"unknown format '{fmt}' ({', '.join(FORMATS)})")
    root = Path(images_root).resolve() if images_root else None
    base = path.parent
    if fmt == "magicbrush" and path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return _magicbrush_sessions(path, data, root)
    out = []
    for i, row in enumerate(_rows(path)):
        if not isinstance(row, dict):
            raise UltracurateError(f"{path}: record {i + 1} is not an object")
        if fmt == "ultraedit":
            _need(path, i, row, ("edit_instruction", "input_text"))
            out.append(ImportRecord(
                _str(row["edit_instruction"]), _str(row["input_text"]),
                _str(row.get("output_text")), _object(row.get("edit_object")),
                row.get("edit_type"), _resolve(row.get("input_image"), base, root),
                external_id=_str(row.get("global_idx", i))))
        elif fmt == "ip2p":
            _need(path, i, row, ("input", "edit", "output"))
            img = next((row[k] for k in IMAGE_KEYS if row.get(k)), None)
            out.append(ImportRecord(_str(row["edit"]), _str(row["input"]),
                                    _str(row["output"]), image=_resolve(img, base, root),
                                    external_id=str(i)))
        else:
            _need(path, i, row, ("instruction",))
            img = row.get("source_img", row.get("input"))
            rec = ImportRecord(_str(row["instruction"]),
                               _str(row.get("source_caption", row.get("input_caption"))),
                               _str(row.get("target_caption", row.get("output_caption"))),
                               external_id=_str(row.get("img_id", i)) + (
                                   f":{row['turn_index']}" if "turn_index" in row else ""))
            if isinstance(img, dict) and img.get("bytes"):
                rec.data = img["bytes"]
                rec.image = f"{path}#{i}"
            else:
                rec.image = _resolve(img, base, root)
            out.append(rec)
    return out


def _need(path: Path, i: int, row: dict, keys) -> None:
    for k in keys:
        if k not in row:
            raise UltracurateError(f"{path}: record {i + 1} has no '{k}' field")


def _object(v) -> str | None:
    if v is None:
        return None
    s = _str(v)
    return NONE if s.upper() in ("", "NONE", "NULL") else s


def _magicbrush_sessions(path: Path, data: dict, root: Path | None) -> list[ImportRecord]:
    images = root or path.parent / "images"
    captions: dict = {}
    desc = path.parent / "global_descriptions.json"
    if desc.exists():
        for sess in json.loads(desc.read_text()).values():
            if isinstance(sess, dict):
                captions.update({k: _str(v) for k, v in sess.items()})
    out = []
    for img_id, turns in data.items():
        for turn, t in enumerate(turns, 1):
            src = images / str(img_id) / str(t.get("input", ""))
            out.append(ImportRecord(
                _str(t.get("instruction")), captions.get(t.get("input"), ""),
                captions.get(t.get("output"), ""), image=str(src.resolve()),
                external_id=f"{img_id}:{turn}"))
    return out


# -- edit types of imported instructions ---------------------------------------------------
_STYLE = r"painting|sketch|cartoon|style|watercolou?r|pixel art|anime|drawing|illustration"
_SCENE = (r"\b(night|nighttime|winter|summer|spring|autumn|fall|snow\w*|rain\w*|sunset|"
          r"sunrise|dusk|dawn|fog\w*|storm\w*|season|weather|sunny|cloudy|daytime)\b")


def infer_edit_type(instruction: str) -> str:
    """One of the nine types for an instruction that came without one (keyword rules)."""
    s = instruction.lower()
    words = set(re.findall(r"[a-z]+", s))
    if re.search(r"\b(replace|swap|substitute)\b|\binstead of\b", s):
        return "replace"
    if re.search(r"\b(turn|transform|convert)\b.*\binto\b", s):
        if re.search(_STYLE, s) and re.search(r"\b(it|image|photo|picture|scene)\b", s):
            return "transform_global"
        return "turn"
    if re.search(_STYLE, s):
        return "transform_global"
    if re.search(r"\b(remove|delete|erase|write|text|sign|says?|number)\b", s) or \
            re.search(r"\d", s):
        return "others"
    if re.search(r"\b(add|put|place|insert|include|wear|wearing)\b", s) or \
            s.startswith(("give ", "let ")):
        return "add"
    if re.search(_SCENE, s):
        return "change_global"
    if words & COLOURS or re.search(r"\bcolou?r\b|\bpaint\b", s):
        return "change_color"
    if re.search(r"\b(bigger|smaller|larger|taller|shorter|shape|round|bend|stretch|jump\w*|"
                 r"pose|melt\w*|rotate|tilt|size|wider|thinner)\b", s):
        return "transform_local"
    if re.search(r"\b(make|change|have)\b", s):
        return "change_local"
    return "others"


# -- importing -----------------------------------------------------------------------------
def import_instructions(ws, path: str | Path, fmt: str, *, images_root: str | Path | None = None,
                        mode: str = "auto", progress: bool = True) -> dict:
    """`run(ws, "import-instructions", path=path, format=fmt, ...)`: its counts (records,
    imported, skipped, anchors_created, reasons) and the run id."""
    from ..runner import run
    return run(ws, "import-instructions", path=path, format=fmt, images=images_root,
               mode=mode, progress=progress).result


class ImportInstructionsStage(SetStage):
    """Import an instruction file as edits, in one transaction. Its images become anchors
    first (an ingest run: it dedups by content and resumes); a record without a usable image
    is matched to an anchor by its source caption, else skipped with the reason."""

    name = "import-instructions"
    path_options = ("path", "images")
    table = None
    writes = {"edits": {"anchor_id", "source_caption", "instruction", "target_caption",
                        "edit_object", "edit_type", "mode", "edit_status", "instruct_backend",
                        "external_id", "instruct_run", "created_at"}}

    def __init__(self, path: str | Path, format: str, images: str | Path | None = None,
                 mode: str = "auto"):
        from ..stages.ingest import Item
        if mode not in EDIT_MODES:
            raise UltracurateError(f"unknown mode '{mode}' ({', '.join(EDIT_MODES)})")
        self.fmt, self.mode = format, mode
        self.records = read_records(path, format, images)
        # anchors for the records whose image exists
        self.items: dict[str, Item] = {}
        for r in self.records:
            if r.image and (r.data is not None or Path(r.image).is_file()):
                it = self.items.setdefault(r.image, Item(r.image, [], f"import-{format}", None,
                                                         r.data,
                                                         caption_source=f"import:{format}"))
                it.add_caption(r.source_caption)
        super().__init__(path=str(path), format=format, mode=mode)

    def requires(self) -> list:
        from ..stages.ingest import IngestStage
        return [IngestStage(items=list(self.items.values()))] if self.items else []

    def plan(self, r, selection):
        fmt, mode = self.fmt, self.mode
        reasons: Counter = Counter()
        created = sum(b.extra.get("anchors_added", 0) for b in self.before)
        by_sha = {row["sha256"]: row["anchor_id"]
                  for row in r.query("SELECT sha256, anchor_id FROM anchors")}
        by_caption = {row["caption"]: row["anchor_id"] for row in r.query(
            "SELECT caption, min(anchor_id) AS anchor_id FROM anchor_captions "
            "WHERE invalid_reason IS NULL GROUP BY caption")}
        first_caption = {row["anchor_id"]: row["caption"] for row in r.query(
            "SELECT anchor_id, captions[1] AS caption FROM anchors_v")}
        anchor_of: dict[str, int] = {}
        for src, it in self.items.items():
            try:
                data = it.data if it.data is not None else Path(src).read_bytes()
            except OSError:
                continue
            aid = by_sha.get(hashlib.sha256(data).hexdigest())
            if aid is not None:
                anchor_of[src] = aid
        backend = f"import:{fmt}"
        seen = {(row["anchor_id"], row["instruction"], row["external_id"]) for row in r.query(
            "SELECT anchor_id, instruction, external_id FROM edits WHERE instruct_backend = ?",
            [backend])}
        rows = []
        for rec in self.records:
            if not rec.instruction:
                reasons["empty instruction"] += 1
                continue
            aid = anchor_of.get(rec.image) if rec.image else None
            if aid is None and rec.image and rec.image in self.items:
                reasons["image could not be ingested (see ingest_rejects)"] += 1
                continue
            if aid is None:
                aid = by_caption.get(normalize_caption(rec.source_caption))
            if aid is None:
                reasons["image not found and no anchor has its source caption" if rec.image
                        else "no image and no anchor has its source caption"] += 1
                continue
            if (aid, rec.instruction, rec.external_id) in seen:
                reasons["already imported"] += 1
                continue
            seen.add((aid, rec.instruction, rec.external_id))
            t = normalize_type(rec.edit_type) if rec.edit_type else None
            edit_type = t if t in EDIT_TYPES else infer_edit_type(rec.instruction)
            obj = rec.edit_object
            region = obj not in (None, NONE)
            rows.append({
                "anchor_id": aid,
                "source_caption": rec.source_caption or first_caption.get(aid) or "",
                "instruction": rec.instruction, "target_caption": rec.target_caption,
                "edit_object": obj, "edit_type": edit_type,
                "mode": mode if mode != "auto" else ("region" if region else "free"),
                "edit_status": "proposed", "instruct_backend": backend,
                "external_id": rec.external_id})
        return rows, reasons, created

    def apply(self, w, plan, produced) -> dict:
        rows, reasons, created = plan
        first = w.edits.next_id()
        at = now()
        for k, row in enumerate(rows):
            row.update(edit_id=first + k, instruct_run=w.run_id, created_at=at)
        w.edits.insert(rows)
        skipped = sum(reasons.values())
        w.run.rows_in, w.run.rows_done, w.run.rows_failed = len(self.records), len(rows), skipped
        return {"run_id": w.run_id, "records": len(self.records), "imported": len(rows),
                "skipped": skipped, "anchors_created": created, "reasons": dict(reasons)}
