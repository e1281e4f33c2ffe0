"""Is an answer (an LLM's text, or the rule back-end's dict) a usable edit instruction?

An answer is accepted only if it parses as one JSON object, its edit type is one of the nine
(and the one asked for), the target caption differs from the source caption, a local edit's
object occurs in the source caption, and its lengths are sane. Every failed check gives a
one-line reason; all reasons of an answer are returned together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..names import EDIT_TYPES
from .captions import contains_phrase, word_count

GLOBAL_TYPES = ("change_global", "transform_global")
# Types that always change one object, so they need an edit object.
OBJECT_TYPES = ("change_local", "change_color", "transform_local", "replace", "turn")
NONE = "NONE"

MAX_INSTRUCTION_WORDS = 40
MAX_INSTRUCTION_CHARS = 300
MAX_CAPTION_WORDS = 80
MAX_OBJECT_WORDS = 8
MAX_CAPTION_GROWTH = 30   # words a target caption may add to its source


@dataclass
class Proposal:
    """A validated edit: what becomes an `edits` row."""

    instruction: str
    target_caption: str
    edit_object: str          # 'NONE' for a global edit
    edit_type: str

    @property
    def is_local(self) -> bool:
        return self.edit_object != NONE

    def to_json(self) -> dict:
        return {"instruction": self.instruction, "target_caption": self.target_caption,
                "edit_object": self.edit_object, "edit_type": self.edit_type}


def normalize_type(value: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(value).strip().lower())


def parse_answer(answer: str | dict) -> tuple[dict | None, str | None]:
    """The answer as a dict, or (None, reason). Tolerates a ```json fence and prose around
    the one object, as chat models often add them."""
    if isinstance(answer, dict):
        return answer, None
    if answer is None or not str(answer).strip():
        return None, "empty answer"
    text = str(answer).strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    if fence:
        text = fence.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None, "answer is not JSON"
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError as e:
            return None, f"answer is not valid JSON ({e.msg})"
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return None, f"answer is a JSON {type(data).__name__}, not an object"
    return data, None


def validate(answer: str | dict, source_caption: str, requested_type: str | None = None
             ) -> tuple[Proposal | None, list[str]]:
    """(Proposal, []) when the answer is usable, else (None, reasons)."""
    data, err = parse_answer(answer)
    if err:
        return None, [err]
    reasons: list[str] = []
    fields: dict[str, str] = {}
    for key in ("instruction", "target_caption", "edit_type"):
        v = data.get(key)
        if v is None:
            reasons.append(f"missing field '{key}'")
        elif not isinstance(v, str):
            reasons.append(f"field '{key}' is a {type(v).__name__}, not a string")
        elif not v.strip():
            reasons.append(f"field '{key}' is empty")
        else:
            fields[key] = " ".join(v.split())
    obj = data.get("edit_object", NONE)
    if obj is None or (isinstance(obj, str) and obj.strip().upper() in ("", "NONE", "NULL")):
        obj = NONE
    elif not isinstance(obj, str):
        reasons.append(f"field 'edit_object' is a {type(obj).__name__}, not a string")
        obj = NONE
    else:
        obj = " ".join(obj.split())
    if reasons:
        return None, reasons

    edit_type = normalize_type(fields["edit_type"])
    if edit_type not in EDIT_TYPES:
        reasons.append(f"edit type '{fields['edit_type']}' is not one of the nine")
    elif requested_type and edit_type != requested_type:
        reasons.append(f"asked for a {requested_type} edit, got {edit_type}")
    instruction, target = fields["instruction"], fields["target_caption"]
    if _norm(target) == _norm(source_caption):
        reasons.append("target caption equals the source caption")
    if _norm(instruction) == _norm(target):
        reasons.append("instruction repeats the target caption")
    if word_count(instruction) < 2:
        reasons.append("instruction is shorter than 2 words")
    if word_count(instruction) > MAX_INSTRUCTION_WORDS or len(instruction) > MAX_INSTRUCTION_CHARS:
        reasons.append(f"instruction is longer than {MAX_INSTRUCTION_WORDS} words")
    limit = min(MAX_CAPTION_WORDS, word_count(source_caption) + MAX_CAPTION_GROWTH)
    if word_count(target) > limit:
        reasons.append(f"target caption is longer than {limit} words")
    if word_count(target) < 2:
        reasons.append("target caption is shorter than 2 words")
    if edit_type in GLOBAL_TYPES:
        obj = NONE  # a global edit has no region, whatever the answer says
    elif obj != NONE:
        if word_count(obj) > MAX_OBJECT_WORDS:
            reasons.append(f"edit object is longer than {MAX_OBJECT_WORDS} words")
        elif not contains_phrase(source_caption, obj):
            reasons.append(f"edit object '{obj}' does not occur in the source caption")
    elif edit_type in OBJECT_TYPES:
        reasons.append(f"a {edit_type} edit needs an edit object")
    if reasons:
        return None, reasons
    return Proposal(instruction, target, obj, edit_type), []


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()
