"""Human-written exemplars (the packaged ultracurate/data/exemplars.jsonl, or a user's own jsonl) and how a prompt
samples them: `n_instructions` bare instructions (for diversity of phrasing) and `n_full`
complete examples (for the answer's format), as UltraEdit did with 50 and 10 per call."""

from __future__ import annotations

import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UltracurateError
from ..names import EDIT_TYPES
from .validation import NONE, validate

FIELDS = ("id", "source_caption", "instruction", "target_caption", "edit_object", "edit_type")


@dataclass(frozen=True)
class Exemplar:
    id: str
    source_caption: str
    instruction: str
    target_caption: str
    edit_object: str
    edit_type: str

    def answer(self) -> dict:
        return {"instruction": self.instruction, "target_caption": self.target_caption,
                "edit_object": self.edit_object, "edit_type": self.edit_type}


def default_path() -> Path:
    """The packaged exemplars (ultracurate/data/exemplars.jsonl)."""
    return Path(str(importlib.resources.files("ultracurate").joinpath("data", "exemplars.jsonl")))


def load_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    """Read and check an exemplar file: every line must be a valid edit by the same rules an
    LLM's answer must meet, ids unique. A bad line raises one clear error naming it."""
    path = Path(path) if path else default_path()
    if not path.exists():
        raise UltracurateError(f"{path}: exemplar file not found")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UltracurateError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [f for f in FIELDS if f not in row and f != "edit_object"]
        if missing:
            raise UltracurateError(f"{path}:{n}: missing field '{missing[0]}'")
        row = {f: str(row.get(f) or NONE) if f == "edit_object" else str(row[f]) for f in FIELDS}
        if row["id"] in seen:
            raise UltracurateError(f"{path}:{n}: duplicate id '{row['id']}'")
        seen.add(row["id"])
        _, reasons = validate(row, row["source_caption"], row["edit_type"])
        if reasons:
            raise UltracurateError(f"{path}:{n} ({row['id']}): {reasons[0]}")
        out.append(Exemplar(**row))
    if not out:
        raise UltracurateError(f"{path}: no exemplars")
    return out


def by_type(exemplars: list[Exemplar]) -> dict[str, list[Exemplar]]:
    out: dict[str, list[Exemplar]] = {t: [] for t in EDIT_TYPES}
    for e in exemplars:
        out[e.edit_type].append(e)
    return out


def sample(exemplars: list[Exemplar], edit_type: str, n_instructions: int, n_full: int,
           rng: random.Random) -> tuple[list[Exemplar], list[Exemplar]]:
    """(instruction examples, full examples) for one call. The full examples hold up to two
    of the requested type (so the model sees what that type means), the rest drawn from all
    types; the instruction examples are drawn from all exemplars."""
    n_instructions = min(n_instructions, len(exemplars))
    instr = rng.sample(exemplars, n_instructions)
    same = [e for e in exemplars if e.edit_type == edit_type]
    first = rng.sample(same, min(2, len(same), n_full))
    rest = [e for e in exemplars if e not in first]
    full = first + rng.sample(rest, min(max(0, n_full - len(first)), len(rest)))
    rng.shuffle(full)
    return instr, full
