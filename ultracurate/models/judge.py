"""Role `judge`: the vision-language model that rates candidate pairs (the `judge` stage). A
local checkpoint (hub id or folder) is any chat image-text-to-text model that
`ultracurate.models.vlm` loads and that takes two images in one prompt (Qwen2-VL / Qwen2.5-VL,
Idefics3 / SmolVLM, LLaVA-OneVision, ...). The role may instead name a served model: an
http(s) URL of an OpenAI-compatible vision endpoint, model after '#'
(`http://host:8000/v1#Qwen2.5-VL-7B-Instruct`), which needs no loading.

`make_tiny` builds the tiny random-weight LLaVA of `vlm.make_tiny` whose word-level tokenizer
knows the packaged `tiny-judge` grammar's tokens and the judge prompt's words: decoding under
that grammar makes the random model answer the JSON the stage validates, its scores chosen by
the model's logits (they mean nothing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..chat import is_url
from ..errors import UltracurateError
from . import vlm

TINY_GRAMMAR = "tiny-judge"
DEFAULT_PROMPT = "judge-v1"


def load(ref: str, device: str = "cpu", dtype: Any = None) -> vlm.VLM:
    if is_url(ref):
        raise UltracurateError(f"judge '{ref}' is a served model: nothing to load (the judge "
                               "stage sends it requests)")
    return vlm.load(ref, device=device, dtype=dtype)


def make_tiny(folder: str | Path) -> str:
    from ..instruct.prompt import prompt_file
    prompt, _ = prompt_file(DEFAULT_PROMPT, "judge")
    words = vlm.Grammar.load(TINY_GRAMMAR).words + re.findall(
        r"[a-z0-9]+|[^\sa-z0-9]", "\n".join(ln for ln in prompt.lower().splitlines()
                                          if not ln.startswith("# ")))
    return vlm.make_tiny(folder, words)
