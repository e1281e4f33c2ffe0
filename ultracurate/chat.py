"""A client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp server, TGI, SGLang,
hosted APIs), shared by every stage that asks a served model: instruct (text prompts), caption
(an image as a data URL) and judge (two images, answers constrained to a JSON schema through
`json_schema_format`), each building its bodies with `message`, `text_part` and `image_part`.

Requests go out on a bounded thread pool; a timeout, a connection error, 429 or a 5xx is
retried with exponential backoff (a server's Retry-After is honoured, up to a cap). A 200 whose
body is not a chat completion is an *invalid* answer (the caller decides whether to ask again),
not a transport error. The API key only ever travels in the Authorization header: it is not
logged, not put in error messages and not recorded in the catalog (it is registered with
`errors.redact`, so a server that echoes it back is redacted too).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import register_secret

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


@dataclass
class Answer:
    """One answer: the model's text (or a rule back-end's dict) for the caller to validate, a
    transport `error` (the server could not be reached after the retries: the row fails and a
    rerun tries again), or `invalid` (already known unusable, with the reason)."""

    content: Any = None
    error: str | None = None
    invalid: str | None = None


# -- bodies ---------------------------------------------------------------------------------
def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(data_url: str, detail: str | None = None) -> dict:
    """An image content part; data_url from `ultracurate.images.to_data_url`."""
    url: dict[str, Any] = {"url": data_url}
    if detail:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


def json_schema_format(name: str, schema: dict, strict: bool = True) -> dict:
    """A `response_format` asking the server to answer with JSON that follows schema (OpenAI's
    structured outputs; vLLM, SGLang and llama.cpp's server constrain decoding to it). The
    answer still arrives as text: the caller parses and validates it, since a server may
    ignore the request."""
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": bool(strict)}}


def message(role: str, *parts: str | dict) -> dict:
    """A chat message: plain text content when it is one string, else content parts (a str
    becomes a text part, a dict is taken as a part)."""
    if len(parts) == 1 and isinstance(parts[0], str):
        return {"role": role, "content": parts[0]}
    return {"role": role, "content": [text_part(p) if isinstance(p, str) else p
                                      for p in parts]}


# -- the client -----------------------------------------------------------------------------
class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0):
        import httpx
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max_retries
        self.backoff = backoff
        headers = {"Content-Type": "application/json"}
        if api_key:
            register_secret(api_key)  # redacted from every message, whatever echoes it
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout),
                                    limits=httpx.Limits(max_connections=self.concurrency))
        self._jitter = random.Random(0)
        self._lock = threading.Lock()

    def complete(self, bodies: list[dict]) -> list[Answer]:
        """One Answer per body, in order; at most `concurrency` requests in flight."""
        if not bodies:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(bodies))) as pool:
            return list(pool.map(self.post, bodies))

    def post(self, body: dict) -> Answer:
        """One request, retried on timeouts, connection errors, 429 and 5xx."""
        import httpx
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                r = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = "request timed out"
            except httpx.TransportError as e:
                last = f"cannot reach the server ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    return _answer(r)
                last = f"HTTP {r.status_code}{_brief(r)}"
                if r.status_code not in RETRY_STATUS:
                    return Answer(error=last)
                wait = _retry_after(r)
            if attempt < self.max_retries:
                if wait is None:
                    with self._lock:
                        jitter = 1 + 0.25 * self._jitter.random()
                    wait = self.backoff * (2 ** attempt) * jitter
                time.sleep(wait)
        return Answer(error=f"{last} (after {self.max_retries + 1} tries)")

    def close(self) -> None:
        self._client.close()


def _answer(r) -> Answer:
    """The message text of a chat-completions response; a 200 that is not one is an invalid
    answer, not a transport error."""
    try:
        data = r.json()
    except ValueError:
        return Answer(r.text[:500], invalid="server response is not JSON")
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Answer(r.text[:500], invalid="server response has no "
                                            "choices[0].message.content")
    if not isinstance(content, str):
        return Answer(str(content)[:500],
                      invalid=f"message content is a {type(content).__name__}, not text")
    return Answer(content)


def _brief(r) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    return f": {str(msg).splitlines()[0][:160]}" if msg else ""


def _retry_after(r) -> float | None:
    v = r.headers.get("retry-after")
    try:
        return min(max(float(v), 0.0), MAX_RETRY_AFTER) if v is not None else None
    except ValueError:
        return None


def strip_userinfo(url: str) -> str:
    """A URL without user:password@ (what a run records of a base URL)."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


def split_role_url(ref: str) -> tuple[str, str | None]:
    """A role reference naming a served model, 'http://host:8000/v1#model-name': the base URL
    and the model name (None when there is no '#')."""
    url, _, model = ref.partition("#")
    return url, model or None


def is_url(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(("http://", "https://"))
