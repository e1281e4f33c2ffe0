"""Make (or check) the ultraedit-compat golden file from UltraEdit's released generator.

The released generation code is not part of this repository. Get it (the pipelines were checked
at commit 1af5f04, "fix the None image bug"):

    git clone https://github.com/HaozheZhao/UltraEdit /tmp/UltraEdit
    git -C /tmp/UltraEdit checkout 1af5f04

then, from this repository's root, with ultracurate's venv (diffusers 0.42 runs the released
pipelines unmodified):

    .venv/bin/python scripts/make_compat_golden.py --released /tmp/UltraEdit/data_generation \\
        --out tests/data/generate_compat_golden_512.npz
    .venv/bin/python scripts/make_compat_golden.py --released /tmp/UltraEdit/data_generation \\
        --compare --threads 1 2          # released vs ultracurate, max abs differences

What it runs: `Prompt2PromptImg2ImgPipeline` and `Prompt2PromptInpaintPipeline`, imported from
the released `sdxl_p2p_pipeline.py` (and its `util.py`) through sys.path, unmodified, loaded in
float32 on the CPU from ultracurate's tiny editor checkpoint (`make_tiny`, built deterministically
with seed 0), with `unet.config.addition_embed_type = None` as the released driver sets it. Each
case follows the released driver (`data_generation.py`, `save_tsv` and `generate_images`): seed
torch, random and numpy with the call's seed; draw the replacement fraction
(0.1 + 0.8 * torch.rand()) and the unused CFG value (another torch.rand()); `refine` attention
control with that fraction for self and cross attention; prompts [s0, t0, s1, t1, ...] and
images [a0, a0, a1, a1, ...]; free-form: steps = random.choice([3, 5, 8]), guidance =
random.uniform(0.4, 0.8), strength 0.6; region: steps = random.choice([10, 14]), guidance =
random.choice([0, .2, .4, .6]), soft value = random.choice([0, .1, .3, .5, .7, .8]), then
random.choice([True, False]) for passing the outer mask (`temp_mask`) and `soft_mask`, at the
pipeline's default strength 0.3. Outputs are taken with `output_type="pt"` (images in [0, 1]);
the final latents are read in the same call through the pipeline's `callback`. The region
pipeline works at `unet.sample_size * 8` px (512 for SDXL-Turbo; the tiny UNet says 64), so
the script passes height = width = --size to it, which is what SDXL-Turbo's default gives.

Inputs (tests/_compat_cases.py, built from code, nothing stored): the demo's real photos from
scikit-image cropped to 512 px with PIL's default resampling, two real captions of each photo,
and crescent-shaped edit masks whose convex hulls are the outer masks.

The file keeps, per case in tests/_compat_cases.GOLDEN_CASES: the final latents of every row
(every LATENT_STRIDE-th latent row and column), the decoded images in [0, 1] (every
IMAGE_STRIDE-th pixel), the drawn parameters, and a digest of the inputs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _compat_cases as C  # noqa: E402
from ultracurate.generation import Pair, Trace, generate_compat  # noqa: E402
from ultracurate.models import editor, make_tiny  # noqa: E402

UPSTREAM_COMMIT = "1af5f04"
# Extra cases for --compare: 1 and 7 free-form pairs, 1 and 6 region pairs with and without
# the soft mask, several seeds (see _compat_cases for what each seed draws).
COMPARE_CASES = [("free", s, n) for n in (1, 7) for s in (5, 2, 11)] + \
                [("region", s, n) for n in (1, 6) for s in (7, 0, 1)]
# Prompt lists for the long-caption check: does the released call fail (its driver then
# drops the call), and does ultracurate say so? 92 and 77 tokens.
LONG, EXACT = " ".join(["photosynthesizing"] * 30), " ".join(["photosynthesizing"] * 25)
SHORT = ("a photo of a cat on a sofa", "a photo of a dog on a red sofa")
LONG_CASES = [list(SHORT), [SHORT[0], LONG], [*SHORT, LONG, SHORT[1]], [LONG, SHORT[0]],
              [SHORT[0], EXACT]]


def released_pipes(released: Path, ref: str):
    sys.path.insert(0, str(released))
    from sdxl_p2p_pipeline import Prompt2PromptImg2ImgPipeline, Prompt2PromptInpaintPipeline
    out = {}
    for mode, cls in (("free", Prompt2PromptImg2ImgPipeline),
                      ("region", Prompt2PromptInpaintPipeline)):
        pipe = cls.from_pretrained(ref, torch_dtype=torch.float32)
        pipe.unet.config.addition_embed_type = None   # as the released driver does
        pipe.set_progress_bar_config(disable=True)
        out[mode] = pipe
    return out


def run_released(pipe, mode: str, seed: int, n: int, size: int):
    """One released call: (final latents, images in [0, 1], drawn parameters)."""
    from PIL import Image
    prompts = [c for pair in C.captions(n) for c in pair]
    images = [im for im in C.anchors(n, size) for _ in (0, 1)]
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    frac = 0.1 + torch.rand(()).item() * (0.9 - 0.1)
    _cfg = 7.5 + torch.rand(()).item() * (15 - 7.5)   # drawn and unused
    kw = {"edit_type": "refine", "n_self_replace": frac, "n_cross_replace": frac}
    final = {}

    def keep(i, t, latents):
        final["z"] = latents.detach().clone()
    common = dict(cross_attention_kwargs=kw, output_type="pt", callback=keep, callback_steps=1)
    if mode == "free":
        steps = random.choice([3, 5, 8])
        guidance = random.uniform(0.4, 0.8)
        out = pipe(prompts, image=images, num_inference_steps=steps, strength=0.6,
                   guidance_scale=guidance, **common).images
        prm = {"total_steps": steps, "soft_value": None}
    else:
        steps = random.choice([10, 14])
        guidance = random.choice([0.0, 0.2, 0.4, 0.6])
        soft = random.choice([0.0, 0.1, 0.3, 0.5, 0.7, 0.8])
        masks = C.edit_masks(n, size)
        edit = [Image.fromarray(e.astype(np.uint8) * 255) for e, _ in masks for _ in (0, 1)]
        outer = [Image.fromarray(o.astype(np.uint8) * 255) for _, o in masks for _ in (0, 1)]
        use_soft = random.choice([True, False])
        extra = {"temp_mask": outer, "soft_mask": soft} if use_soft else {}
        out = pipe(prompts, image=images, mask_image=edit, height=size, width=size,
                   num_inference_steps=steps, guidance_scale=guidance, **extra,
                   **common).images
        prm = {"total_steps": steps, "soft_value": soft if use_soft else None}
    prm["frac"] = frac
    return final["z"].float(), out.float(), prm


def run_ours(pipe, mode: str, seed: int, n: int, size: int):
    masks = C.edit_masks(n, size) if mode == "region" else [(None, None)] * n
    pairs = [Pair(s, t, im, {}, 0,
                  mask=C.mask_fn(e, o, size // 8) if mode == "region" else None)
             for (s, t), im, (e, o) in zip(C.captions(n), C.anchors(n, size), masks)]
    tr = Trace()
    _, prm = generate_compat(pipe, pairs, seed, mode, trace=tr)
    return tr.final.float(), tr.images.float(), prm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--released", type=Path, required=True,
                    help="UltraEdit's data_generation folder (holds sdxl_p2p_pipeline.py)")
    ap.add_argument("--out", type=Path, help="write the golden file here")
    ap.add_argument("--compare", action="store_true",
                    help="run released and ultracurate side by side, print max abs diffs")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    ref = make_tiny(Path(tempfile.mkdtemp()) / "tiny", ("editor",))["editor"]
    theirs = released_pipes(args.released, ref)
    ours = editor.load(ref, "cpu", torch.float32)

    if args.out:
        torch.set_num_threads(args.threads[0])
        data = {"upstream_commit": np.array(UPSTREAM_COMMIT),
                "versions": np.array(f"torch {torch.__version__}, diffusers "
                                     f"{__import__('diffusers').__version__}"),
                "threads": np.array(args.threads[0]), "size": np.array(args.size)}
        for name, (mode, seed, n) in C.GOLDEN_CASES.items():
            z, im, prm = run_released(theirs[mode], mode, seed, n, args.size)
            s, k = C.LATENT_STRIDE, C.IMAGE_STRIDE
            data[f"{name}_latents"] = z[..., ::s, ::s].numpy().astype(np.float32)
            data[f"{name}_images"] = im[..., ::k, ::k].numpy().astype(np.float32)
            data[f"{name}_total_steps"] = np.array(prm["total_steps"])
            data[f"{name}_soft_value"] = np.array(-1.0 if prm["soft_value"] is None
                                                  else prm["soft_value"])
            data[f"{name}_inputs"] = np.array(C.input_digest(n, args.size))
            print(name, prm, tuple(z.shape))
        np.savez_compressed(args.out, **data)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    if args.compare:
        check_long_prompts(theirs["free"], ours.tokenizer)
        print(f"{'case':<14} {'threads':>7} {'latents':>9} {'images':>9} {'8-bit':>6}  params")
        for mode, seed, n in COMPARE_CASES:
            for th in args.threads:
                torch.set_num_threads(th)
                z1, im1, prm = run_released(theirs[mode], mode, seed, n, args.size)
                z2, im2, _ = run_ours(ours, mode, seed, n, args.size)
                px1, px2 = ((255 * x).numpy().astype(np.uint8).astype(int) for x in (im1, im2))
                print(f"{mode}_{n}@{seed:<5} {th:>7} {(z1 - z2).abs().max().item():9.2e} "
                      f"{(im1 - im2).abs().max().item():9.2e} {np.abs(px1 - px2).max():6d}  "
                      f"steps {prm['total_steps']}, soft {prm['soft_value']}", flush=True)


def check_long_prompts(pipe, tokenizer) -> None:
    """Each LONG_CASES prompt list through the released img2img call (64 px, 3 steps)."""
    from PIL import Image

    from ultracurate.generation.behaviour import released_mapper_error
    image = Image.new("RGB", (64, 64), (120, 90, 60))
    kw = {"edit_type": "refine", "n_self_replace": 0.5, "n_cross_replace": 0.5}
    for prompts in LONG_CASES:
        try:
            pipe(prompts, image=[image] * len(prompts), num_inference_steps=5, strength=0.6,
                 guidance_scale=0.5, cross_attention_kwargs=kw, output_type="pt")
            released = "runs"
        except Exception as e:
            released = f"fails ({type(e).__name__})"
        ours = "drops" if released_mapper_error(tokenizer, prompts) else "runs"
        tokens = [len(tokenizer.encode(p)) for p in prompts]
        print(f"tokens {tokens}: released {released}; ultracurate {ours}", flush=True)


if __name__ == "__main__":
    main()
