"""What the stages that show a model images share (caption, judge): the spec of a back-end
where the work runs, and how a model role resolves to one.

A vision role names a local checkpoint (hub id or folder, loaded through `models.vlm`) or a
served OpenAI-compatible vision endpoint (`http://host:8000/v1#served-model-name`). Explicit
options win over the role; $ULTRACURATE_VLM_BASE_URL / _MODEL / _API_KEY (or $OPENAI_API_KEY)
fill in a served model's address, name and key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .chat import is_url, split_role_url, strip_userinfo
from .errors import UltracurateError

BACKENDS = ("transformers", "openai")


@dataclass
class VisionSpec:
    """What is needed to build a back-end where the work runs (picklable; the API key is kept
    out of `public()`, which is what a run records)."""

    backend: str = "transformers"
    model: str | None = None         # checkpoint (transformers) or served model name (openai)
    base_url: str | None = None
    api_key: str | None = None
    prompt: str | None = None
    grammar: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    max_new_tokens: int = 60
    temperature: float = 0.0
    batch_size: int = 8
    image_size: int = 1024
    dtype: str | None = None

    def public(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        if self.base_url:
            out["base_url"] = strip_userinfo(self.base_url)
        return out

    def key(self) -> str | None:
        return self.api_key or env_api_key()


def env_api_key() -> str | None:
    return os.environ.get("ULTRACURATE_VLM_API_KEY") or os.environ.get("OPENAI_API_KEY")


def vision_spec(ws, role: str, cls: type = VisionSpec, backend: str | None = None,
                model: str | None = None, base_url: str | None = None, **kw):
    """A cls (a VisionSpec) for role: explicit options, else the workspace's role (a
    checkpoint, or an http(s) URL of a served model with the model after '#'). Options given
    as None keep cls's defaults."""
    from .models import resolve
    if backend not in (None, *BACKENDS):
        raise UltracurateError(f"unknown {role} back-end '{backend}' ({', '.join(BACKENDS)})")
    base_url = base_url or os.environ.get("ULTRACURATE_VLM_BASE_URL")
    if backend == "openai" or (backend is None and base_url):
        url, role_model = base_url, None
        if not url:
            ref = resolve(ws, role)
            if not is_url(ref):
                raise UltracurateError(f"the openai {role} needs --base-url (or "
                                       f"$ULTRACURATE_VLM_BASE_URL, or a {role} role "
                                       "http://host/v1#model)")
            url, role_model = split_role_url(ref)
        model = model or role_model or os.environ.get("ULTRACURATE_VLM_MODEL")
        if not model:
            raise UltracurateError(f"the openai {role} needs --model (the served model's "
                                   "name)")
        spec = cls("openai", model=model, base_url=url)
    else:
        ref = model or resolve(ws, role)
        if is_url(ref):
            if backend == "transformers":
                raise UltracurateError(f"the transformers {role} needs --model (a hub id or a "
                                       f"folder); the workspace's {role} is '{ref}'")
            url, served = split_role_url(ref)
            if not served:
                raise UltracurateError(f"{role} role '{ref}' names no model (add "
                                       "'#<model name>')")
            spec = cls("openai", model=served, base_url=url)
        else:
            spec = cls("transformers", model=ref)
    for k, v in kw.items():
        if v is not None:
            setattr(spec, k, v)
    return spec
