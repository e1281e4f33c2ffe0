"""Back-ends that answer instruction requests: `rule` (offline templates), `openai` (any
OpenAI-compatible chat-completions server) and `transformers` (a local causal LM).

A back-end's `complete(requests)` returns one `Answer` per request, in order. An answer is the
model's raw text (or the rule back-end's dict) for the validator to judge, or a transport
`error` (the server could not be reached after its retries) that fails the anchor so that a
rerun tries it again. Back-ends never raise for one bad request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..chat import Answer, is_url, split_role_url, strip_userinfo
from ..errors import UltracurateError
from .exemplars import Exemplar

__all__ = ["BACKENDS", "Answer", "Backend", "BackendSpec", "Request", "RuleBackend",
           "spec_from_role"]

BACKENDS = ("rule", "openai", "transformers")


@dataclass
class Request:
    source_caption: str
    edit_type: str
    seed: int
    instruction_examples: list[Exemplar] = field(default_factory=list)
    full_examples: list[Exemplar] = field(default_factory=list)

    @property
    def exemplar_ids(self) -> list[str]:
        return [e.id for e in self.full_examples] + [e.id for e in self.instruction_examples]


class Backend:
    name = ""
    model = ""
    prompt_version: str | None = None
    uses_exemplars = True

    def complete(self, requests: list[Request]) -> list[Answer]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RuleBackend(Backend):
    name = "rule"
    uses_exemplars = False

    def __init__(self):
        from .rule import VERSION
        self.model = VERSION
        self.prompt_version = VERSION

    def complete(self, requests: list[Request]) -> list[Answer]:
        from .rule import RuleError, propose
        out = []
        for r in requests:
            try:
                out.append(Answer(propose(r.source_caption, r.edit_type, r.seed)))
            except RuleError as e:
                out.append(Answer(invalid=str(e)))
        return out


@dataclass
class BackendSpec:
    """What is needed to build a back-end where the work runs (picklable; the API key is
    kept out of `public()`, which is what a run records)."""

    backend: str = "rule"
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    prompt: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    temperature: float = 0.7
    max_new_tokens: int = 256
    batch_size: int = 8
    json_mode: bool = True
    dtype: str | None = None

    def public(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        if self.base_url:
            out["base_url"] = strip_userinfo(self.base_url)
        return out

    def build(self, device: str = "cpu") -> Backend:
        if self.backend == "rule":
            return RuleBackend()
        if self.backend == "openai":
            from .http import OpenAIBackend
            return OpenAIBackend(
                base_url=self.base_url or env_base_url(), model=self.model or env_model(),
                api_key=self.api_key or env_api_key(), prompt=self.prompt,
                concurrency=self.concurrency, timeout=self.timeout,
                max_retries=self.max_retries, backoff=self.backoff,
                temperature=self.temperature, max_tokens=self.max_new_tokens,
                json_mode=self.json_mode)
        if self.backend == "transformers":
            from .local import TransformersBackend
            if not self.model:
                raise UltracurateError("the transformers back-end needs --model "
                                       "(a hub id or a local checkpoint folder)")
            return TransformersBackend(self.model, device=device, dtype=self.dtype,
                                       prompt=self.prompt, batch_size=self.batch_size,
                                       max_new_tokens=self.max_new_tokens,
                                       temperature=self.temperature)
        raise UltracurateError(f"unknown back-end '{self.backend}' ({', '.join(BACKENDS)})")


def env_api_key() -> str | None:
    return os.environ.get("ULTRACURATE_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


def env_base_url() -> str:
    return (os.environ.get("ULTRACURATE_LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
            or "https://api.openai.com/v1")


def env_model() -> str:
    model = os.environ.get("ULTRACURATE_LLM_MODEL")
    if not model:
        raise UltracurateError("the openai back-end needs --model (or $ULTRACURATE_LLM_MODEL)")
    return model


def spec_from_role(ref: str) -> BackendSpec:
    """The back-end a workspace's `llm` role names: 'rule', an http(s) URL of an
    OpenAI-compatible server (model after '#', e.g. http://host:8000/v1#Qwen2.5-7B), or a
    transformers checkpoint (hub id or path)."""
    if ref == "rule":
        return BackendSpec("rule")
    if is_url(ref):
        url, model = split_role_url(ref)
        return BackendSpec("openai", model=model, base_url=url)
    return BackendSpec("transformers", model=ref)
