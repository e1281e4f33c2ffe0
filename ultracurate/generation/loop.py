"""The generation loop: free-form Prompt-to-Prompt img2img pairs and region-based alternating
diffusion, for one call of candidate pairs, in one place.

Each candidate is a PAIR: row 2p renders the source caption, row 2p+1 the target caption, both
from the same noised anchor latent. Every step's rule is written out below:

    a         = VAE posterior sample of the anchor, times the VAE's scaling factor
    z_0       = a + sigma_0 * n               n: the initial noise
    z_0[tgt]  = z_0[src]                      the pair shares its starting latent
    for i, t in the pair's real timesteps:
        attention control for step i          (attention.py: self/cross windows by fraction)
        eps      = UNet(z_i / sqrt(sigma_i^2 + 1), t, captions)
        z_{i+1}  = euler_ancestral_step(z_i, eps, sigma_i -> sigma_{i+1}, fresh noise)
        region, on the rows the behaviour blends after step i:
            z_{i+1} = (1 - M) * (a + sigma_{i+1} * n) + M * z_{i+1}   (clean a at the last step)
    images    = VAE decode(z_last)

`method` and `ultraedit-compat` run this same loop; where they part ways (noise source, anchor
encoding, attention processor and windows, SDXL's added conditioning, which rows blend, pixel
rounding, seeds and parameters) the loop asks its behaviour object (behaviour.py). See
docs/generation.md.

Candidates with different step counts share the call: at iteration i only the pairs that still
have a step i go through the UNet, each with its own timestep and sigmas.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from . import params as P
from .attention import AttentionEdit, install
from .behaviour import COMPAT, get


@dataclass
class Pair:
    """One candidate to generate."""

    source_caption: str
    target_caption: str
    anchor: Image.Image                 # size x size RGB (resize_center_crop)
    params: dict                        # from the behaviour's sample_params
    seed: int = 0
    # region: the soft mask M at latent size (1 = may change), or a function of the sampled
    # soft value (None: the hard mask) that returns it
    mask: Any = None


@dataclass
class PairImages:
    source: Image.Image
    edited: Image.Image


@dataclass
class Trace:
    """What a test or a golden check may look at (filled when passed to generate_*)."""

    start: torch.Tensor | None = None          # z_0 after the pair shares it
    noise: torch.Tensor | None = None          # the initial noise n, per row
    anchor_latents: torch.Tensor | None = None  # a, per row
    steps: list = field(default_factory=list)  # z after each iteration (all rows)
    blended: list = field(default_factory=list)  # iteration indices where a blend happened
    final: torch.Tensor | None = None
    images: torch.Tensor | None = None         # decoded, in [0, 1]


# -- the per-step rule and helpers --------------------------------------------------------------
def euler_ancestral_step(z: torch.Tensor, eps: torch.Tensor, sigma_from: torch.Tensor,
                         sigma_to: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One Euler-ancestral step from sigma_from to sigma_to for an epsilon-predicting model
    (diffusers' EulerAncestralDiscreteScheduler.step, term for term): the denoised estimate
    x0 = z - sigma_from * eps, a deterministic move to sigma_down, and fresh noise * sigma_up,
    with sigma_up^2 + sigma_down^2 = sigma_to^2."""
    x0 = z - sigma_from * eps
    sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    derivative = (z - x0) / sigma_from
    return z + derivative * (sigma_down - sigma_from) + noise * sigma_up


