"""OpenAI-compatible chat-completions back-end (vLLM, llama.cpp server, TGI, hosted APIs).

Requests go out on a bounded thread pool; a timeout, a connection error, 429 or a 5xx is
retried with exponential backoff (a server's Retry-After is honoured, up to a cap). Answers are
asked for as JSON (`response_format`). The API key only ever travels in the Authorization
header: it is not logged, not put in error messages and not recorded in the catalog.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..errors import register_secret

from .backends import Answer, Backend, Request
from .prompt import PromptTemplate

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 prompt: str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, temperature: float = 0.7,
                 max_tokens: int = 256, json_mode: bool = True):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.template = PromptTemplate.load(prompt)
        self.prompt_version = self.template.version
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        headers = {"Content-Type": "application/json"}
        if api_key:
            register_secret(api_key)  # redacted from every message, whatever echoes it
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout),
                                    limits=httpx.Limits(max_connections=self.concurrency))
        self._jitter = random.Random(0)
        self._lock = threading.Lock()

    def complete(self, requests: list[Request]) -> list[Answer]:
        if not requests:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def body(self, request: Request) -> dict:
        body = {"model": self.model,
                "messages": self.template.messages(request.source_caption, request.edit_type,
                                                   request.instruction_examples,
                                                   request.full_examples),
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "seed": request.seed % (2 ** 31)}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _one(self, request: Request) -> Answer:
        body = self.body(request)
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


def _answer(r: httpx.Response) -> Answer:
    """The message text of a chat-completions response; a 200 that is not one is an invalid
    answer (retried by the stage like any other), not a transport error."""
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


def _brief(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    return f": {str(msg).splitlines()[0][:160]}" if msg else ""


def _retry_after(r: httpx.Response) -> float | None:
    v = r.headers.get("retry-after")
    try:
        return min(max(float(v), 0.0), MAX_RETRY_AFTER) if v is not None else None
    except ValueError:
        return None
