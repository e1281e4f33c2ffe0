"""Judge back-ends (what the `judge` stage asks) and the validation of their answers.

A vision-language model sees a candidate pair, the source image then the edited image, with the
edit instruction (the `judge-v1` prompt), and answers JSON:

    {"instruction": 1-5, "preservation": 1-5, "quality": 1-5, "rationale": "one sentence"}

- `transformers`: a local chat image-text-to-text checkpoint through `ultracurate.models.vlm`,
  two images per request, batched; optionally under a decoding `Grammar`. The tiny random-weight
  judge decodes under the packaged `tiny-judge` grammar: constrained decoding is what makes a
  random model answer parseable JSON (its scores come from its logits and mean nothing).
- `openai`: an OpenAI-compatible vision chat endpoint; both images go as JPEG data URLs in one
  user message, with `response_format` set to JUDGE_SCHEMA (`chat.json_schema_format`; off with
  json_schema=False for servers that refuse it), through the shared `ultracurate.chat.ChatClient`
  (bounded concurrency, retries on timeouts / 429 / 5xx, Retry-After honoured).

Whatever the back-end, `validate_judgement` checks every answer: JSON (bare, fenced or with
words around it), each score a whole number in 1-5, a rationale of at most
MAX_RATIONALE_WORDS words. The stage asks again when an answer fails (a served model or
sampling may answer otherwise) and records the reason when it still fails.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Any

from .chat import Answer, ChatClient, image_part, json_schema_format, message
from .errors import UltracurateError, reason_text
from .thresholds import JUDGE_ASPECTS, JUDGE_SCALE
from .vision import BACKENDS, VisionSpec, vision_spec  # noqa: F401 (BACKENDS: the CLI's)

MAX_RATIONALE_WORDS = 60
MAX_RATIONALE_CHARS = 400

# What a served model is asked to answer (OpenAI structured outputs; strict mode wants every
# property required and no others).
JUDGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        **{a: {"type": "integer", "minimum": JUDGE_SCALE[0], "maximum": JUDGE_SCALE[1]}
           for a in JUDGE_ASPECTS},
        "rationale": {"type": "string", "maxLength": MAX_RATIONALE_CHARS},
    },
    "required": [*JUDGE_ASPECTS, "rationale"],
    "additionalProperties": False,
}


@dataclass
class Judgement:
    instruction: int
    preservation: int
    quality: int
    rationale: str

    def columns(self) -> dict:
        """As candidates' judge_* columns."""
        return {f"judge_{a}": getattr(self, a) for a in JUDGE_ASPECTS} | {
            "judge_rationale": self.rationale}


# -- validation -----------------------------------------------------------------------------
def validate_judgement(text: Any) -> tuple[Judgement | None, list[str]]:
    """(the judgement, []) when the answer is usable, else (None, every reason it is not)."""
    if not isinstance(text, str):
        return None, [f"answer is a {type(text).__name__}, not text"]
    m = re.search(r"\{.*\}", text, re.S)  # bare, in a ```json fence, or with words around
    if not m:
        return None, ["no JSON object in the answer" if text.strip() else "empty answer"]
    try:
        data = json.loads(m.group(0))
    except ValueError as e:
        return None, [f"not valid JSON ({reason_text(e)})"]
    if not isinstance(data, dict):
        return None, ["the JSON is not an object"]
    lo, hi = JUDGE_SCALE
    reasons, scores = [], {}
    for a in JUDGE_ASPECTS:
        v = data.get(a)
        if v is None:
            reasons.append(f"no {a} score")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            reasons.append(f"{a} score {json.dumps(v)[:40]} is not a whole number")
        elif not lo <= v <= hi:
            reasons.append(f"{a} score {int(v)} is outside {lo}-{hi}")
        else:
            scores[a] = int(v)
    why = data.get("rationale")
    rationale = " ".join(why.split()) if isinstance(why, str) else ""
    if not rationale:
        reasons.append("no rationale")
    elif (len(rationale.split()) > MAX_RATIONALE_WORDS
          or len(rationale) > MAX_RATIONALE_CHARS):
        reasons.append(f"rationale too long ({len(rationale.split())} words, "
                       f"{len(rationale)} characters; at most {MAX_RATIONALE_WORDS} words "
                       f"and {MAX_RATIONALE_CHARS} characters)")
    elif "\ufffd" in rationale or any(unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs",
                                                                    "Cn") for ch in rationale):
        reasons.append("rationale holds control, private or undecodable characters")
    if reasons:
        return None, reasons
    return Judgement(rationale=rationale, **scores), []


# -- the prompt -----------------------------------------------------------------------------
def load_prompt(ref: str | None) -> tuple[string.Template, str]:
    """(template with $instruction, version) of a judge prompt: packaged ('judge-v1') or a
    .txt file (its version is the file's stem)."""
    from .instruct.prompt import prompt_file
    from .models.judge import DEFAULT_PROMPT
    text, version = prompt_file(ref or DEFAULT_PROMPT, "judge")
    body = " ".join(" ".join(ln for ln in text.splitlines() if not ln.startswith("# ")).split())
    template = string.Template(body)
    if "instruction" not in {m.group("named") or m.group("braced")
                             for m in template.pattern.finditer(body)}:
        raise UltracurateError(f"judge prompt {version} has no $instruction placeholder")
    return template, version


