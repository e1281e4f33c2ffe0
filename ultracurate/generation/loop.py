"""The generation loop: free-form Prompt-to-Prompt img2img pairs and region-based alternating
diffusion, for a batch of candidate pairs, in one place.

Each candidate is a PAIR: row 2p renders the source caption, row 2p+1 the target caption, both
from the same noised anchor latent. Every step's rule is written out below:

    z_0       = a + sigma_0 * n               a: anchor's VAE latent, n: the initial noise
    z_0[tgt]  = z_0[src]                      the pair shares its starting latent
    for i, t in the pair's real timesteps:
        attention control for step i          (attention.py: self/cross windows by fraction)
        eps      = UNet(z_i / sqrt(sigma_i^2 + 1), t, captions)
        z_{i+1}  = Euler ancestral(z_i, eps, sigma_i -> sigma_{i+1}) + fresh noise * sigma_up
        region, when i is odd (method: and always at the last step):
            z_{i+1} = (1 - M) * (a + sigma_{i+1} * n) + M * z_{i+1}   (clean a at the last step)
    images    = VAE decode(z_last)

The same loop serves both behaviours; they differ in the noise source (per-candidate
generators vs the global generator in the released draw order), the attention processor,
SDXL's added conditioning (on vs off), the final blend, and the pixel rounding. See
docs/generation.md.

Candidates with different step counts share the batch: at iteration i only the pairs that
still have a step i go through the UNet, each with its own timestep and sigmas.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import params as P
from .attention import AttentionEdit, install, refine_mapper

COMPAT = "ultraedit-compat"


@dataclass
class Pair:
    """One candidate to generate."""

    source_caption: str
    target_caption: str
    anchor: Image.Image                 # size x size RGB (resize_center_crop)
    params: dict                        # from params.sample_method / sample_compat
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


# -- noise sources ------------------------------------------------------------------------------
class PerPairNoise:
    """`method`: each candidate draws from its own generator seeded by its seed, so its images
    do not depend on what else is in the batch. One draw serves both rows of the pair."""

    def __init__(self, seeds: list[int], device):
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def draw(self, shape, pairs: list[int], dtype=torch.float32) -> torch.Tensor:
        one = [torch.randn((1, *shape), generator=self.gens[p], device=self.device,
                           dtype=dtype) for p in pairs]
        return torch.cat(one).repeat_interleave(2, dim=0)


class GlobalNoise:
    """`ultraedit-compat`: everything from the device's global generator, one tensor for all
    rows of the call per draw, in the released pipeline's order."""

    def __init__(self, device):
        self.device = device

    def draw(self, shape, pairs: list[int], dtype=torch.float32) -> torch.Tensor:
        return torch.randn((2 * len(pairs), *shape), device=self.device, dtype=dtype)


# -- helpers ----------------------------------------------------------------------------------
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


def to_pil(images: torch.Tensor, behaviour: str) -> list[Image.Image]:
    """[0, 1] images to PIL: the released code truncates (uint8(255 * x)), method rounds."""
    arr = images.float().permute(0, 2, 3, 1).cpu().numpy() * 255.0
    arr = arr if behaviour == COMPAT else np.round(arr)
    return [Image.fromarray(a.astype(np.uint8)) for a in arr]


