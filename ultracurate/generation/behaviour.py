"""What `method` and `ultraedit-compat` do differently, one object each, so that the generation
loop (loop.py) reads straight down and calls the behaviour where the two part ways.

A behaviour says:
- seed planning: whether a seed belongs to a candidate or to a call, its bits (the plan derives
  it in SQL: sql/queries/generate.sql), and the parameters drawn from it;
- the noise source: per-candidate generators, or the device's global generator in the released
  draw order (with the draws the released region call makes and never uses);
- the anchor latents: how the anchors are VAE-encoded (once per pair, or once per prompt in the
  released call's layout);
- the attention processor, its token alignment and its per-step windows;
- SDXL's added conditioning (on or off);
- the region blend rule (which rows blend with the anchor's path after step i);
- pixel rounding.

See docs/generation.md for the table of differences.
"""

from __future__ import annotations

import numpy as np
import torch

from . import params as P
from .attention import CompatProcessor, RefineProcessor, refine_mapper

COMPAT = "ultraedit-compat"


# -- noise sources ------------------------------------------------------------------------------
class PerPairNoise:
    """`method`: each candidate draws from its own generator seeded by its seed, so its noise
    does not depend on what else is in the call. One draw serves both rows of the pair."""

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


# -- the two behaviours -------------------------------------------------------------------------
class Method:
    """The method as described, with the released code's defaults."""

    name = "method"
    added_conditioning = True
    processor = RefineProcessor
    pairs_per_call = {"free": 16, "region": 16}  # the default; a plan may choose another
    region_at_native_size = False     # region calls run at any size

    # seed planning: one 63-bit seed per candidate, from (run seed, edit, index)
    seed_per_call = False
    seed_bits = 63

    def sample_params(self, seed: int, mode: str, device: str = "cpu") -> dict:
        return P.sample_method(seed, mode)

    def draw_call_params(self, pairs, mode: str, device: str = "cpu") -> None:
        """Each candidate's parameters from its own seed."""
        for p in pairs:
            p.params = self.sample_params(p.seed, mode, device)

    def noise(self, pairs, device) -> PerPairNoise:
        return PerPairNoise([p.seed for p in pairs], device)

    def anchor_latents(self, pipe, pairs, noise, region: bool) -> torch.Tensor:
        """a per row: one VAE posterior sample per pair (both rows share it), scaled."""
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess([p.anchor for p in pairs])
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        mean = posterior.mean.float().repeat_interleave(2, dim=0)
        std = posterior.std.float().repeat_interleave(2, dim=0)
        sample = noise.draw(tuple(mean.shape[1:]), list(range(len(pairs))))
        return (mean + std * sample) * vae.config.scaling_factor

    def unused_draws(self, pairs) -> int:
        return 0

    def mappers(self, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's target aligned to its own source caption."""
        maps = [refine_mapper(tokenizer, p.source_caption, p.target_caption) for p in pairs]
        return torch.stack([m for m, _ in maps]), torch.stack([a for _, a in maps])

    def check_call(self, pairs) -> None:
        """Any mix of candidates, steps and parameters may share a call."""

    def attention_step(self, self_on: list[bool], cross_on: list[bool], act: list[int],
                       mapper: torch.Tensor, alphas: torch.Tensor):
        """(self_on, cross_on, mapper, alphas) for the UNet call of step i: one switch and one
        alignment per pair still in the call (act)."""
        return torch.tensor(self_on), torch.tensor(cross_on), mapper[act], alphas[act]

    def blend_rows(self, i: int, last: torch.Tensor) -> torch.Tensor:
        """After odd steps, and after each pair's last step (with the clean anchor latent)."""
        return last | (i % 2 == 1)

    def to_uint8(self, images: np.ndarray) -> np.ndarray:
        return np.round(images * 255.0).astype(np.uint8)


class Compat:
    """What the released generator does (UltraEdit's sdxl_p2p_pipeline.py and its driver)."""

    name = COMPAT
    added_conditioning = False          # the driver sets unet.config.addition_embed_type = None
    processor = CompatProcessor
    pairs_per_call = {"free": 7, "region": 6}   # the released driver's batches
    region_at_native_size = True      # the inpaint pipeline works at unet.sample_size * 8

    # seed planning: one 32-bit seed per released call (the edits of a mode, taken
    # pairs_per_call at a time, per candidate index), from (run seed, mode, call, index)
    seed_per_call = True
    seed_bits = 32

    def sample_params(self, seed: int, mode: str, device: str = "cpu") -> dict:
        return P.sample_compat(seed, mode, device)

    def draw_call_params(self, pairs, mode: str, device: str = "cpu") -> None:
        """The call's parameters from its seed (pairs[0].seed), shared by its pairs. Seeds
        the global generators: call it right before run_pairs."""
        prm = self.sample_params(pairs[0].seed, mode, device)
        for p in pairs:
            p.params = dict(prm)

    def noise(self, pairs, device) -> GlobalNoise:
        return GlobalNoise(device)

    def anchor_latents(self, pipe, pairs, noise, region: bool) -> torch.Tensor:
        """a per row, as the released call computes it: its batch holds each image once per
        prompt, channels-last as the image processor lays it out, and the VAE's output depends
        on the batch (on the CPU), so every image is encoded twice in one batch of 2n. The
        img2img path keeps the encoder's channels-last latents into the UNet; the inpaint path
        copies them contiguous (its `repeat`)."""
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess([p.anchor for p in pairs for _ in (0, 1)])
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        sample = noise.draw(tuple(posterior.mean.shape[1:]), list(range(len(pairs))))
        a = vae.config.scaling_factor * (posterior.mean + posterior.std * sample)
        return a.contiguous() if region else a

    def unused_draws(self, pairs) -> int:
        """The region call VAE-encodes the masked image, and the outer-mask image when it
        passes the soft mask: samples drawn and never used (a 4-channel UNet)."""
        prm = pairs[0].params
        if prm["mode"] != "region":
            return 0
        return 1 + (prm.get("soft_value") is not None)

    def mappers(self, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Every prompt after the first aligned to the first (the released batching)."""
        captions = [c for p in pairs for c in (p.source_caption, p.target_caption)]
        why = released_mapper_error(tokenizer, captions)
        if why:
            raise CallDropped(why)
        maps = [refine_mapper(tokenizer, captions[0], c) for c in captions[1:]]
        return torch.stack([m for m, _ in maps]), torch.stack([a for _, a in maps])

    def check_call(self, pairs) -> None:
        """A released call's pairs share one seed, hence one set of parameters."""
        if len({(p.params["total_steps"], p.params["mode"]) for p in pairs}) > 1:
            raise ValueError("a compat call's pairs share one seed, so one set of parameters")

    def attention_step(self, self_on: list[bool], cross_on: list[bool], act: list[int],
                       mapper: torch.Tensor, alphas: torch.Tensor):
        """One switch for the whole call, and every prompt aligned to the first."""
        return self_on[0], cross_on[0], mapper, alphas

    def blend_rows(self, i: int, last: torch.Tensor) -> torch.Tensor:
        """After odd steps only (the clean anchor latent when the last step index is odd)."""
        return torch.full_like(last, i % 2 == 1)

    def to_uint8(self, images: np.ndarray) -> np.ndarray:
        return (images * 255.0).astype(np.uint8)          # the driver's truncation


BEHAVIOURS = {b.name: b for b in (Method(), Compat())}


def get(behaviour) -> Method | Compat:
    """The behaviour object for a name (or the object itself)."""
    if isinstance(behaviour, (Method, Compat)):
        return behaviour
    try:
        return BEHAVIOURS[behaviour]
    except KeyError:
        raise ValueError(f"unknown behaviour '{behaviour}' "
                         f"({' or '.join(BEHAVIOURS)})") from None


# -- the released call's failure on long prompts -----------------------------------------------
class CallDropped(Exception):
    """The released generator would fail this call, and its driver drop it (the reason)."""


def released_mapper_error(tokenizer, prompts: list[str], max_len: int = 77) -> str | None:
    """Why the released attention mapper (`get_refinement_mapper`) fails on these prompts, or
    None. It aligns every prompt after the first to the first without truncating: a later
    prompt over max_len tokens fails while the mapper is built, and a target token aligned to
    a first-prompt token at or past max_len fails at the first cross-attention edit."""
    from .attention import align_tokens
    first = tokenizer.encode(prompts[0])
    for k, prompt in enumerate(prompts[1:], start=1):
        ids = tokenizer.encode(prompt)
        if len(ids) > max_len:
            return (f"prompt {k} of the released call has {len(ids)} tokens (over {max_len}): "
                    "the released generator fails and its driver drops the call")
        if len(first) > max_len and max(align_tokens(first, ids)[:max_len]) >= max_len:
            return (f"the call's first prompt has {len(first)} tokens (over {max_len}) and "
                    f"prompt {k} aligns past them: the released generator fails and its "
                    "driver drops the call")
    return None
