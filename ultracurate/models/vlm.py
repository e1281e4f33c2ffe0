"""Local vision-language models through transformers' image-text-to-text API: the one loader
for every role that shows a model images and reads its text (the captioner, and a judge that
compares two images).

`load(ref)` reads any `AutoModelForImageTextToText` checkpoint and its `AutoProcessor` by hub
id or folder. Chat VLMs (LLaVA, Qwen2-VL, Idefics3 / SmolVLM, PaliGemma, ...) are prompted
through the processor's chat template, one image placeholder per image; image-to-text models
without a chat template (BLIP, BLIP-2, GIT, Florence-2) get the images and an optional text
prefix. `VLM.generate` runs a batch of requests in one `generate` call (left padding), greedy
or seeded sampling, optionally under a `Grammar`.

`make_tiny(folder, words)` builds a tiny random-weight LLaVA (a 2-layer CLIP vision tower and
a 2-layer Llama) with a word-level tokenizer over `words` and a chat template, saved with
`save_pretrained` and read back by `load` exactly as a real checkpoint is.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UltracurateError, reason_text
from .llm import _dtype as torch_dtype  # one rule for transformers models' dtype

TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>"]
# Jinja over chat messages whose content is a string or a list of image / text parts.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}</s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@dataclass
class Grammar:
    """A fixed sequence of word slots: decoding picks one word per slot, in order, then ends.
    The model's logits choose among each slot's words; nothing else can be produced. Every
    word must be one token of the model's tokenizer (true of the tiny word-level tokenizer;
    a real model's BPE vocabulary splits most words, so a grammar is for tiny models)."""

    name: str
    slots: list[list[str]]

    @classmethod
    def load(cls, ref: str) -> "Grammar":
        """A packaged grammar by name (ultracurate/prompts/<name>.grammar.json) or a file."""
        p = Path(ref)
        if p.suffix == ".json" and p.exists():
            text, name = p.read_text(), p.name.removesuffix(".json").removesuffix(".grammar")
        else:
            res = importlib.resources.files("ultracurate").joinpath(
                "prompts", f"{ref}.grammar.json")
            if not res.is_file():
                raise UltracurateError(f"no grammar '{ref}' (a packaged name such as "
                                       "tiny-caption, or a .json file)")
            text, name = res.read_text(), ref
        try:
            slots = json.loads(text)["slots"]
            if not slots or not all(isinstance(s, list) and s and
                                    all(isinstance(w, str) and w for w in s) for s in slots):
                raise ValueError("slots must be non-empty lists of words")
        except (ValueError, KeyError, TypeError) as e:
            raise UltracurateError(f"grammar {ref}: {reason_text(e)}") from None
        return cls(name, slots)

    @property
    def words(self) -> list[str]:
        return list(dict.fromkeys(w for s in self.slots for w in s))

    def token_ids(self, tokenizer) -> list[list[int]]:
        unk = tokenizer.unk_token_id
        out = []
        for slot in self.slots:
            ids = tokenizer.convert_tokens_to_ids(slot)
            bad = [w for w, i in zip(slot, ids) if i is None or i == unk]
            if bad:
                raise UltracurateError(f"grammar {self.name}: '{bad[0]}' is not one token of "
                                       "the model's tokenizer")
            out.append(ids)
        return out

    def allowed_tokens_fn(self, tokenizer):
        """For `generate(prefix_allowed_tokens_fn=...)`: slot n's words at new token n, then
        only the end token. The prompt's length is taken from the first call (every row of a
        left-padded batch has the same length)."""
        slots, eos = self.token_ids(tokenizer), tokenizer.eos_token_id
        start: list[int] = []

        def allowed(batch_id: int, input_ids) -> list[int]:
            if not start:
                start.append(int(input_ids.shape[-1]))
            n = int(input_ids.shape[-1]) - start[0]
            return slots[n] if n < len(slots) else [eos]
        return allowed


@dataclass
class VLM:
    model: Any
    processor: Any
    ref: str
    device: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def chat(self) -> bool:
        """Whether it is prompted through a chat template (else: images and a prefix)."""
        return bool(getattr(self.processor, "chat_template", None))

    def prompt(self, text: str | None, n_images: int = 1) -> str | None:
        """The model's input text for one request of n_images images and an instruction."""
        if not self.chat:
            return text or None
        content = [{"type": "image"}] * n_images + ([{"type": "text", "text": text}]
                                                    if text else [])
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)

    def generate(self, images: list[list], texts: list[str | None], *,
                 max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
                 grammar: Grammar | None = None) -> list[str]:
        """One answer per request (its images, its instruction), generated in one batch.
        temperature 0: greedy; else sampling seeded with seed (same batch, same text)."""
        import torch
        prompts = [self.prompt(t, len(ims)) for t, ims in zip(texts, images)]
        kw: dict[str, Any] = {"images": [im for ims in images for im in ims],
                              "return_tensors": "pt"}
        if any(p is not None for p in prompts):
            kw.update(text=[p or "" for p in prompts], padding=True)
        enc = self.processor(**kw).to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        sample = temperature > 0
        gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
        if sample:
            gen.update(temperature=temperature, top_p=None, top_k=None)
        if grammar is not None:
            gen["prefix_allowed_tokens_fn"] = grammar.allowed_tokens_fn(self.tokenizer)
        tok = self.tokenizer
        torch.manual_seed(seed % (2 ** 63))
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen)
        ids = enc.get("input_ids")
        # decoder-only models return the prompt before the answer; encoder-decoders do not
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(
                out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def load(ref: str, device: str = "cpu", dtype: Any = None) -> VLM:
    """An image-text-to-text model and its processor by hub id or folder (safetensors)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(ref)
        model = AutoModelForImageTextToText.from_pretrained(
            ref, dtype=torch_dtype(dtype, device), use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise UltracurateError(f"cannot load image-text model '{ref}': {reason_text(e)}") \
            from None
    model.to(device).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # decoder-only batches are padded on the left to generate
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:  # else generate warns on every call
            gen.pad_token_id = tok.pad_token_id
    return VLM(model, processor, ref, str(device))


def make_tiny(folder: str | Path, words: list[str]) -> str:
    """A tiny random-weight LLaVA in folder: CLIP vision tower (32 px, 8 px patches, 2 layers,
    width 32) and Llama (2 layers, width 32) joined by LLaVA's projector, with a word-level
    tokenizer (lower-cased; words and punctuation split apart) over `words`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(TINY_SPECIALS + [w.lower()
                                                                         for w in words]))}
    bpe = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", model_max_length=4096)
    # the placeholders must be split out before the word-level model sees them
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>",
                                                          "<|assistant|>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
        tokenizer=tok, patch_size=TINY_PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
        chat_template=TINY_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH,
                                       projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return str(folder)
