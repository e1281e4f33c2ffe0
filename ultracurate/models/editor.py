"""Role `editor`: an SDXL-architecture diffusers pipeline (SDXL-Turbo by default).

`load(ref, device, dtype)` takes a hub id or a local pipeline folder and returns a
`StableDiffusionXLImg2ImgPipeline` (its parts: two CLIP text encoders and tokenizers, UNet, VAE,
scheduler). The generation loop (`ultracurate.generation`) uses the parts directly.

`make_tiny(folder)` builds a random-weight pipeline with the same architecture at toy sizes and
saves it with `save_pretrained`, so tests and the demo load it back through the same `load`:
- UNet: three levels (32, 64, 64) like SDXL's three (the last at 1/32 of the image, where the
  released attention control replaces self-attention), cross-attention at the lower two, an even
  number of heads everywhere (2 and 4: the released head split needs it), SDXL's added
  conditioning ("text_time").
- VAE: four levels, so the latent is 1/8 of the image as in SDXL.
- Text encoders: CLIPTextModel and CLIPTextModelWithProjection, hidden sizes 16 + 16 = the
  UNet's cross-attention width 32.
- Tokenizers: the real CLIP BPE vocabulary, derived offline from open_clip's bundled
  `bpe_simple_vocab_16e6.txt.gz`, model_max_length 77.
- Scheduler: Euler Ancestral with trailing timestep spacing (SDXL-Turbo's).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..errors import UltracurateError
from ._bpe import bytes_to_unicode

DEFAULT_REF = "stabilityai/sdxl-turbo"

SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def default_dtype(device: str):
    import torch
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load(ref: str, device: str = "cpu", dtype: Any = None):
    """The SDXL-architecture pipeline at ref (hub id or local folder), on device.

    dtype defaults to bfloat16 on CUDA and float32 on the CPU. The VAE is kept in float32 when
    its config asks for it (force_upcast), as diffusers does."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    dtype = dtype or default_dtype(device)
    local = Path(str(ref))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if local.exists():
        if not (local / "model_index.json").exists():
            raise UltracurateError(f"editor checkpoint {local}: not a diffusers pipeline folder "
                                   "(no model_index.json)")
        src = str(local)
    else:
        src = str(ref)
        if dtype == torch.float16:
            kwargs["variant"] = "fp16"
    try:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        if kwargs.pop("variant", None):  # no fp16 files: load the full ones
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(src, **kwargs)
        else:
            raise UltracurateError(f"cannot load editor '{ref}': "
                                   f"{str(e).splitlines()[0]}") from None
    pipe = pipe.to(device)
    if dtype != torch.float32 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if str(device).startswith("cuda"):
        from diffusers.models.attention_processor import AttnProcessor2_0
        pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (fused attention)
    return pipe


def native_size(ref: str) -> int | None:
    """The square size the checkpoint's UNet is configured for (unet.sample_size times the
    VAE's downscale factor: 512 for SDXL-Turbo), read from its configs without loading
    weights; None when the configs cannot be read here (a hub id not in the local cache)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    try:
        unet = UNet2DConditionModel.load_config(str(ref), subfolder="unet")
        vae = AutoencoderKL.load_config(str(ref), subfolder="vae")
    except (OSError, ValueError):
        return None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def pipe_native_size(pipe) -> int:
    """native_size of a loaded pipeline."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# -- tiny checkpoint ------------------------------------------------------------------------
def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt for transformers' CLIPTokenizer from open_clip's bundled
    BPE file (the real CLIP vocabulary: 49408 tokens), and load it back."""
    import open_clip
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_map = {t: i for i, t in enumerate(vocab)}
    pairs = [tuple(m.split()) for m in merges]
    (folder / "vocab.json").write_text(json.dumps(vocab_map))
    # merges.txt keeps the version header line, which CLIP tokenizers skip.
    (folder / "merges.txt").write_text("\n".join([lines[0]] + merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab_map, merges=pairs, model_max_length=77)
    tok.save_pretrained(str(folder))
    return folder


def tiny_components(tokenizer_dir: str | Path) -> dict:
    """The tiny random-weight SDXL-architecture parts (seeded by the caller)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    unet = UNet2DConditionModel(
        sample_size=8,  # 64 px at the VAE's factor 8
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),  # SDXL's naming: the number of heads (even)
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=0.13025, force_upcast=False,
    )
    common = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                  hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  num_hidden_layers=2, max_position_embeddings=77, vocab_size=49408,
                  hidden_act="gelu", layer_norm_eps=1e-5)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, projection_dim=32))
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    scheduler = EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tok, tokenizer_2=tok, scheduler=scheduler)


def make_tiny(folder: str | Path) -> str:
    """Build the tiny editor and save it as a diffusers pipeline folder; returns its path."""
    import tempfile

    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder = Path(folder)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp)
        parts = tiny_components(tmp)
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
