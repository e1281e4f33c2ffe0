"""The one exception type a user sees (its message is a single clear line);
`reason_text`, which makes any error a one-line reason fit to store in the catalog;
and `redact`, which every error passes through before it is stored or printed."""

from __future__ import annotations

import os
import re


class UltracurateError(Exception):
    """An error caused by input or state the user can fix. The CLI prints `error: <message>`
    and exits non-zero; the catalog is left as it was."""


class SelectionError(UltracurateError):
    """A --where predicate that is not a single read-only expression over the catalog."""


class CatalogBusyError(UltracurateError):
    """Another process holds the catalog for writing."""


class CatalogDamagedError(UltracurateError):
    """The catalog file is truncated or corrupt; nothing was written to it."""


# -- secrets ---------------------------------------------------------------------------------
# Environment variables whose values are secrets wherever they turn up in a message.
SECRET_ENV = ("ULTRACURATE_LLM_API_KEY", "ULTRACURATE_VLM_API_KEY", "OPENAI_API_KEY",
              "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "[REDACTED]"
_known: set[str] = set()
_PATTERNS = [
    # an Authorization header's value: "Bearer <token>", "Basic <token>"
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=:-]{6,}"), r"\1 " + REDACTED),
    # OpenAI-style and Hugging Face keys, wherever they stand
    (re.compile(r"\bsk-[A-Za-z0-9._-]{6,}"), REDACTED),
    (re.compile(r"\bhf_[A-Za-z0-9]{10,}"), REDACTED),
    # api_key=value, "api_key": "value", token: value, ...
    (re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|secret|password|token)"
                r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]{6,}"), r"\1" + REDACTED),
]


def register_secret(value: str | None) -> None:
    """Redact value from every later message (an API key given on the command line)."""
    if value and len(value) >= 4:
        _known.add(value)


def redact(text):
    """text with API keys and anything that looks like a bearer token replaced by
    [REDACTED]. None stays None."""
    if text is None:
        return None
    out = str(text)
    secrets = set(_known)
    secrets.update(v for k in SECRET_ENV if len(v := os.environ.get(k) or "") >= 4)
    for s in sorted(secrets, key=len, reverse=True):
        out = out.replace(s, REDACTED)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


# `<_io.BytesIO object at 0x7f...>`, `<function f at 0x...>`: the address differs per process,
# so a reason holding one never groups with its equals in `stats`.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")
MAX_REASON_CHARS = 500


def reason_text(error: BaseException | str | None, *, typed: bool = False) -> str:
    """A reason as the catalog stores it: one line, no object reprs or memory addresses, no
    secrets (redact), at most MAX_REASON_CHARS. typed: prefix an exception's type name (for
    unexpected errors)."""
    if error is None:
        return ""
    text = str(error)
    text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    text = _ADDRESS.sub(r"<\1>", _OBJECT_REPR.sub("", text)).strip()
    if isinstance(error, BaseException):
        if not text:
            text = type(error).__name__
        elif typed:
            text = f"{type(error).__name__}: {text}"
    text = redact(text)
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS - 3] + "..."
    return text
