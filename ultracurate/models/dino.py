"""Role `dino`: a self-supervised ViT image encoder through transformers (AutoModel +
AutoImageProcessor), by hub id or local folder.

    m = load("facebook/dinov2-with-registers-large", "cuda")     # the method's default, 518 px
    m = load("facebook/dino-vits16", "cpu", resize=256, crop=224)  # DINO v1 (ViTModel), e.g.
                                                                   # MagicBrush's DINO metric
    pix = m.pixels(pil_image)            # CPU: resize + centre crop -> uint8 (3, H, W)
    emb = m.encode_pixels([pix, ...])    # device: normalise, encode -> unit-norm (N, D) float32
    m.encode_images([pil, ...])          # both in one call
    load("random:dinov2-with-registers-large", "cuda")  # real architecture, random weights

The embedding is the final-layer [CLS] token (`last_hidden_state[:, 0]`, after the model's
last layer norm), for DINOv2, DINOv2 with registers and DINO v1 alike.

Resolution: `resize` (short side, bicubic) and `crop` (centre square) may be given. Otherwise a
DINOv2 model runs at its native resolution, `config.image_size` (518 for the released
checkpoints: the method's "DINOv2 ViT-L/14 with registers at 518 px"), and any other model uses
its image processor's settings (short side + crop, or a fixed height x width resize). Mean and
std always come from the checkpoint's image processor.

`make_tiny(folder)` writes a tiny random-weight DINOv2-with-registers checkpoint;
`make_tiny(folder, family="vit")` a tiny DINO v1-style ViTModel (patch 16), both loadable by
path through `load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UltracurateError
from .clip import _default_dtype, _unit, normalize, resize_crop_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DinoModel:
    """A loaded DINO-family encoder with its preprocessing."""

    model: Any
    device: str
    dtype: Any
    resize: int | tuple[int, int]   # short side, or (height, width) for a fixed resize
    crop: int | None                # centre crop side, None when resize is (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ref: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def pixels(self, image) -> "torch.Tensor":  # noqa: F821
        """PIL image -> uint8 (3, H, W) tensor at the model's input resolution."""
        if isinstance(self.resize, tuple):
            import numpy as np
            import torch
            from PIL import Image
            h, w = self.resize
            im = image.convert("RGB").resize((w, h), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return resize_crop_pixels(image, self.resize, self.crop)

    def encode_pixels(self, pixels: Sequence | Any) -> "torch.Tensor":  # noqa: F821
        import torch
        if not isinstance(pixels, torch.Tensor):
            if len(pixels) == 0:
                return torch.zeros((0, self.embed_dim))
            pixels = torch.stack(list(pixels))
        if len(pixels) == 0:
            return torch.zeros((0, self.embed_dim))
        with torch.inference_mode():
            out = self.model(pixel_values=normalize(pixels, self.mean, self.std, self.device,
                                                    self.dtype))
            return _unit(out.last_hidden_state[:, 0])

    def encode_images(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        return self.encode_pixels([self.pixels(im) for im in images])


def _processor_geometry(proc) -> tuple[int | tuple[int, int], int | None]:
    size = getattr(proc, "size", None) or {}
    crop = getattr(proc, "crop_size", None) or {}
    if getattr(proc, "do_center_crop", False) and crop:
        short = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        return int(short), int(crop.get("height", crop.get("width")))
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return (int(size.get("height", 224)), int(size.get("width", 224))), None


def load(ref: str, device: str = "cpu", dtype: Any = None, resize: int | None = None,
         crop: int | None = None) -> DinoModel:
    """Load a DINO-family checkpoint by hub id or local folder (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoModel

    ref = str(ref)
    dtype = _default_dtype(device, dtype)
    if ref.startswith("random:"):
        return _load_random(ref, device, dtype, resize, crop)
    try:
        model = AutoModel.from_pretrained(ref, add_pooling_layer=False) if _is_vit(ref) \
            else AutoModel.from_pretrained(ref)
        try:
            proc = AutoImageProcessor.from_pretrained(ref)
        except Exception:
            proc = None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"cannot load dino checkpoint '{ref}': {first}") from None
    model = model.to(device=device, dtype=dtype).eval()
    mean = tuple(getattr(proc, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(proc, "image_std", None) or IMAGENET_STD)
    if resize is None and crop is None:
        if model.config.model_type.startswith("dinov2"):
            geometry = (int(model.config.image_size), int(model.config.image_size))
        elif proc is not None:
            geometry = _processor_geometry(proc)
        else:
            geometry = (int(model.config.image_size), int(model.config.image_size))
    else:
        crop = crop or resize
        geometry = (int(resize or crop), int(crop))
    return DinoModel(model, str(device), dtype, geometry[0], geometry[1], mean, std, ref)


# Real architectures with random weights, for benchmarks on machines without the checkpoints:
# compute cost does not depend on the weights' values.
RANDOM_ARCHS = {
    "dinov2-with-registers-large": dict(hidden_size=1024, num_hidden_layers=24,
                                        num_attention_heads=16, mlp_ratio=4, patch_size=14,
                                        image_size=518, num_register_tokens=4),
    "dinov2-with-registers-small": dict(hidden_size=384, num_hidden_layers=12,
                                        num_attention_heads=6, mlp_ratio=4, patch_size=14,
                                        image_size=518, num_register_tokens=4),
    "dino-vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                        intermediate_size=1536, patch_size=16, image_size=224),
}


def _load_random(ref, device, dtype, resize, crop) -> DinoModel:
    """"random:<arch>" (RANDOM_ARCHS): the real architecture, random weights."""
    name = ref.split(":", 1)[1]
    if name not in RANDOM_ARCHS:
        raise UltracurateError(f"unknown random dino architecture '{name}' "
                               f"(one of {', '.join(RANDOM_ARCHS)})")
    if name.startswith("dinov2"):
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**RANDOM_ARCHS[name]))
    else:
        from transformers import ViTConfig, ViTModel
        model = ViTModel(ViTConfig(**RANDOM_ARCHS[name]), add_pooling_layer=False)
    model = model.to(device=device, dtype=dtype).eval()
    size = int(model.config.image_size)
    crop = crop or resize or size
    return DinoModel(model, str(device), dtype, int(resize or crop), int(crop), IMAGENET_MEAN,
                     IMAGENET_STD, ref)


def _is_vit(ref: str) -> bool:
    """A plain ViTModel checkpoint (DINO v1): skip its randomly initialised pooler."""
    import json
    cfg = Path(ref) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("model_type") == "vit"
    return "dino-vit" in ref


def make_tiny(folder: str | Path, family: str = "dinov2") -> str:
    """Write a tiny random-weight checkpoint (seeded by the caller): DINOv2 with registers
    (patch 14, native 70 px), or family="vit" for a DINO v1-style ViT (patch 16, 224 px)."""
    from transformers import BitImageProcessor, ViTImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "dinov2":
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, mlp_ratio=2, patch_size=14,
                                        image_size=70, num_register_tokens=4)
        model = Dinov2WithRegistersModel(cfg)
        proc = BitImageProcessor(size={"shortest_edge": 80}, crop_size={"height": 70,
                                 "width": 70}, image_mean=list(IMAGENET_MEAN),
                                 image_std=list(IMAGENET_STD), do_center_crop=True)
    elif family == "vit":
        from transformers import ViTConfig, ViTModel
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, patch_size=16, image_size=224)
        model = ViTModel(cfg, add_pooling_layer=False)
        proc = ViTImageProcessor(size={"height": 224, "width": 224},
                                 image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    else:
        raise UltracurateError(f"unknown tiny dino family '{family}' (dinov2 or vit)")
    model.save_pretrained(folder, safe_serialization=True)
    proc.save_pretrained(folder)
    return str(folder)
