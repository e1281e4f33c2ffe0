"""OpenAI-compatible chat-completions back-end (vLLM, llama.cpp server, TGI, hosted APIs): the
prompt template's messages, sent through the shared `ultracurate.chat.ChatClient` (bounded
concurrency, retries with backoff and Retry-After, answers asked for as JSON)."""

from __future__ import annotations

from ..chat import Answer, ChatClient
from .backends import Backend, Request
from .prompt import PromptTemplate


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 prompt: str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, temperature: float = 0.7,
                 max_tokens: int = 256, json_mode: bool = True):
        self.model = model
        self.template = PromptTemplate.load(prompt)
        self.prompt_version = self.template.version
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.client = ChatClient(base_url, api_key=api_key, concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries, backoff=backoff)

    def complete(self, requests: list[Request]) -> list[Answer]:
        return self.client.complete([self.body(r) for r in requests])

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

    def close(self) -> None:
        self.client.close()
