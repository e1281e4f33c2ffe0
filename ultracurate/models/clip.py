"""Role `clip`: an open_clip model, its image preprocessing and its tokenizer.

Checkpoint references (`load(ref, device, dtype=None)`):

    "ViT-L-14:openai"            an open_clip architecture and pretrained tag (the method's
                                 default; downloads through open_clip's own cache)
    "ViT-B-32:/path/weights.pt"  an architecture and a local weights file
    "ViT-L-14:random"            the real architecture with random weights (benchmarks only)
    "hf-hub:org/repo"            an open_clip model on the Hugging Face hub
    "/path/to/folder"            a local open_clip folder: open_clip_config.json
                                 ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors,
                                 the layout `make_tiny` writes and open_clip's `local-dir:` reads

The returned `ClipModel` is what scoring and evaluation call:

    m = load("ViT-L-14:openai", "cuda")
    pix = m.pixels(pil_image)              # CPU: bicubic resize + centre crop -> uint8 CHW
    img = m.encode_pixels([pix, ...])      # device: normalise, encode, L2-normalise -> (N, D)
    txt = m.encode_texts(["a cat", ...])   # tokenised to 77, encoded, L2-normalised -> (N, D)
    m.encode_images([pil, ...])            # pixels + encode_pixels in one call

Embeddings come back as float32 CPU tensors with unit norm, so a cosine is a dot product.
Preprocessing is the model's own eval transform (resize the short side to the model's input size
with bicubic interpolation, centre crop, CLIP mean/std), split so that the PIL work can run on CPU
threads ahead of the model and only uint8 pixels travel to the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UltracurateError

CONTEXT_LENGTH = 77
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"

# A tiny architecture for tests and the offline demo: the real CLIP structure (ViT image tower,
# causal text transformer over the real 49408-token BPE vocabulary, 77-token context), narrow.
TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 32,
                     "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "shortest"},
}


@dataclass
class ClipModel:
    """A loaded CLIP model with its preprocessing and tokenizer."""

    model: Any
    tokenizer: Any
    device: str
    dtype: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ref: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if getattr(
            self.model, "text_projection", None) is not None else int(
            self.encode_texts(["x"]).shape[1])

    # -- CPU side -------------------------------------------------------------------------
    def pixels(self, image) -> "torch.Tensor":  # noqa: F821
        """PIL image -> uint8 (3, S, S) tensor: short side to S bicubic, centre crop."""
        return resize_crop_pixels(image, self.image_size, self.image_size)

    def preprocess(self, image) -> "torch.Tensor":  # noqa: F821
        """PIL image -> normalised float (3, S, S) tensor (open_clip's eval transform)."""
        import torch
        x = self.pixels(image).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    # -- device side ----------------------------------------------------------------------
    def encode_pixels(self, pixels: Sequence | Any) -> "torch.Tensor":  # noqa: F821
        """uint8 (N, 3, S, S) tensor or list of (3, S, S) -> unit-norm (N, D) float32 CPU."""
        import torch
        if not isinstance(pixels, torch.Tensor):
            pixels = torch.stack(list(pixels))
        if len(pixels) == 0:
            return torch.zeros((0, self.embed_dim))
        with torch.inference_mode():
            emb = self.model.encode_image(normalize(pixels, self.mean, self.std, self.device,
                                                    self.dtype))
            return _unit(emb)

    def encode_images(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        return self.encode_pixels([self.pixels(im) for im in images])

    def tokenize(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        """Token ids (N, 77); longer captions are truncated (end token kept)."""
        return self.tokenizer(list(texts))

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than the 77-token context (start and end tokens included),
        i.e. lose words in `tokenize`."""
        if len(texts) == 0:
            return []
        # one position more than the context: a text that needs it is one tokenize cuts
        # (CLIP's BPE tokenizer pads with 0)
        longer = self.tokenizer(list(texts), context_length=CONTEXT_LENGTH + 1)
        return (longer[:, CONTEXT_LENGTH] != 0).tolist()

    def encode_tokens(self, tokens) -> "torch.Tensor":  # noqa: F821
        import torch
        if len(tokens) == 0:
            return torch.zeros((0, self.embed_dim))
        with torch.inference_mode():
            return _unit(self.model.encode_text(tokens.to(self.device)))

    def encode_texts(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        return self.encode_tokens(self.tokenize(texts))


def normalize(pixels, mean, std, device, dtype):
    """uint8 (N, 3, S, S) -> (x / 255 - mean) / std on device, in dtype."""
    import torch
    x = pixels.to(device, non_blocking=True).to(dtype).div_(255.0)
    m = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _unit(emb):
    import torch
    emb = emb.float()
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def resize_crop_pixels(image, resize: int, crop: int, resample=None):
    """PIL image -> uint8 (3, crop, crop) torch tensor: the short side resized to `resize`
    (bicubic unless resample is given), then a centre crop (torchvision's rounding)."""
    import torch
    from PIL import Image
    im = image.convert("RGB") if image.mode != "RGB" else image
    w, h = im.size
    if (w <= h and w != resize) or (h < w and h != resize):
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        im = im.resize((nw, nh), Image.BICUBIC if resample is None else resample)
        w, h = nw, nh
    left = int(round((w - crop) / 2.0))
    top = int(round((h - crop) / 2.0))
    if left < 0 or top < 0:  # smaller than the crop: pad like torchvision (black)
        canvas = Image.new("RGB", (max(w, crop), max(h, crop)))
        canvas.paste(im, (max(0, -left), max(0, -top)))
        im, left, top = canvas, max(0, left), max(0, top)
    im = im.crop((left, top, left + crop, top + crop))
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _default_dtype(device: str, dtype):
    import torch
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load(ref: str, device: str = "cpu", dtype: Any = None) -> ClipModel:
    """Load a CLIP checkpoint (see the module docstring for the forms of ref)."""
    import open_clip
    import torch

    ref = str(ref)
    dtype = _default_dtype(device, dtype)
    kwargs: dict[str, Any] = {}
    path = Path(ref)
    try:
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file():
                raise UltracurateError(f"clip checkpoint {path} has no {CONFIG_NAME}")
            name, pretrained = f"local-dir:{path.resolve()}", None
            tok_name = name
        elif ref.startswith("hf-hub:"):
            name, pretrained, tok_name = ref, None, ref
        else:
            arch, _, tag = ref.partition(":")
            if open_clip.get_model_config(arch) is None:
                raise UltracurateError(
                    f"clip checkpoint '{ref}': unknown open_clip architecture '{arch}' and no "
                    "such folder")
            name, tok_name = arch, arch
            pretrained = None if tag in ("", "random") else tag
            if pretrained:
                tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
                if tag_cfg.get("quick_gelu"):  # OpenAI weights were trained with QuickGELU
                    kwargs["force_quick_gelu"] = True
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, **kwargs)
    except UltracurateError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"cannot load clip checkpoint '{ref}': {first}") from None
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(tok_name, context_length=CONTEXT_LENGTH)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pcfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(pcfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pcfg.get("std") or open_clip.OPENAI_DATASET_STD)
    return ClipModel(model, tokenizer, str(device), dtype, size, mean, std, ref)


def make_tiny(folder: str | Path) -> str:
    """Write a tiny random-weight CLIP (seeded by the caller) as a local open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(TINY_CONFIG, indent=2))
    model = open_clip.create_model(f"local-dir:{folder.resolve()}", pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    return str(folder)
