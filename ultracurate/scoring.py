"""The score stage's compute: the method's scores for candidate pairs, from their images and
captions (docs/method.md; the formulas are in `ultracurate.metrics`). No catalog here:
`stages.score.ScoreStage` runs a `PairScorer` on each batch and writes what it returns, and
`bench/score.py` runs the same scorer alone, on the device machine, without DuckDB, polars or
LanceDB.

A pair is a dict with `candidate_id`, `source_image`, `edited_image` (media names: content
hashes), `source_caption` and `target_caption`. A batch embeds each distinct image and each
distinct caption once, however many pairs share it, and the scorer keeps recent embeddings
across batches (an edit's captions recur in all its candidates). `prepare` decodes and resizes
on CPU threads, ahead of the models (the runner calls it for the next batch while `score` runs);
only uint8 pixels go to the device. On a GPU the pixel scores (SSIM, L1, L2) run there too,
batched; on the CPU they are computed in `prepare` with scikit-image.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import metrics
from .errors import UltracurateError
from .names import SCORE_COLUMNS

PIXEL_SCORES = ("ssim", "l1", "l2")


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass
class Prepared:
    clip_pixels: dict[str, Any] = field(default_factory=dict)   # media -> uint8 (3, S, S)
    dino_pixels: dict[str, Any] = field(default_factory=dict)
    full: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # cid -> uint8 (3,H,W) x2
    pixel_scores: dict[int, dict] = field(default_factory=dict)     # cid -> ssim/l1/l2 (CPU)
    tokens: dict[str, Any] = field(default_factory=dict)        # caption -> token ids
    failed: dict[int, str] = field(default_factory=dict)        # cid -> one-line error


@dataclass
class Scored:
    """A batch's result: the pairs scored (in order; failed ones left out), one array per
    score column, and the embeddings each score came from (numpy, one row per pair)."""

    pairs: list[dict]
    scores: dict[str, np.ndarray]      # SCORE_COLUMNS -> float64 (n,)
    embeddings: dict[str, np.ndarray]  # src_clip, edt_clip, src_dino, edt_dino, src_txt, tgt_txt
    failed: dict[int, str]

    @property
    def ids(self) -> list[int]:
        return [p["candidate_id"] for p in self.pairs]


class PairScorer:
    """CLIP and DINOv2 (loaded `models.clip` / `models.dino` objects) scoring pairs on
    `device`. pixel_scores_on_device: SSIM/L1/L2 batched on the device (default: when it is a
    GPU) rather than with scikit-image on the CPU threads. images_per_call: images per CLIP /
    DINOv2 call (a big batch is several calls; `progress(done, total)` hears of each)."""

    def __init__(self, clip, dino, device: str, *, cache_size: int = 4096,
                 decode_threads: int | None = None, pixel_scores_on_device: bool | None = None,
                 images_per_call: int = 64):
        self.clip, self.dino, self.device = clip, dino, str(device)
        self.on_device = (pixel_scores_on_device if pixel_scores_on_device is not None
                          else self.device.startswith("cuda"))
        self.images_per_call = images_per_call
        self._pool = ThreadPoolExecutor(decode_threads or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="uc-score-decode")
        self._img_cache = _LRU(cache_size)   # media -> (clip emb, dino emb)
        self._txt_cache = _LRU(cache_size)   # caption -> clip text emb

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- CPU side -------------------------------------------------------------------------
    def _decode(self, load_rgb, name: str) -> tuple:
        im = load_rgb(name)
        return im, self.clip.pixels(im), self.dino.pixels(im)

    def prepare(self, pairs: list[dict], load_rgb: Callable[[str], Any]) -> Prepared:
        """Decode each distinct image once (load_rgb(name) -> PIL RGB; an UltracurateError
        fails the pairs that use it), its model inputs, the pixel scores on the CPU, and the
        tokens of captions not embedded yet."""
        out = Prepared()
        decoded: dict[str, Any] = {}
        errors: dict[str, str] = {}
        names = sorted({n for r in pairs for n in (r["source_image"], r["edited_image"])})
        # PIL decodes and resizes without the GIL: a pool keeps the device fed
        futures = {n: self._pool.submit(self._decode, load_rgb, n) for n in names}
        for name, fut in futures.items():
            try:
                decoded[name], out.clip_pixels[name], out.dino_pixels[name] = fut.result()
            except UltracurateError as e:  # a missing or bad file, or not a media name
                errors[name] = str(e)
        both = {}
        for r in pairs:
            cid, src, edt = r["candidate_id"], r["source_image"], r["edited_image"]
            bad = [errors[n] for n in (src, edt) if n in errors]
            if bad:
                out.failed[cid] = f"candidate {cid}: {bad[0]}"
                continue
            a, b = decoded[src], decoded[edt]
            if b.size != a.size:  # compare at the source's size (PIL default resampling)
                b = b.resize(a.size)
            both[cid] = (a, b)
        if self.on_device:
            out.full = {cid: (_chw(a), _chw(b)) for cid, (a, b) in both.items()}
        else:
            futs = {cid: self._pool.submit(_cpu_pixel_scores, a, b)
                    for cid, (a, b) in both.items()}
            out.pixel_scores = {cid: f.result() for cid, f in futs.items()}
        captions = {c for r in pairs for c in (r["source_caption"], r["target_caption"])}
        captions = sorted(c for c in captions if c not in self._txt_cache)
        if captions:
            out.tokens = dict(zip(captions, self.clip.tokenize(captions)))
        return out

    # -- device side ----------------------------------------------------------------------
    def score(self, pairs: list[dict], prepared: Prepared,
              progress: Callable[[int, int], None] | None = None) -> Scored:
        """The batch's scores: new images and captions embedded (each once), then the
        method's scores of every pair that prepare could decode."""
        import torch
        p = prepared
        pairs = [r for r in pairs if r["candidate_id"] not in p.failed]
        new = [n for n in p.clip_pixels if n not in self._img_cache]
        for start in range(0, len(new), self.images_per_call):
            chunk = new[start:start + self.images_per_call]
            ce = self.clip.encode_pixels([p.clip_pixels[n] for n in chunk])
            de = self.dino.encode_pixels([p.dino_pixels[n] for n in chunk])
            for i, n in enumerate(chunk):
                self._img_cache.put(n, (ce[i], de[i]))
            if progress is not None:
                progress(start + len(chunk), len(new))
        if p.tokens:
            caps = list(p.tokens)
            te = self.clip.encode_tokens(torch.stack([p.tokens[c] for c in caps]))
            for i, c in enumerate(caps):
                self._txt_cache.put(c, te[i])
        missing = sorted({c for r in pairs for c in (r["source_caption"], r["target_caption"])
                          if c not in self._txt_cache})
        if missing:  # evicted between prepare and score
            for c, v in zip(missing, self.clip.encode_texts(missing)):
                self._txt_cache.put(c, v)
        if not pairs:
            return Scored([], {k: np.zeros(0) for k in SCORE_COLUMNS}, {}, p.failed)

        img, txt = self._img_cache, self._txt_cache

        def stack(key_fn, part):
            return torch.stack([key_fn(r)[part] if part is not None else key_fn(r)
                                for r in pairs]).numpy()

        emb = {"src_clip": stack(lambda r: img[r["source_image"]], 0),
               "edt_clip": stack(lambda r: img[r["edited_image"]], 0),
               "src_dino": stack(lambda r: img[r["source_image"]], 1),
               "edt_dino": stack(lambda r: img[r["edited_image"]], 1),
               "src_txt": stack(lambda r: txt[r["source_caption"]], None),
               "tgt_txt": stack(lambda r: txt[r["target_caption"]], None)}
        scores = {
            "clip_sim_source": metrics.cosine(emb["src_clip"], emb["src_txt"]),
            "clip_sim_target": metrics.cosine(emb["edt_clip"], emb["tgt_txt"]),
            "clip_sim_dir": metrics.direction_similarity(emb["src_clip"], emb["edt_clip"],
                                                         emb["src_txt"], emb["tgt_txt"]),
            "clip_sim_image": metrics.cosine(emb["src_clip"], emb["edt_clip"]),
            "dinov2_sim": metrics.cosine(emb["src_dino"], emb["edt_dino"]),
        }
        ids = [r["candidate_id"] for r in pairs]
        if p.full:
            scores.update(_pixel_scores_on_device([p.full[c] for c in ids], self.device))
        else:
            scores.update({k: np.array([p.pixel_scores[c][k] for c in ids])
                           for k in PIXEL_SCORES})
        return Scored(pairs, {k: np.asarray(scores[k], np.float64) for k in SCORE_COLUMNS},
                      emb, p.failed)


def _cpu_pixel_scores(a, b) -> dict:
    return metrics.pixel_scores(np.asarray(a, np.float32) / 255, np.asarray(b, np.float32) / 255)


def _chw(im) -> Any:
    import torch
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _pixel_scores_on_device(pairs, device) -> dict[str, np.ndarray]:
    """Batched SSIM/L1/L2 on the device, grouping pairs of the same size."""
    import torch
    n = len(pairs)
    out = {k: np.zeros(n) for k in PIXEL_SCORES}
    by_shape: dict[tuple, list[int]] = {}
    for i, (a, _) in enumerate(pairs):
        by_shape.setdefault(tuple(a.shape), []).append(i)
    for idx in by_shape.values():
        a = torch.stack([pairs[i][0] for i in idx]).to(device, non_blocking=True)
        b = torch.stack([pairs[i][1] for i in idx]).to(device, non_blocking=True)
        res = metrics.pixel_scores_torch(a, b)
        for k in out:
            out[k][idx] = res[k]
    return out