# -- back-ends ------------------------------------------------------------------------------
class Judge:
    name = ""
    model = ""            # hub id, folder or served model name (candidates.judge_model)
    prompt_version = ""   # candidates.judge_prompt

    def __init__(self, prompt: str | None):
        self.template, self.prompt_version = load_prompt(prompt)

    def text(self, instruction: str) -> str:
        return self.template.substitute(instruction=" ".join(str(instruction).split()))

    def encode(self, image) -> Any:
        return image

    def judge(self, pairs: list[tuple[Any, Any]], instructions: list[str],
              seeds: list[int]) -> list[Answer]:
        """One Answer per (source, edited) pair, in order; never raises for one pair."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalJudge(Judge):
    name = "transformers"

    def __init__(self, ref: str, device: str = "cpu", dtype=None, prompt: str | None = None,
                 grammar: str | None = None, batch_size: int = 8, max_new_tokens: int = 128,
                 temperature: float = 0.0):
        from .models import judge, vlm
        super().__init__(prompt)
        self.vlm = judge.load(ref, device=device, dtype=dtype)
        if not self.vlm.chat:
            raise UltracurateError(f"judge '{ref}' has no chat template: the judge needs a "
                                   "chat vision-language model that takes two images")
        self.model = ref
        self.grammar = vlm.Grammar.load(grammar) if grammar else None
        if self.grammar is not None:
            self.grammar.token_ids(self.vlm.tokenizer)  # a word it cannot say: fail now
            self.prompt_version += f"+grammar:{self.grammar.name}"
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def judge(self, pairs, instructions, seeds) -> list[Answer]:
        out: list[Answer] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            try:
                texts = self.vlm.generate([list(p) for p in chunk],
                                          [self.text(t) for t in
                                           instructions[i:i + self.batch_size]],
                                          max_new_tokens=self.max_new_tokens,
                                          temperature=self.temperature, seed=seeds[i],
                                          grammar=self.grammar)
            except Exception as e:  # e.g. out of memory: these pairs fail, a rerun retries
                out += [Answer(error=reason_text(e, typed=True))] * len(chunk)
                continue
            out += [Answer(t) for t in texts]
        return out


class HTTPJudge(Judge):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 prompt: str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_new_tokens: int = 128,
                 temperature: float = 0.0, image_size: int = 1024, json_schema: bool = True):
        super().__init__(prompt)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.image_size = image_size
        self.json_schema = json_schema
        self.client = ChatClient(base_url, api_key=api_key, concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries, backoff=backoff)

    def encode(self, image) -> str:
        from .images import to_data_url
        return to_data_url(image, max_side=self.image_size)

    def body(self, pair: tuple[str, str], instruction: str, seed: int) -> dict:
        body = {"model": self.model,
                "messages": [message("user", image_part(pair[0]), image_part(pair[1]),
                                     self.text(instruction))],
                "max_tokens": self.max_new_tokens, "temperature": self.temperature,
                "seed": seed % (2 ** 31)}
        if self.json_schema:
            body["response_format"] = json_schema_format("edit_judgement", JUDGE_SCHEMA)
        return body

    def judge(self, pairs, instructions, seeds) -> list[Answer]:
        return self.client.complete([self.body(p, t, s)
                                     for p, t, s in zip(pairs, instructions, seeds)])

    def close(self) -> None:
        self.client.close()


# -- what the stage builds where it runs ------------------------------------------------------
@dataclass
class JudgeSpec(VisionSpec):
    """A judge back-end (see `ultracurate.vision.VisionSpec`); json_schema: ask a served
    model for JUDGE_SCHEMA through response_format."""

    max_new_tokens: int = 128
    json_schema: bool = True

    def build(self, device: str = "cpu") -> Judge:
        if self.backend == "transformers":
            return LocalJudge(self.model, device=device, dtype=self.dtype, prompt=self.prompt,
                              grammar=self.grammar, batch_size=self.batch_size,
                              max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature)
        if self.backend == "openai":
            return HTTPJudge(self.base_url, self.model, api_key=self.key(), prompt=self.prompt,
                             concurrency=self.concurrency, timeout=self.timeout,
                             max_retries=self.max_retries, backoff=self.backoff,
                             max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                             image_size=self.image_size, json_schema=self.json_schema)
        raise UltracurateError(f"unknown judge back-end '{self.backend}' "
                               f"({', '.join(BACKENDS)})")


def judge_spec(ws, backend: str | None = None, model: str | None = None,
               base_url: str | None = None, **kw) -> JudgeSpec:
    """The judge to use: explicit options, else the workspace's judge role (a checkpoint, or
    an http(s) URL of a served model with the model after '#')."""
    return vision_spec(ws, "judge", JudgeSpec, backend, model, base_url, **kw)
