"""Role `captioner`: the model that writes captions for anchors that have none (the `caption`
stage). A local checkpoint (hub id or folder) is any image-text-to-text model that
`ultracurate.models.vlm` loads: a captioner such as BLIP, BLIP-2, GIT or Florence-2, or a chat
VLM such as LLaVA, Qwen2-VL or SmolVLM. The role may instead name a served model: an http(s)
URL of an OpenAI-compatible vision endpoint, model after '#'
(`http://host:8000/v1#Qwen2.5-VL-7B-Instruct`), which needs no loading.

`make_tiny` builds the tiny random-weight LLaVA of `vlm.make_tiny` whose word-level tokenizer
knows the packaged `tiny-caption` grammar's words and the caption prompt's, so that decoding
under that grammar yields English words (see docs/captions.md for what such captions are).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..chat import is_url
from ..errors import UltracurateError
from . import vlm

TINY_GRAMMAR = "tiny-caption"
DEFAULT_PROMPT = "caption-v1"


def load(ref: str, device: str = "cpu", dtype: Any = None) -> vlm.VLM:
    if is_url(ref):
        raise UltracurateError(f"captioner '{ref}' is a served model: nothing to load "
                               "(the caption stage sends it requests)")
    return vlm.load(ref, device=device, dtype=dtype)


def make_tiny(folder: str | Path) -> str:
    from ..instruct.prompt import prompt_file
    prompt, _ = prompt_file(DEFAULT_PROMPT, "caption")
    words = vlm.Grammar.load(TINY_GRAMMAR).words + re.findall(
        r"[a-z]+|[^\sa-z]", "\n".join(ln for ln in prompt.lower().splitlines()
                                      if not ln.startswith("# ")))
    return vlm.make_tiny(folder, words)
