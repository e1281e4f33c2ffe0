"""Captioner back-ends (what the `caption` stage asks) and the validation of their answers.

- `transformers`: a local image-text-to-text checkpoint through `ultracurate.models.vlm`
  (batched generation; chat VLMs get the caption prompt, BLIP-style captioners an optional
  text prefix), optionally under a decoding `Grammar` (the tiny demo model's).
- `openai`: an OpenAI-compatible vision chat endpoint; the photo goes as a JPEG data URL in
  the user message beside the prompt, through the shared `ultracurate.chat.ChatClient`
  (bounded concurrency, retries on timeouts / 429 / 5xx, Retry-After honoured).

A back-end's `encode(image)` turns an RGB photo into what it sends (run ahead on the stage's
prepare threads) and `caption(payloads, seeds)` returns one `Answer` per photo, in order; it
never raises for one bad photo. `validate_caption` judges an answer's text.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import Answer, ChatClient, image_part, message
from .errors import UltracurateError, reason_text
from .names import CAPTION_MAX_WORDS
from .vision import BACKENDS, VisionSpec, vision_spec
MIN_CAPTION_WORDS = 2
MAX_CAPTION_CHARS = 400


# -- validation -----------------------------------------------------------------------------
def validate_caption(text: Any) -> tuple[str | None, list[str]]:
    """(the caption, []) when the answer is usable, else (None, reasons). Usable: text, after
    trimming whitespace and enclosing quotes; printable; MIN..CAPTION_MAX_WORDS words (instruct
    skips longer ones); mostly letters; not a phrase repeated (random or broken models loop)."""
    if not isinstance(text, str):
        return None, [f"answer is a {type(text).__name__}, not text"]
    cap = " ".join(text.split()).strip().strip("\"'`").strip()
    if not cap:
        return None, ["empty answer"]
    reasons = []
    if "\ufffd" in cap or any(unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn")
                              for ch in cap):
        reasons.append("holds control, private or undecodable characters")
    words = cap.split()
    if len(words) < MIN_CAPTION_WORDS:
        reasons.append(f"too short ({len(words)} word; at least {MIN_CAPTION_WORDS})")
    if len(words) > CAPTION_MAX_WORDS or len(cap) > MAX_CAPTION_CHARS:
        reasons.append(f"too long ({len(words)} words, {len(cap)} characters; at most "
                       f"{CAPTION_MAX_WORDS} words and {MAX_CAPTION_CHARS} characters)")
    visible = [ch for ch in cap if not ch.isspace()]
    letters = sum(ch.isalpha() for ch in visible)
    if letters < 0.6 * len(visible) or not re.search(r"[^\W\d_]{2,}", cap):
        reasons.append(f"mostly not words ({letters} letters of {len(visible)} characters)")
    low = [w.lower() for w in words]
    grams = Counter(zip(low, low[1:], low[2:]))
    if grams and max(grams.values()) > 1:
        gram = " ".join(grams.most_common(1)[0][0])
        reasons.append(f"repeats itself ('{gram}' {grams[grams.most_common(1)[0][0]]} times)")
    return (None, reasons) if reasons else (cap, [])


# -- back-ends ------------------------------------------------------------------------------
class Captioner:
    name = ""
    model = ""            # hub id, folder or served model name (anchor_captions.model)
    prompt_version = ""   # anchor_captions.prompt

    def encode(self, image) -> Any:
        return image

    def caption(self, payloads: list, seeds: list[int]) -> list[Answer]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalCaptioner(Captioner):
    name = "transformers"

    def __init__(self, ref: str, device: str = "cpu", dtype=None, prompt: str | None = None,
                 prefix: str | None = None, grammar: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 60, temperature: float = 0.0):
        from .models import captioner, vlm
        self.vlm = captioner.load(ref, device=device, dtype=dtype)
        self.model = ref
        self.grammar = vlm.Grammar.load(grammar) if grammar else None
        if self.grammar is not None:
            self.grammar.token_ids(self.vlm.tokenizer)  # a word it cannot say: fail now
        if self.vlm.chat:
            self.text, version = load_prompt(prompt)
        else:  # BLIP-style: no instruction, an optional prefix the caption continues
            self.text, version = prefix or None, f"prefix:{prefix}" if prefix else "none"
        self.prompt_version = version + (f"+grammar:{self.grammar.name}" if self.grammar
                                         else "")
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def caption(self, payloads: list, seeds: list[int]) -> list[Answer]:
        out: list[Answer] = []
        for i in range(0, len(payloads), self.batch_size):
            chunk = payloads[i:i + self.batch_size]
            try:
                texts = self.vlm.generate([[im] for im in chunk], [self.text] * len(chunk),
                                          max_new_tokens=self.max_new_tokens,
                                          temperature=self.temperature, seed=seeds[i],
                                          grammar=self.grammar)
            except Exception as e:  # e.g. out of memory: these photos fail, a rerun retries
                out += [Answer(error=reason_text(e, typed=True))] * len(chunk)
                continue
            out += [Answer(t) for t in texts]
        return out


class HTTPCaptioner(Captioner):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 prompt: str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_new_tokens: int = 60,
                 temperature: float = 0.0, image_size: int = 1024):
        self.model = model
        self.text, self.prompt_version = load_prompt(prompt)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.image_size = image_size
        self.client = ChatClient(base_url, api_key=api_key, concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries, backoff=backoff)

    def encode(self, image) -> str:
        from .images import to_data_url
        return to_data_url(image, max_side=self.image_size)

    def body(self, data_url: str, seed: int) -> dict:
        return {"model": self.model,
                "messages": [message("user", self.text, image_part(data_url))],
                "max_tokens": self.max_new_tokens, "temperature": self.temperature,
                "seed": seed % (2 ** 31)}

    def caption(self, payloads: list, seeds: list[int]) -> list[Answer]:
        return self.client.complete([self.body(p, s) for p, s in zip(payloads, seeds)])

    def close(self) -> None:
        self.client.close()


def load_prompt(ref: str | None) -> tuple[str, str]:
    """(instruction text, version) of a caption prompt: packaged ('caption-v1') or a file."""
    from .instruct.prompt import prompt_file
    from .models.captioner import DEFAULT_PROMPT
    text, version = prompt_file(ref or DEFAULT_PROMPT, "caption")
    body = " ".join(ln for ln in text.splitlines() if not ln.startswith("# ")).split()
    if not body:
        raise UltracurateError(f"caption prompt {version} is empty")
    return " ".join(body), version


# -- what the stage builds where it runs ------------------------------------------------------
@dataclass
class CaptionerSpec(VisionSpec):
    """A captioner back-end (see `ultracurate.vision.VisionSpec`); `prefix` is the text a
    captioner without a chat template continues."""

    prefix: str | None = None

    @property
    def source(self) -> str:
        """The captions' source: caption:<model> (a folder by its name)."""
        name = self.model or ""
        if self.backend == "transformers" and Path(name).exists():
            name = Path(name).resolve().name
        return f"caption:{name}"

    def build(self, device: str = "cpu") -> Captioner:
        if self.backend == "transformers":
            return LocalCaptioner(self.model, device=device, dtype=self.dtype,
                                  prompt=self.prompt, prefix=self.prefix, grammar=self.grammar,
                                  batch_size=self.batch_size,
                                  max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature)
        if self.backend == "openai":
            return HTTPCaptioner(self.base_url, self.model, api_key=self.key(),
                                 prompt=self.prompt, concurrency=self.concurrency,
                                 timeout=self.timeout, max_retries=self.max_retries,
                                 backoff=self.backoff, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, image_size=self.image_size)
        raise UltracurateError(f"unknown captioner back-end '{self.backend}' "
                               f"({', '.join(BACKENDS)})")


def captioner_spec(ws, backend: str | None = None, model: str | None = None,
                   base_url: str | None = None, **kw) -> CaptionerSpec:
    """The captioner to use: explicit options, else the workspace's captioner role (a
    checkpoint, or an http(s) URL of a served model with the model after '#')."""
    return vision_spec(ws, "captioner", CaptionerSpec, backend, model, base_url, **kw)
