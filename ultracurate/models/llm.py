"""Role `llm`: a transformers causal language model (hub id or local folder) with its tokenizer,
used by the `transformers` back-end of the instruct stage. (A workspace's `llm` role may also be
'rule' or an http(s) URL; those need no loading, see ultracurate.instruct.backends.)

`make_tiny` builds a tiny random-weight Llama-architecture model and a byte-level BPE tokenizer
trained offline on the exemplar file, with a chat template, and saves both with
`save_pretrained`; `load` reads it back by path exactly as it reads a real checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UltracurateError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class CausalLM:
    model: Any
    tokenizer: Any
    ref: str
    device: str


def _dtype(dtype, device: str):
    import torch
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}[dtype]
    return dtype


def load(ref: str, device: str = "cpu", dtype: Any = None) -> CausalLM:
    """Load a causal LM and its tokenizer by hub id or path (weights via safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=_dtype(dtype, device),
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UltracurateError(f"cannot load llm '{ref}': {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batches are padded on the left for generation
    return CausalLM(model, tok, ref, device)


def make_tiny(folder: str | Path) -> str:
    """A tiny random Llama and a small BPE tokenizer (trained on the exemplars) in folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from ..instruct.exemplars import default_path
    corpus = default_path().read_text().splitlines()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=8192)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)