def encode_captions(pipe, captions: list[str], cache: dict | None = None):
    """(embeds, pooled) per caption, each unique caption encoded once."""
    cache = {} if cache is None else cache
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        with torch.no_grad():
            emb, _, pooled, _ = pipe.encode_prompt(prompt=todo, device=pipe.unet.device,
                                                   num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        for i, c in enumerate(todo):
            cache[c] = (emb[i], pooled[i])
    return (torch.stack([cache[c][0] for c in captions]),
            torch.stack([cache[c][1] for c in captions]))


@contextlib.contextmanager
def added_conditioning(unet, on: bool):
    """SDXL's added conditioning (pooled text + size/crop ids) on or off for this call; the
    released generator switches it off by setting the config's addition_embed_type to None."""
    saved = unet.config.addition_embed_type
    unet.config.addition_embed_type = unet.config["addition_embed_type"] if on else None
    try:
        yield
    finally:
        unet.config.addition_embed_type = saved


def _per_row(values: list) -> torch.Tensor:
    """One value per pair -> a (rows, 1, 1, 1) column, each pair's value on both its rows."""
    return torch.stack(values).repeat_interleave(2).view(-1, 1, 1, 1)


# -- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def run_pairs(pipe, pairs: list[Pair], behaviour, *, trace: Trace | None = None,
              store_maps: bool = False, edit: AttentionEdit | None = None,
              on_step: Callable[[int, int], None] | None = None) -> list[PairImages]:
    """Generate one call of pairs with a behaviour ('method', 'ultraedit-compat' or its
    object). In `ultraedit-compat` the pairs form one released call and share their
    parameters (the caller has drawn them with the behaviour's sample_params for its seed).
    on_step(i, n) is told after each denoising step i of the call's n (for a progress bar)."""
    bh = get(behaviour)
    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, unet.dtype
    n_pairs, everyone = len(pairs), list(range(len(pairs)))
    region = pairs[0].params["mode"] == "region"
    bh.check_call(pairs)

    # 1. Captions, rows [source_0, target_0, source_1, target_1, ...].
    captions = [c for p in pairs for c in (p.source_caption, p.target_caption)]
    embeds, pooled = encode_captions(pipe, captions)
    size = pairs[0].anchor.size[0]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device,
                            dtype=embeds.dtype).repeat(2 * n_pairs, 1)

    # 2. Each pair's real timesteps and their sigmas (one more, ending at 0).
    sched_of: dict = {}
    for p in pairs:
        key = (p.params["total_steps"], p.params["strength"])
        if key not in sched_of:
            sched_of[key] = P.schedule(pipe.scheduler, *key)
    ts = [sched_of[(p.params["total_steps"], p.params["strength"])] for p in pairs]
    n_steps = [len(t) for t, _ in ts]

    # 3. Attention control: the behaviour's processor and token alignment.
    edit = edit or AttentionEdit(store=store_maps)
    edit.behaviour, edit.self_max_tokens = bh.name, int(np.ceil(size / 32)) ** 2
    all_mapper, all_alphas = bh.mappers(pipe.tokenizer, pairs)
    install(unet, edit, bh.processor)

    # 4. The anchor latent a, and z_0 = a + sigma_0 * n, shared by the pair.
    noise = bh.noise(pairs, device)
    a = bh.anchor_latents(pipe, pairs, noise, region)
    n = noise.draw(tuple(a.shape[1:]), everyone)
    z = a + n * _per_row([s[0] for _, s in ts]).to(device)
    z[1::2] = z[::2]
    for _ in range(bh.unused_draws(pairs)):
        noise.draw(tuple(a.shape[1:]), everyone)

    M = None
    if region:
        M = torch.stack([torch.as_tensor(
            p.mask(p.params.get("soft_value")) if callable(p.mask) else p.mask,
            dtype=torch.float32) for p in pairs])
        M = M.view(n_pairs, 1, *M.shape[-2:]).repeat_interleave(2, dim=0).to(device)
    if trace is not None:
        trace.start, trace.noise, trace.anchor_latents = z.clone(), n.clone(), a.clone()

    # 5. The denoising loop.
    with added_conditioning(unet, on=bh.added_conditioning):
        for i in range(max(n_steps)):
            act = [p for p in everyone if i < n_steps[p]]     # pairs that have a step i
            r = torch.tensor([2 * p + k for p in act for k in (0, 1)], device=device)
            whole = len(act) == n_pairs                        # keep z's memory layout
            t = _per_row([ts[p][0][i] for p in act]).view(-1).to(device)
            s_from = _per_row([ts[p][1][i] for p in act]).to(device)
            s_to = _per_row([ts[p][1][i + 1] for p in act]).to(device)

            # Attention control windows of step i (fractions of each pair's real steps).
            fr = [pairs[p].params for p in act]
            edit.self_on, edit.cross_on, edit.mapper, edit.alphas = bh.attention_step(
                [i < int(n_steps[p] * f["self_replace_frac"]) for p, f in zip(act, fr)],
                [i < int((n_steps[p] + 1) * f["cross_replace_frac"]) for p, f in zip(act, fr)],
                act, all_mapper, all_alphas)

            # eps = UNet(z / sqrt(sigma^2 + 1), t, captions); then the scheduler step.
            z_i = z if whole else z[r]
            eps = unet((z_i / ((s_from ** 2 + 1) ** 0.5)).to(dtype), t,
                       encoder_hidden_states=embeds[r],
                       added_cond_kwargs={"text_embeds": pooled[r], "time_ids": time_ids[r]},
                       return_dict=False)[0].float()
            z_next = euler_ancestral_step(z_i.float(), eps, s_from, s_to,
                                          noise.draw(tuple(a.shape[1:]), act))

            # Region: blend with the anchor's path, re-noised to the next sigma (clean a at a
            # pair's last step), on the rows the behaviour blends after step i.
            if region:
                last = _per_row([torch.tensor(i == n_steps[p] - 1) for p in act]).to(device)
                blend = bh.blend_rows(i, last)
                if bool(blend.any()):
                    anchor_path = torch.where(last, a[r], a[r] + n[r] * s_to)
                    blended = (1 - M[r]) * anchor_path + M[r] * z_next
                    z_next = blended if bool(blend.all()) else torch.where(blend, blended,
                                                                          z_next)
                    if trace is not None:
                        trace.blended.append(i)
            if whole:
                z = z_next
            else:
                z = z.clone()
                z[r] = z_next
            if trace is not None:
                trace.steps.append(z.clone())
            if on_step is not None:
                on_step(i + 1, max(n_steps))

    # 6. Decode, and pixels by the behaviour's rounding.
    images = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if trace is not None:
        trace.final, trace.images = z.clone(), images.clone()
    pixels = bh.to_uint8(images.permute(0, 2, 3, 1).cpu().numpy())
    pil = [Image.fromarray(px) for px in pixels]
    return [PairImages(pil[2 * k], pil[2 * k + 1]) for k in range(n_pairs)]


# -- the two behaviours' entry points ------------------------------------------------------------
def generate_method(pipe, pairs: list[Pair], **kw) -> list[PairImages]:
    """`method`: any mix of candidates (free-form or region, each with its own seed and
    parameters from params.sample_method) in one call."""
    out: list[Any] = [None] * len(pairs)
    for mode in ("free", "region"):
        idx = [k for k, p in enumerate(pairs) if p.params["mode"] == mode]
        if idx:
            for k, res in zip(idx, run_pairs(pipe, [pairs[k] for k in idx], "method", **kw)):
                out[k] = res
    return out


def generate_compat(pipe, pairs: list[Pair], seed: int, mode: str, **kw) -> tuple[list, dict]:
    """`ultraedit-compat`: one released call. Seeds the global generators with seed, draws the
    parameters as the released code does, and runs the pairs together (the first pair's source
    caption is the attention base of every prompt). Returns (images, parameters). Raises
    behaviour.CallDropped where the released generator fails (its driver drops the call)."""
    bh = get(COMPAT)
    for p in pairs:
        p.seed = seed
    bh.draw_call_params(pairs, mode, str(pipe.unet.device))
    return run_pairs(pipe, pairs, bh, **kw), dict(pairs[0].params)
