"""The versioned prompt template (ultracurate/prompts/<version>.txt) and the chat messages it
makes for one request. Changing the wording means a new file and version, so that every edits
row names the exact prompt that produced it (edits.prompt_version)."""

from __future__ import annotations

import importlib.resources
import json
import string
from pathlib import Path

from ..names import EDIT_TYPES
from ..errors import UltracurateError
from .exemplars import Exemplar

DEFAULT_VERSION = "instruct-v1"

TYPE_DESCRIPTIONS = {
    "add": "put a new object into the photo (edit_object: the thing it is put on, or NONE)",
    "change_global": "change the whole scene's conditions: time of day, weather, season, "
                     "lighting (edit_object NONE)",
    "change_local": "change one object's material, texture, pattern, state or expression, "
                    "not its colour",
    "change_color": "change the colour of one object",
    "transform_global": "render the whole photo in another style or medium (edit_object NONE)",
    "transform_local": "change one object's size, shape or pose",
    "replace": "replace one object with a different object",
    "turn": "turn one object into another form of itself (a statue, a toy, a sculpture, ...)",
    "others": "anything else: text on objects, the number of objects, removing an object",
}


class PromptTemplate:
    def __init__(self, text: str, version: str):
        self.version = version
        lines = [ln for ln in text.splitlines() if not ln.startswith("# ")]
        body = "\n".join(lines)
        if "### system" not in body or "### user" not in body:
            raise UltracurateError(f"prompt {version}: needs '### system' and '### user' "
                                   "sections")
        system, user = body.split("### user", 1)
        self.system = string.Template(system.split("### system", 1)[1].strip())
        self.user = string.Template(user.strip())

    @classmethod
    def load(cls, ref: str | None = None) -> "PromptTemplate":
        """A packaged version ('instruct-v1') or a path to a template file (its version is
        the file's stem)."""
        return cls(*prompt_file(ref or DEFAULT_VERSION, "instruct"))

    def messages(self, source_caption: str, edit_type: str, instruction_examples:
                 list[Exemplar], full_examples: list[Exemplar]) -> list[dict]:
        values = {
            "edit_types": ", ".join(EDIT_TYPES),
            "type_descriptions": "\n".join(f"- {t}: {d}" for t, d in TYPE_DESCRIPTIONS.items()),
            "instruction_examples": "\n".join(f"- ({e.edit_type}) {e.instruction}"
                                              for e in instruction_examples) or "(none)",
            "full_examples": "\n\n".join(
                f"Source caption: {e.source_caption}\nEdit type: {e.edit_type}\n"
                f"{json.dumps(e.answer())}" for e in full_examples) or "(none)",
            "source_caption": source_caption,
            "edit_type": edit_type,
        }
        return [{"role": "system", "content": self.system.substitute(values)},
                {"role": "user", "content": self.user.substitute(values)}]


def prompt_file(ref: str, kind: str) -> tuple[str, str]:
    """(text, version) of a prompt: a packaged version of this kind ('instruct-v1',
    'caption-v1') or a path to a .txt file, whose version is its stem."""
    p = Path(ref)
    if p.suffix == ".txt" and p.exists():
        return p.read_text(), p.stem
    res = importlib.resources.files("ultracurate").joinpath("prompts", f"{ref}.txt")
    if not ref.startswith(f"{kind}-") or not res.is_file():
        raise UltracurateError(f"no {kind} prompt '{ref}' (packaged: "
                               f"{', '.join(packaged_versions(kind))}; or a .txt file)")
    return res.read_text(), ref


def packaged_versions(kind: str = "instruct") -> list[str]:
    folder = importlib.resources.files("ultracurate").joinpath("prompts")
    return sorted(e.name[:-4] for e in folder.iterdir()
                  if e.name.endswith(".txt") and e.name.startswith(f"{kind}-"))
