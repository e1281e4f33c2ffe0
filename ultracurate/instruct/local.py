"""A local transformers causal LM as the instruction writer: the prompt's chat messages go
through the tokenizer's chat template (or a plain 'role: text' layout when it has none), are
batched with left padding and generated in one call per batch, on the GPU or the CPU."""

from __future__ import annotations

from .backends import Answer, Backend, Request
from .prompt import PromptTemplate


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, ref: str, device: str = "cpu", dtype=None, prompt: str | None = None,
                 batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.7):
        from ..models import llm
        self.lm = llm.load(ref, device=device, dtype=dtype)
        self.model = ref
        self.template = PromptTemplate.load(prompt)
        self.prompt_version = self.template.version
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def text(self, request: Request) -> str:
        messages = self.template.messages(request.source_caption, request.edit_type,
                                          request.instruction_examples, request.full_examples)
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant: "

    def complete(self, requests: list[Request]) -> list[Answer]:
        out: list[Answer] = []
        for i in range(0, len(requests), self.batch_size):
            out += self._batch(requests[i:i + self.batch_size])
        return out

    def _batch(self, requests: list[Request]) -> list[Answer]:
        import torch
        tok, model = self.lm.tokenizer, self.lm.model
        enc = tok([self.text(r) for r in requests], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(self.lm.device)
        torch.manual_seed(requests[0].seed % (2 ** 63))  # same batch, same seed: same text
        sample = self.temperature > 0
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                 temperature=self.temperature if sample else None,
                                 top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]
        return [Answer(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
