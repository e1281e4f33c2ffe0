"""The sampled parameters of a candidate (from its seed), and the timesteps it runs.

Defaults are the released generator's (docs/method.md): free-form img2img at strength 0.6
with 3, 5 or 8 total steps and guidance in U(0.4, 0.8); region-based at strength 0.3 with 10 or
14 steps, guidance in {0, 0.2, 0.4, 0.6}, a soft value in {0, 0.1, 0.3, 0.5, 0.7, 0.8} used half
the time; one attention replacement fraction in U(0.1, 0.9) for self- and cross-attention.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..masks import SOFT_VALUES

FREE = {"steps": (3, 5, 8), "strength": 0.6, "guidance": (0.4, 0.8)}
REGION = {"steps": (10, 14), "strength": 0.3, "guidance": (0.0, 0.2, 0.4, 0.6),
          "soft_values": SOFT_VALUES}
REPLACE_FRAC = (0.1, 0.9)
CFG_RANGE = (7.5, 15.0)       # the released code draws (and ignores) a value in this range


def sample_method(seed: int, mode: str) -> dict:
    """Every sampled parameter of a `method` candidate, from its own seed (independent of what
    else is in the batch)."""
    rng = np.random.default_rng([int(seed), 1])
    frac = float(rng.uniform(*REPLACE_FRAC))
    if mode == "free":
        return {"mode": "free", "total_steps": int(rng.choice(FREE["steps"])),
                "strength": FREE["strength"], "guidance": float(rng.uniform(*FREE["guidance"])),
                "self_replace_frac": frac, "cross_replace_frac": frac}
    use_soft = bool(rng.integers(2))
    soft = float(rng.choice(REGION["soft_values"]))
    return {"mode": "region", "total_steps": int(rng.choice(REGION["steps"])),
            "strength": REGION["strength"],
            "guidance": float(rng.choice(REGION["guidance"])),
            "self_replace_frac": frac, "cross_replace_frac": frac,
            "soft_value": soft if use_soft else None}


def seed_everything(seed: int, device: str = "cpu") -> None:
    """The released code's per-sample seeding: torch (and CUDA), python and numpy."""
    torch.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def sample_compat(seed: int, mode: str, device: str = "cpu") -> dict:
    """The released seed protocol: seed all generators, draw the replacement fraction and an
    unused guidance value from torch, then the pipeline arguments from python's random. Leaves
    the global torch generator where the released pipeline call starts drawing."""
    seed_everything(seed, device)
    frac = REPLACE_FRAC[0] + torch.rand(()).item() * (REPLACE_FRAC[1] - REPLACE_FRAC[0])
    _unused_cfg = CFG_RANGE[0] + torch.rand(()).item() * (CFG_RANGE[1] - CFG_RANGE[0])
    if mode == "free":
        steps = random.choice(list(FREE["steps"]))
        guidance = random.uniform(*FREE["guidance"])
        return {"mode": "free", "total_steps": steps, "strength": FREE["strength"],
                "guidance": guidance, "self_replace_frac": frac, "cross_replace_frac": frac}
    steps = random.choice(list(REGION["steps"]))
    guidance = random.choice(list(REGION["guidance"]))
    soft = random.choice(list(REGION["soft_values"]))
    use_soft = random.choice([True, False])
    return {"mode": "region", "total_steps": steps, "strength": REGION["strength"],
            "guidance": guidance, "self_replace_frac": frac, "cross_replace_frac": frac,
            "soft_value": soft if use_soft else None}


def schedule(scheduler, total_steps: int, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the real denoising steps: the last int(total_steps * strength)
    of the scheduler's total_steps (trailing spacing for SDXL-Turbo), and their sigmas with
    the next one after each (so sigmas has one more entry, ending at 0)."""
    scheduler.set_timesteps(total_steps, device="cpu")
    real = min(int(total_steps * strength), total_steps)
    start = total_steps - real
    return (scheduler.timesteps[start:].clone().float(),
            scheduler.sigmas[start:].clone().float())


def real_steps(total_steps: int, strength: float) -> int:
    return min(int(total_steps * strength), total_steps)
