"""The one exception type a user sees: its message is a single clear line; and `reason_text`,
which makes any error a one-line reason fit to store in the catalog."""

import re


class UltracurateError(Exception):
    """An error caused by input or state the user can fix. The CLI prints `error: <message>`
    and exits non-zero; the catalog is left as it was."""


class SelectionError(UltracurateError):
    """A --where predicate that is not a single read-only expression over the catalog."""


class CatalogBusyError(UltracurateError):
    """Another process holds the catalog for writing."""


# `<_io.BytesIO object at 0x7f...>`, `<function f at 0x...>`: the address differs per process,
# so a reason holding one never groups with its equals in `stats`.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")
MAX_REASON_CHARS = 500


def reason_text(error: BaseException | str | None, *, typed: bool = False) -> str:
    """A reason as the catalog stores it: one line, no object reprs or memory addresses, at
    most MAX_REASON_CHARS. typed: prefix an exception's type name (for unexpected errors)."""
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
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS - 3] + "..."
    return text
