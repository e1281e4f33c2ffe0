"""The one exception type a user sees (its message is a single clear line), and `redact`, which
every error passes through before it is printed or stored in the catalog."""

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
SECRET_ENV = ("ULTRACURATE_LLM_API_KEY", "OPENAI_API_KEY", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")
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
