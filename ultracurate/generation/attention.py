"""Prompt-to-Prompt attention control, written as diffusers attention processors.

Two behaviours (see docs/generation.md):

- `RefineProcessor` (behaviour `method`): proper Prompt-to-Prompt "refine". The batch is laid
  out as pairs [source_0, target_0, source_1, target_1, ...]. While a pair's cross-attention
  window is open, the target's cross-attention map of every target token aligned to a source
  token is the source's map of that token; unaligned (new) tokens keep the target's own map.
  While its self-attention window is open, on layers at 1/32 of the image or coarser, the
  target uses the source's self-attention map (its queries and keys), with its own values.
  Source rows are never changed. Attention runs fused (SDPA) wherever no map is edited.

- `CompatProcessor` (behaviour `ultraedit-compat`): what the released generator's processor
  does without classifier-free guidance. It computes every attention map explicitly; of the
  (prompts x heads) rows it edits only the second half, viewed as (prompts, heads/2): the first
  prompt's slice is the "base", the others are "replaced" from it. With one pair that is the
  target's first half of heads feeding its second half; the source prompt's attention never
  reaches the target.

Both read their per-call settings from a shared `AttentionEdit` object that the generation
loop updates before each UNet call; with `store=True` they keep the edited maps for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MAX_TOKENS = 77


# -- token alignment (the "refine" mapper) ---------------------------------------------------
def align_tokens(source_ids: list[int], target_ids: list[int]) -> list[int]:
    """For each target token, the index of the source token it aligns to, or -1.

    Global alignment scored +1 match, -1 mismatch, 0 gap; on ties the traceback prefers a gap
    in the source (target token unaligned), then a gap in the target, then the diagonal, as
    the released code does, so both behaviours align identically."""
    n, m = len(source_ids), len(target_ids)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    move = np.zeros((n + 1, m + 1), dtype=np.int8)  # 1: left (target only), 2: up, 3: diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if source_ids[i - 1] == target_ids[j - 1] else -1)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    out: list[int] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and move[i, j] == 3:
            i, j = i - 1, j - 1
            out.append(i)
        elif j > 0 and move[i, j] == 1:
            j -= 1
            out.append(-1)
        else:
            i -= 1
    return out[::-1]


def refine_mapper(tokenizer, source: str, target: str, max_len: int = MAX_TOKENS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), each (max_len,): target position j takes the source's map at
    mapper[j] where alphas[j] == 1; positions past the target's tokens map to themselves."""
    src = tokenizer.encode(source)
    tgt = tokenizer.encode(target)
    aligned = align_tokens(src, tgt)[:max_len]
    mapper = torch.arange(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    k = len(aligned)
    mapper[:k] = torch.tensor(aligned, dtype=torch.int64)
    alphas[:k] = (mapper[:k] != -1).float()
    return mapper, alphas


# -- the per-call settings ---------------------------------------------------------------------
@dataclass
class AttentionEdit:
    """What the processors do in the next UNet call (set by the loop before each call).

    method: self_on / cross_on are bool per pair in the call; mapper / alphas (pairs, 77).
    compat: self_on / cross_on are single bools for the whole call; mapper / alphas are
    (prompts - 1, 77) against the first prompt."""

    behaviour: str = "method"
    self_on: torch.Tensor | bool = False
    cross_on: torch.Tensor | bool = False
    mapper: torch.Tensor | None = None
    alphas: torch.Tensor | None = None
    self_max_tokens: int = 256       # self-attention edited only on layers this coarse
    enabled: bool = True
    store: bool = False
    maps: list = field(default_factory=list)  # (layer, is_cross, edited probs) when store

    def keep(self, name: str, is_cross: bool, probs: torch.Tensor) -> None:
        if self.store:
            self.maps.append((name, is_cross, probs.detach().clone()))


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)  # (b, heads, n, d)


def _finish(attn, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


class RefineProcessor:
    """Proper Prompt-to-Prompt refine over a batch of [source, target] pairs."""

    def __init__(self, edit: AttentionEdit, name: str):
        self.edit, self.name = edit, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        edit = self.edit
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = _heads(attn, attn.to_q(hidden_states))
        k = _heads(attn, attn.to_k(context))
        v = _heads(attn, attn.to_v(context))
        b, h, n, d = q.shape
        on = edit.cross_on if is_cross else edit.self_on
        active = (edit.enabled and isinstance(on, torch.Tensor) and bool(on.any())
                  and (is_cross or n <= edit.self_max_tokens))
        if not active:
            out = F.scaled_dot_product_attention(q, k, v)
            return _finish(attn, out.transpose(1, 2).reshape(b, n, h * d))
        pairs = b // 2
        on = on.to(q.device).view(pairs, 1, 1, 1)
        if not is_cross:
            # The target attends with the source's queries and keys: the source's map.
            qp, kp = q.view(pairs, 2, h, n, d), k.view(pairs, 2, h, -1, d)
            q_t = torch.where(on, qp[:, 0], qp[:, 1])
            k_t = torch.where(on, kp[:, 0], kp[:, 1])
            q = torch.stack([qp[:, 0], q_t], 1).view(b, h, n, d)
            k = torch.stack([kp[:, 0], k_t], 1).view(b, h, -1, d)
            if edit.store:
                probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
                edit.keep(self.name, False, probs)
            out = F.scaled_dot_product_attention(q, k, v)
            return _finish(attn, out.transpose(1, 2).reshape(b, n, h * d))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (b, h, n, 77)
        pp = probs.view(pairs, 2, h, n, -1)
        src, tgt = pp[:, 0], pp[:, 1]
        mapper = edit.mapper.to(q.device)                  # (pairs, 77)
        alphas = edit.alphas.to(q.device).view(pairs, 1, 1, -1).bool()
        idx = mapper.clamp(min=0).view(pairs, 1, 1, -1).expand(pairs, h, n, mapper.shape[-1])
        from_src = torch.gather(src, -1, idx)
        new_tgt = torch.where(on & alphas, from_src, tgt)
        probs = torch.stack([src, new_tgt], 1).view(b, h, n, -1)
        edit.keep(self.name, True, probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, h * d)
        return _finish(attn, out)


class CompatProcessor:
    """The released generator's attention edit (no classifier-free guidance), explicitly."""

    def __init__(self, edit: AttentionEdit, name: str):
        self.edit, self.name = edit, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        edit = self.edit
        b, n, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, n, b)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (prompts*heads, n, m)
        if edit.enabled:
            rows = probs.shape[0]
            half = probs[rows // 2:]                       # the rows it edits (a view)
            prompts = edit.mapper.shape[0] + 1
            view = half.reshape(prompts, half.shape[0] // prompts, *half.shape[1:])
            base, replaced = view[0], view[1:]
            if is_cross and edit.cross_on:
                idx = edit.mapper.to(probs.device)         # (prompts-1, 77)
                mapped = base[:, :, idx].permute(2, 0, 1, 3)
                alphas = edit.alphas.to(probs.device).view(prompts - 1, 1, 1, -1).bool()
                view[1:] = torch.where(alphas, mapped, replaced)
            elif not is_cross and edit.self_on and n <= edit.self_max_tokens:
                view[1:] = base.unsqueeze(0).expand_as(replaced)
            edit.keep(self.name, is_cross, probs)
        out = torch.bmm(probs, value)
        out = attn.batch_to_head_dim(out)
        return _finish(attn, out)


def install(unet, edit: AttentionEdit, processor: type) -> None:
    """Put the behaviour's processor class on every attention layer of the UNet."""
    unet.set_attn_processor({name: processor(edit, name) for name in unet.attn_processors})