# -- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def run_pairs(pipe, pairs: list[Pair], behaviour: str, *, compat_extra_draws: int = 0,
              trace: Trace | None = None, store_maps: bool = False,
              edit: AttentionEdit | None = None) -> list[PairImages]:
    """Generate a batch of pairs. In `ultraedit-compat` the pairs form one released call and
    must share their parameters (the caller has run params.sample_compat for their seed)."""
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    compat = behaviour == COMPAT
    n_pairs = len(pairs)
    rows = 2 * n_pairs
    region = pairs[0].params["mode"] == "region"
    if compat and len({(p.params["total_steps"], p.params["mode"]) for p in pairs}) > 1:
        raise ValueError("a compat call's pairs share one seed, so one set of parameters")

    # Captions: rows [source_0, target_0, source_1, target_1, ...].
    captions = [c for p in pairs for c in (p.source_caption, p.target_caption)]
    embeds, pooled = encode_captions(pipe, captions)
    size = pairs[0].anchor.size[0]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device,
                            dtype=embeds.dtype).repeat(rows, 1)

    # Each pair's schedule: its real timesteps and their sigmas (one more, ending at 0).
    sched_of = {}
    for p in pairs:
        key = (p.params["total_steps"], p.params["strength"])
        if key not in sched_of:
            sched_of[key] = P.schedule(sched, *key)
    ts = [sched_of[(p.params["total_steps"], p.params["strength"])] for p in pairs]
    n_steps = [len(t) for t, _ in ts]

    # Attention control for the pair (mapper: target tokens -> source tokens).
    edit = edit or AttentionEdit(behaviour=behaviour, store=store_maps)
    edit.behaviour, edit.self_max_tokens = behaviour, int(np.ceil(size / 32)) ** 2
    if compat:  # the released batch: every prompt after the first against the first
        maps = [refine_mapper(pipe.tokenizer, captions[0], c) for c in captions[1:]]
    else:
        maps = [refine_mapper(pipe.tokenizer, p.source_caption, p.target_caption)
                for p in pairs]
    all_mapper = torch.stack([m for m, _ in maps])
    all_alphas = torch.stack([a for _, a in maps])
    install(unet, edit)

    noise_src = GlobalNoise(device) if compat else PerPairNoise([p.seed for p in pairs], device)
    everyone = list(range(n_pairs))

    # The anchor latent a: the VAE posterior sample (one per row in compat, whose call encodes
    # each image twice; one per pair in method), times the VAE's scaling factor.
    pixels = pipe.image_processor.preprocess([p.anchor for p in pairs]).to(device, vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    mean = posterior.mean.float().repeat_interleave(2, dim=0)
    std = posterior.std.float().repeat_interleave(2, dim=0)
    lat_shape = tuple(mean.shape[1:])
    a = (mean + std * noise_src.draw(lat_shape, everyone)) * vae.config.scaling_factor

    # z_0 = a + sigma_0 * n, and the pair shares it.
    n = noise_src.draw(lat_shape, everyone)
    sigma0 = torch.stack([s[0] for _, s in ts]).repeat_interleave(2).view(-1, 1, 1, 1)
    z = a + n * sigma0.to(device)
    z[1::2] = z[::2]
    if compat and region:  # draws the released region call makes and never uses
        for _ in range(1 + compat_extra_draws):
            noise_src.draw(lat_shape, everyone)

    M = None
    if region:
        M = torch.stack([torch.as_tensor(
            p.mask(p.params.get("soft_value")) if callable(p.mask) else p.mask,
            dtype=torch.float32) for p in pairs])
        M = M.view(n_pairs, 1, *M.shape[-2:]).repeat_interleave(2, dim=0).to(device)
    if trace is not None:
        trace.start, trace.noise, trace.anchor_latents = z.clone(), n.clone(), a.clone()

    with added_conditioning(unet, on=not compat):
        for i in range(max(n_steps)):
            act = [p for p in everyone if i < n_steps[p]]   # pairs that have a step i
            r = torch.tensor([2 * p + k for p in act for k in (0, 1)], device=device)
            t = torch.stack([ts[p][0][i] for p in act]).repeat_interleave(2).to(device)
            s_from = torch.stack([ts[p][1][i] for p in act]).repeat_interleave(2)
            s_to = torch.stack([ts[p][1][i + 1] for p in act]).repeat_interleave(2)
            s_from, s_to = (s.view(-1, 1, 1, 1).to(device) for s in (s_from, s_to))

            # Attention control windows of step i (fractions of the pair's real steps).
            fr = [pairs[p].params for p in act]
            self_on = [i < int(n_steps[p] * f["self_replace_frac"]) for p, f in zip(act, fr)]
            cross_on = [i < int((n_steps[p] + 1) * f["cross_replace_frac"])
                        for p, f in zip(act, fr)]
            if compat:
                edit.self_on, edit.cross_on = self_on[0], cross_on[0]
                edit.mapper, edit.alphas = all_mapper, all_alphas
            else:
                edit.self_on, edit.cross_on = torch.tensor(self_on), torch.tensor(cross_on)
                edit.mapper, edit.alphas = all_mapper[act], all_alphas[act]

            # eps = UNet(z / sqrt(sigma^2 + 1), t, captions)
            z_in = (z[r] / ((s_from ** 2 + 1) ** 0.5)).to(dtype)
            eps = unet(z_in, t, encoder_hidden_states=embeds[r],
                       added_cond_kwargs={"text_embeds": pooled[r], "time_ids": time_ids[r]},
                       return_dict=False)[0].float()

            # Euler ancestral step sigma_from -> sigma_to, plus fresh noise * sigma_up.
            sample = z[r].float()
            x0 = sample - s_from * eps
            s_up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
            s_down = (s_to ** 2 - s_up ** 2) ** 0.5
            z_next = sample + (sample - x0) / s_from * (s_down - s_from)
            z_next = z_next + noise_src.draw(lat_shape, act) * s_up

            # Region: blend with the anchor's path after odd steps (method: and at the last).
            if region:
                last = torch.tensor([i == n_steps[p] - 1 for p in act],
                                    device=device).repeat_interleave(2).view(-1, 1, 1, 1)
                blend = i % 2 == 1 or (not compat and bool(last.any()))
                if blend:
                    renoised = a[r] + n[r] * s_to          # a re-noised to the next timestep
                    target = torch.where(last, a[r], renoised)   # clean a at the last step
                    blended = (1 - M[r]) * target + M[r] * z_next
                    if i % 2 == 1:
                        z_next = blended
                    else:  # method's extra final blend: only the pairs at their last step
                        z_next = torch.where(last, blended, z_next)
                    if trace is not None:
                        trace.blended.append(i)
            z = z.clone()
            z[r] = z_next
            if trace is not None:
                trace.steps.append(z.clone())

    images = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if trace is not None:
        trace.final, trace.images = z.clone(), images.clone()
    pil = to_pil(images, behaviour)
    return [PairImages(pil[2 * k], pil[2 * k + 1]) for k in range(n_pairs)]


# -- the two behaviours' entry points ------------------------------------------------------------
def generate_method(pipe, pairs: list[Pair], **kw) -> list[PairImages]:
    """`method`: any mix of candidates (free-form or region, each with its own seed and
    parameters from params.sample_method) in one batch."""
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
    caption is the attention base of every prompt). Returns (images, parameters)."""
    device = str(pipe.unet.device)
    prm = P.sample_compat(seed, mode, device)
    for p in pairs:
        p.params, p.seed = dict(prm), seed
    extra = 1 if (mode == "region" and prm.get("soft_value") is not None) else 0
    return run_pairs(pipe, pairs, COMPAT, compat_extra_draws=extra, **kw), prm
