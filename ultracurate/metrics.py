"""The scores of the method, as pure functions (no models, no catalog).

Embedding scores take embeddings (torch tensors or numpy arrays, one row per item; they need
not be normalised) and return numpy float64 arrays, one value per row:

    clip_sim_source = cosine(source_image_emb, source_text_emb)
    clip_sim_target = cosine(edited_image_emb, target_text_emb)
    clip_sim_dir    = direction_similarity(source_image_emb, edited_image_emb,
                                           source_text_emb, target_text_emb)
                    = cos(edited_img - source_img, target_txt - source_txt)
    clip_sim_image  = cosine(source_image_emb, edited_image_emb)
    dinov2_sim      = cosine(dino_source_emb, dino_edited_emb)

The embedding differences in clip_sim_dir are taken between unit-norm embeddings (CLIP's
normalised features, as CLIP scores are computed everywhere else).

Pixel scores take two images (PIL images or float arrays H x W x 3 in [0, 1]) of the same size:

    ssim(a, b)  scikit-image structural_similarity, data_range 1.0, computed per RGB channel
                and averaged (channel_axis=-1)
    l1(a, b)    mean |a - b| on [0, 1] pixels
    l2(a, b)    mean (a - b)^2 on [0, 1] pixels
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a[None, :] if a.ndim == 1 else a


def normalize(x: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    a = _np(x)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), EPS)


def cosine(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    return np.sum(normalize(a) * normalize(b), axis=-1)


def direction_similarity(source_image: Any, edited_image: Any, source_text: Any,
                         target_text: Any) -> np.ndarray:
    """clip_sim_dir: cosine between the image change and the caption change, each taken
    between unit-norm embeddings. A pair with identical captions or identical images has no
    direction: its score is 0."""
    d_img = normalize(edited_image) - normalize(source_image)
    d_txt = normalize(target_text) - normalize(source_text)
    return cosine(d_img, d_txt)


def to_unit_float(image: Any) -> np.ndarray:
    """PIL image or array -> float64 H x W x 3 in [0, 1] (uint8 arrays are divided by 255)."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_unit_float(a), to_unit_float(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    return x, y


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM over the RGB channels (scikit-image, data_range 1.0)."""
    from skimage.metrics import structural_similarity
    x, y = _pair(a, b)
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=-1))


def l1(a: Any, b: Any) -> float:
    x, y = _pair(a, b)
    return float(np.mean(np.abs(x - y)))


def l2(a: Any, b: Any) -> float:
    x, y = _pair(a, b)
    return float(np.mean((x - y) ** 2))


def pixel_scores(a: Any, b: Any) -> dict[str, float]:
    """ssim, l1 and l2 of one pair, converting the images once."""
    from skimage.metrics import structural_similarity
    x, y = _pair(a, b)
    d = x - y
    return {"ssim": float(structural_similarity(x, y, data_range=1.0, channel_axis=-1)),
            "l1": float(np.mean(np.abs(d))), "l2": float(np.mean(d * d))}


# -- batched pixel scores on the model's device ------------------------------------------------
SSIM_WIN = 7            # scikit-image's defaults: a 7x7 uniform window,
SSIM_K1, SSIM_K2 = 0.01, 0.03   # sample covariance, statistics cropped 3 px from each border


def pixel_scores_torch(a, b) -> dict[str, np.ndarray]:
    """ssim, l1 and l2 of a batch of pairs at once, on whatever device the tensors are on.

    a, b: uint8 or float tensors (N, 3, H, W) ([0, 255] for uint8, [0, 1] for float). SSIM is
    scikit-image's `structural_similarity(x, y, data_range=1.0, channel_axis=-1)` computed the
    same way: a 7x7 uniform filter, sample covariance (N / (N - 1)), and the mean over the
    pixels at least 3 px from the border (exactly the windows that need no padding, so an
    unpadded 7x7 average pool gives the same statistics), averaged over the channels.
    """
    import torch
    import torch.nn.functional as F

    def unit(x):
        x = x.to(torch.float32)
        return x / 255.0 if not torch.is_floating_point(a) else x

    x, y = unit(a), unit(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape)} vs {tuple(y.shape)}")
    d = x - y
    l1_v = d.abs().flatten(1).mean(1)
    l2_v = (d * d).flatten(1).mean(1)
    n = SSIM_WIN * SSIM_WIN
    cov_norm = n / (n - 1.0)

    def pool(t):
        return F.avg_pool2d(t, SSIM_WIN, stride=1)

    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    ssim_v = s.flatten(2).mean(2).mean(1)
    return {"ssim": ssim_v.double().cpu().numpy(), "l1": l1_v.double().cpu().numpy(),
            "l2": l2_v.double().cpu().numpy()}
