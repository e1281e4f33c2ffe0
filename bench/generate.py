"""Candidate pairs per second: ultracurate's batched generator against the stock diffusers
StableDiffusionXLImg2ImgPipeline called one image at a time, with the same model, same run.

CPU (default): the tiny SDXL-architecture editor at 64 px.
GPU: --real-arch builds the full SDXL UNet/VAE/text encoders from SDXL-Turbo's configuration
with random weights (cost does not depend on their values) at 512 px, bf16:

    python bench/generate.py                          # CPU, tiny
    python bench/generate.py --real-arch --device cuda --size 512 --pairs 64 --batch 16

Both sides run free-form candidates with 3 real steps (8 total steps at strength 0.6 for
ours is 4; we force total_steps=5 -> 3 real steps on both sides) and include JPEG encoding and
writes to a media store (ours: the stage's writer threads; stock: PIL save one by one).

A third line runs ours one pair per model call: what making every candidate's pixels
independent of its call would cost (the VAE and UNet give results that depend on the batch at
the float-rounding level, so only one pair per call is batch-invariant); generate instead
fixes each call's pairs when it plans them (gen_call), see docs/generation.md.

Ours is the generate stage's compute (`ultracurate.generation`, which the stage calls per model
call) with the stage's writes to a media store, and no catalog: it imports no DuckDB, polars or
LanceDB, so bench/gpu.sh runs it on the device machine. --out writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ultracurate.generation import Pair, generate_method  # noqa: E402
from ultracurate.images import to_jpeg_bytes  # noqa: E402
from ultracurate.models import editor  # noqa: E402
from ultracurate.workspace import MediaStore  # noqa: E402

SRC, TGT = "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a red sofa"


def real_arch_pipe(device, dtype, tmp: Path):
    """SDXL-Turbo's architecture with random weights, built from its configuration (no
    download): UNet 2.6B, VAE, CLIP-L + OpenCLIP-bigG text encoders, Euler Ancestral."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                           StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)
    tokdir = tmp / "tokenizer"
    editor.write_clip_tokenizer(tokdir)
    tok = CLIPTokenizer.from_pretrained(str(tokdir), model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=False)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                       num_attention_heads=12, num_hidden_layers=12,
                                       hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
        num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"))
    sched = EulerAncestralDiscreteScheduler(**editor.SCHEDULER_CONFIG)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2,
                                            tokenizer=tok, tokenizer_2=tok, unet=unet,
                                            scheduler=sched)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def anchors(n, size):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))
            for _ in range(n)]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def params():
    return {"mode": "free", "total_steps": 5, "strength": 0.6, "guidance": 0.5,
            "self_replace_frac": 0.5, "cross_replace_frac": 0.5}


def bench_ours(pipe, ims, batch, store, device):
    pool = ThreadPoolExecutor(4)
    futs = []
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(ims), batch):
        pairs = [Pair(SRC, TGT, im, params(), 1000 + i + k)
                 for k, im in enumerate(ims[i:i + batch])]
        for out in generate_method(pipe, pairs):
            futs += [pool.submit(lambda x: store.put_bytes(to_jpeg_bytes(x), "jpg"), im)
                     for im in (out.source, out.edited)]
    [f.result() for f in futs]
    sync(device)
    return time.perf_counter() - t


def bench_stock(pipe, ims, store, device):
    gen = torch.Generator(device=device)
    sync(device)
    t = time.perf_counter()
    for i, im in enumerate(ims):
        for cap in (SRC, TGT):  # a pair = two images, one call each
            gen.manual_seed(i)
            out = pipe(cap, image=im, strength=0.6, num_inference_steps=5, guidance_scale=0.0,
                       generator=gen).images[0]
            store.put_bytes(to_jpeg_bytes(out), "jpg")
    sync(device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-arch", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--stock-pairs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        bench(args, Path(tmp))


def bench(args, tmp: Path) -> None:
    """The run of main's options, with its models and media under tmp."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.real_arch:
        pipe = real_arch_pipe(args.device, dtype, tmp)
    else:
        ref = editor.make_tiny(tmp / "editor")
        pipe = editor.load(ref, args.device, dtype)
    store = MediaStore(tmp / "media")
    ims = anchors(args.pairs, args.size)
    bench_ours(pipe, ims[:min(4, len(ims))], min(4, args.batch), store, args.device)  # warm-up
    ours = bench_ours(pipe, ims, args.batch, store, args.device)
    n_single = args.stock_pairs or max(4, args.pairs // 4)
    single = bench_ours(pipe, ims[:n_single], 1, store, args.device)
    from diffusers.models.attention_processor import AttnProcessor2_0
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    n_stock = args.stock_pairs or max(4, args.pairs // 4)
    bench_stock(pipe, ims[:1], store, args.device)  # warm-up
    stock = bench_stock(pipe, ims[:n_stock], store, args.device)
    r_ours, r_stock, r_single = args.pairs / ours, n_stock / stock, n_single / single
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device={card} arch={'sdxl' if args.real_arch else 'tiny'} size={args.size} "
          f"dtype={str(dtype).split('.')[-1]} real_steps=3 batch={args.batch}")
    print(f"ultracurate (batched pairs, JPEG writes): {args.pairs} pairs in {ours:.2f} s = "
          f"{r_ours:.2f} pairs/s ({1000 / r_ours:.1f} ms/pair)")
    print(f"ultracurate, 1 pair per call: {n_single} pairs in {single:.2f} s = "
          f"{r_single:.2f} pairs/s ({r_ours / r_single:.2f}x slower than batched)")
    print(f"stock StableDiffusionXLImg2ImgPipeline, 1 image/call: {n_stock} pairs in "
          f"{stock:.2f} s = {r_stock:.2f} pairs/s ({1000 / r_stock:.1f} ms/pair)")
    print(f"speed-up: {r_ours / r_stock:.2f}x")
    if args.out:
        res = {"date": time.strftime("%Y-%m-%d"), "device": card,
               "arch": "sdxl" if args.real_arch else "tiny", "size": args.size,
               "dtype": str(dtype).split(".")[-1], "real_steps": 3, "batch": args.batch,
               "pairs": args.pairs, "pairs_per_s": round(r_ours, 3),
               "one_pair_per_call_pairs": n_single, "one_pair_per_call_pairs_per_s":
               round(r_single, 3), "stock_pairs": n_stock, "stock_pairs_per_s":
               round(r_stock, 3), "speedup_vs_stock": round(r_ours / r_stock, 2)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
