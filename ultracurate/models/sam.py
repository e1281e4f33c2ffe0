"""Role `sam`: Segment Anything, built from segment-anything's own modeling classes, prompted
with boxes.

    s = load("vit_h:/models/sam_vit_h_4b8939.pth", "cuda")   # the released checkpoint
    s = load("/models/tiny/sam")                             # folder: config.json + model.safetensors
    s = load("random:vit_h", "cuda")                         # real architecture, random weights
    emb = s.embed([np_rgb, ...])        # one image-encoder pass for a batch of images
    masks = s.masks(emb[i], (h, w), [[x0, y0, x1, y1], ...])  # one mask per box, (n, h, w) bool

A `.pth` checkpoint is a plain state dict loaded with `torch.load(weights_only=True)`
(segment-anything's own `build_sam` unpickles it without that guard, so it is never called
with a checkpoint here). The image embedding is computed once per image and reused for every
box set prompted on it: the ground stage embeds each anchor once for all of its edits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UltracurateError

# segment-anything's three released architectures (build_sam.py), and what every SAM shares.
ARCHS = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  encoder_global_attn_indexes=[2, 5, 8, 11]),
}
COMMON = dict(image_size=1024, patch_size=16, prompt_embed_dim=256, window_size=14,
              decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8,
              iou_head_hidden_dim=256, mask_in_chans=16)
TINY = dict(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=[1], image_size=256, patch_size=16,
            prompt_embed_dim=32, window_size=4, decoder_depth=1, decoder_mlp_dim=64,
            decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4)


def build(cfg: dict):
    """An (untrained) Sam from segment-anything's classes and an architecture dict."""
    import torch
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    c = {**COMMON, **cfg}
    size, patch, dim = c["image_size"], c["patch_size"], c["prompt_embed_dim"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=c["encoder_num_heads"], patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=list(c["encoder_global_attn_indexes"]),
            window_size=c["window_size"], out_chans=dim),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size), mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c["decoder_depth"], embedding_dim=dim,
                                          mlp_dim=c["decoder_mlp_dim"],
                                          num_heads=c["decoder_num_heads"]),
            transformer_dim=dim, iou_head_depth=3,
            iou_head_hidden_dim=c["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


@dataclass
class SamModel:
    model: Any
    device: str
    dtype: Any
    ref: str

    @property
    def image_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    def _transform(self):
        from segment_anything.utils.transforms import ResizeLongestSide
        return ResizeLongestSide(self.image_size)

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 8) -> "torch.Tensor":  # noqa
        """Image embeddings (N, C, h, w) for RGB uint8 arrays (H, W, 3), batched through the
        image encoder (resize longest side, normalise, pad: SAM's own preprocessing)."""
        import torch
        tf = self._transform()
        outs = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            with torch.inference_mode():
                x = torch.stack([
                    self.model.preprocess(
                        torch.as_tensor(tf.apply_image(np.asarray(im)), device=self.device)
                        .permute(2, 0, 1).contiguous().float())
                    for im in chunk]).to(self.dtype)
                outs.append(self.model.image_encoder(x))
        return torch.cat(outs) if outs else torch.zeros(0)

    def masks(self, embedding, image_hw: tuple[int, int],
              boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """One mask per box (x0, y0, x1, y1 pixels of the original image), single-mask
        output, thresholded at the model's mask_threshold: bool (n_boxes, H, W)."""
        import torch
        h, w = image_hw
        if len(boxes) == 0:
            return np.zeros((0, h, w), bool)
        tf = self._transform()
        b = tf.apply_boxes(np.asarray(boxes, dtype=np.float32), (h, w))
        input_size = tf.get_preprocess_shape(h, w, self.image_size)
        with torch.inference_mode():
            bt = torch.as_tensor(b, device=self.device, dtype=torch.float32)
            sparse, dense = self.model.prompt_encoder(points=None, boxes=bt, masks=None)
            low, _ = self.model.mask_decoder(
                image_embeddings=embedding[None].to(self.dtype),
                image_pe=self.model.prompt_encoder.get_dense_pe().to(self.dtype),
                sparse_prompt_embeddings=sparse.to(self.dtype),
                dense_prompt_embeddings=dense.to(self.dtype),
                multimask_output=False)
            full = self.model.postprocess_masks(low.float(), input_size, (h, w))
            return (full[:, 0] > self.model.mask_threshold).cpu().numpy()


def _default_dtype(device: str, dtype):
    import torch
    if dtype is not None:
        return dtype
    return torch.float32


def _state_dict(path: Path) -> dict:
    import torch
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UltracurateError(f"cannot read SAM checkpoint {path}: {first}") from None
    return sd.get("model", sd) if isinstance(sd, dict) else sd


def load(ref: str, device: str = "cpu", dtype: Any = None) -> SamModel:
    """Load SAM by 'arch:path.pth' (arch vit_h | vit_l | vit_b), a .pth path whose name
    names the arch, a folder with config.json + model.safetensors, or 'random:arch'."""
    ref = str(ref)
    dtype = _default_dtype(device, dtype)
    arch, _, rest = ref.partition(":")
    if arch == "random":
        if rest not in ARCHS:
            raise UltracurateError(f"unknown SAM architecture '{rest}' (one of "
                                   f"{', '.join(ARCHS)})")
        model = build(ARCHS[rest])
    else:
        if arch in ARCHS and rest:
            cfg, path = ARCHS[arch], Path(rest)
        else:
            path = Path(ref)
            cfg = None
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise UltracurateError(f"SAM folder {path} has no config.json")
                cfg = json.loads((path / "config.json").read_text())
                path = path / "model.safetensors"
            else:
                cfg = next((ARCHS[a] for a in ARCHS if a in path.name), None)
                if cfg is None:
                    raise UltracurateError(
                        f"cannot tell the SAM architecture of {path}; write it as "
                        f"vit_h:{path} (vit_h, vit_l or vit_b)")
        if not path.is_file():
            raise UltracurateError(f"SAM checkpoint {path} not found (download "
                                   f"sam_vit_h_4b8939.pth from the segment-anything release, "
                                   f"or set [models] sam in the workspace config)")
        model = build(cfg)
        try:
            model.load_state_dict(_state_dict(path))
        except RuntimeError as e:
            raise UltracurateError(f"SAM checkpoint {path} does not match its architecture: "
                                   f"{str(e).splitlines()[0]}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return SamModel(model, str(device), dtype, ref)


def make_tiny(folder: str | Path) -> str:
    """Write a tiny random-weight SAM (256 px input, 2-block ViT encoder) as config.json +
    model.safetensors, loadable by path through `load`."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build(TINY)
    (folder / "config.json").write_text(json.dumps({**COMMON, **TINY}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return str(folder)
