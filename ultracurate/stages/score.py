"""Score: the method's scores for every generated candidate pair (docs/method.md).

    clip_sim_source  cos(CLIP source image, CLIP source caption)
    clip_sim_target  cos(CLIP edited image, CLIP target caption)
    clip_sim_dir     cos(edited - source image embedding, target - source caption embedding)
    clip_sim_image   cos(CLIP source image, CLIP edited image)
    dinov2_sim       cos(DINOv2 source image, DINOv2 edited image)
    ssim, l1, l2     on [0, 1] pixels (scikit-image SSIM, data_range 1.0, mean over RGB)

A batch embeds each distinct image (media names are content hashes) and each distinct caption
once, however many candidates share it, and the stage keeps recent embeddings across batches
(an edit's captions recur in all its candidates). Images are decoded and resized on CPU threads
in `prepare`, ahead of the models; only uint8 pixels go to the device. On a GPU the pixel scores
run there too, batched; on the CPU they are computed in `prepare` with scikit-image.

Writes the score columns, `score_run` and `auto_status = 'scored'`; the embeddings go to
LanceDB (`ultracurate.embeddings`), CLIP and DINOv2 image embeddings keyed by candidate id,
caption embeddings keyed by edit id.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from .. import metrics
from ..embeddings import EmbeddingStore
from ..errors import UltracurateError
from ..images import load_rgb
from ..names import SCORE_COLUMNS
from ..runner import BatchResult, Context, RowStage


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
    failed: dict[int, str] = field(default_factory=dict)


class ScoreStage(RowStage):
    name = "score"
    table = "candidates"
    default_where = ("auto_status IN ('generated', 'scored') AND source_image IS NOT NULL "
                     "AND edited_image IS NOT NULL")
    columns = "candidate_id, edit_id, source_image, edited_image, source_caption, target_caption"
    writes = {"candidates": {*SCORE_COLUMNS, "score_run", "auto_status"}}
    batch_size = 64
    roles = ("clip", "dino")
    images_per_call = 64  # images per CLIP / DINOv2 call: a big batch is several calls

    def __init__(self, cache_size: int = 4096, decode_threads: int | None = None,
                 pixel_scores_on_device: bool | None = None):
        """Score the selected generated candidates. pixel_scores_on_device: SSIM/L1/L2
        batched on the model's device (default: when it is a GPU) rather than with
        scikit-image on the CPU threads."""
        super().__init__()
        self.cache_size = cache_size
        self.decode_threads = decode_threads
        self.pixel_scores_on_device = pixel_scores_on_device
        self.clip = self.dino = None
        self._store: EmbeddingStore | None = None

    def __getstate__(self):  # shipped to Ray workers without models or the LanceDB handle
        d = self.__dict__.copy()
        d.update(clip=None, dino=None, _store=None, _img_cache=None, _txt_cache=None,
                 _pool=None)
        return d

    # -- worker side ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        from ..models import load
        ws = ctx.workspace
        self.clip = load(ws, "clip", ctx.device)
        self.dino = load(ws, "dino", ctx.device)
        self._pool = ThreadPoolExecutor(self.decode_threads or min(8, os.cpu_count() or 1))
        self._img_cache = _LRU(self.cache_size)   # media -> (clip emb, dino emb)
        self._txt_cache = _LRU(self.cache_size)   # caption -> clip text emb

    def _decode(self, path) -> tuple:
        im = load_rgb(path)
        return im, self.clip.pixels(im), self.dino.pixels(im)

    def prepare(self, rows: list[dict], ctx: Context) -> Prepared:
        media = ctx.workspace.media
        out = Prepared()
        decoded: dict[str, Any] = {}
        errors: dict[str, str] = {}
        on_gpu = (self.pixel_scores_on_device if self.pixel_scores_on_device is not None
                  else str(ctx.device).startswith("cuda"))
        names = sorted({n for r in rows for n in (r["source_image"], r["edited_image"])})
        # PIL decodes and resizes without the GIL: a pool keeps the device fed
        futures = {n: self._pool.submit(lambda n=n: self._decode(media.path(n)))
                   for n in names}
        for name, fut in futures.items():
            try:
                decoded[name], out.clip_pixels[name], out.dino_pixels[name] = fut.result()
            except UltracurateError as e:  # a missing or bad file, or not a media name
                errors[name] = str(e)
        pairs = {}
        for r in rows:
            cid, src, edt = r["candidate_id"], r["source_image"], r["edited_image"]
            bad = [errors[n] for n in (src, edt) if n in errors]
            if bad:
                out.failed[cid] = f"candidate {cid}: {bad[0]}"
                continue
            a, b = decoded[src], decoded[edt]
            if b.size != a.size:  # compare at the source's size (PIL default resampling)
                b = b.resize(a.size)
            pairs[cid] = (a, b)
        if on_gpu:
            out.full = {cid: (_chw(a), _chw(b)) for cid, (a, b) in pairs.items()}
        else:
            futs = {cid: self._pool.submit(_cpu_pixel_scores, a, b)
                    for cid, (a, b) in pairs.items()}
            out.pixel_scores = {cid: f.result() for cid, f in futs.items()}
        captions = {c for r in rows for c in (r["source_caption"], r["target_caption"])}
        captions = sorted(c for c in captions if c not in self._txt_cache)
        if captions:
            out.tokens = dict(zip(captions, self.clip.tokenize(captions)))
        return out

    def process(self, rows: list[dict], prepared: Prepared, ctx: Context) -> BatchResult:
        import torch
        p = prepared
        rows = [r for r in rows if r["candidate_id"] not in p.failed]
        # each distinct image and caption once
        new = [n for n in p.clip_pixels if n not in self._img_cache]
        for start in range(0, len(new), self.images_per_call):  # the bar moves per call
            chunk = new[start:start + self.images_per_call]
            ce = self.clip.encode_pixels([p.clip_pixels[n] for n in chunk])
            de = self.dino.encode_pixels([p.dino_pixels[n] for n in chunk])
            for i, n in enumerate(chunk):
                self._img_cache.put(n, (ce[i], de[i]))
            ctx.progress(start + len(chunk), len(new))
        if p.tokens:
            caps = list(p.tokens)
            te = self.clip.encode_tokens(torch.stack([p.tokens[c] for c in caps]))
            for i, c in enumerate(caps):
                self._txt_cache.put(c, te[i])
        missing = sorted({c for r in rows for c in (r["source_caption"], r["target_caption"])
                          if c not in self._txt_cache})
        if missing:  # evicted between prepare and process
            for c, v in zip(missing, self.clip.encode_texts(missing)):
                self._txt_cache.put(c, v)
        if not rows:
            return BatchResult(failed=p.failed)

        def stack(key_fn, part):
            return torch.stack([key_fn(r)[part] if part is not None else key_fn(r)
                                for r in rows]).numpy()

        img = self._img_cache
        txt = self._txt_cache
        src_clip = stack(lambda r: img[r["source_image"]], 0)
        edt_clip = stack(lambda r: img[r["edited_image"]], 0)
        src_dino = stack(lambda r: img[r["source_image"]], 1)
        edt_dino = stack(lambda r: img[r["edited_image"]], 1)
        src_txt = stack(lambda r: txt[r["source_caption"]], None)
        tgt_txt = stack(lambda r: txt[r["target_caption"]], None)

        scores = {
            "clip_sim_source": metrics.cosine(src_clip, src_txt),
            "clip_sim_target": metrics.cosine(edt_clip, tgt_txt),
            "clip_sim_dir": metrics.direction_similarity(src_clip, edt_clip, src_txt, tgt_txt),
            "clip_sim_image": metrics.cosine(src_clip, edt_clip),
            "dinov2_sim": metrics.cosine(src_dino, edt_dino),
        }
        ids = [r["candidate_id"] for r in rows]
        if p.full:
            pix = _pixel_scores_on_device([p.full[c] for c in ids], ctx.device)
        else:
            pix = {k: np.array([p.pixel_scores[c][k] for c in ids]) for k in ("ssim", "l1",
                                                                               "l2")}
        scores.update(pix)
        df = pl.DataFrame({"candidate_id": ids,
                           **{k: np.asarray(v, np.float64) for k, v in scores.items()},
                           "score_run": [ctx.run_id] * len(ids),
                           "auto_status": ["scored"] * len(ids)})
        emb = {
            "ids": ids, "edit_ids": [r["edit_id"] for r in rows],
            "source_media": [r["source_image"] for r in rows],
            "edited_media": [r["edited_image"] for r in rows],
            "source_caption": [r["source_caption"] for r in rows],
            "target_caption": [r["target_caption"] for r in rows],
            "src_clip": src_clip, "edt_clip": edt_clip, "src_dino": src_dino,
            "edt_dino": edt_dino, "src_txt": src_txt, "tgt_txt": tgt_txt,
            "clip_ref": self.clip.ref, "dino_ref": self.dino.ref,
        }
        return BatchResult(updates={"candidates": df}, failed=p.failed, extra=emb)

    # -- driver side ----------------------------------------------------------------------
    def check(self, r, selection) -> None:
        from ..models import resolve
        for role in self.roles:  # a missing checkpoint is one clear error before the job
            resolve(r.workspace, role)

    def store(self, w) -> EmbeddingStore:
        if self._store is None:
            self._store = EmbeddingStore(w.lance_path)
        return self._store

    def write(self, w, result: BatchResult) -> None:
        e = result.extra
        if e:  # LanceDB first: an upsert is idempotent, so a failed commit is simply redone
            s = self.store(w)
            ids, n = e["ids"], len(e["ids"])
            s.upsert("clip_image", "candidates", ids + ids, ["source"] * n + ["edited"] * n,
                     e["source_media"] + e["edited_media"],
                     np.concatenate([e["src_clip"], e["edt_clip"]]), e["clip_ref"])
            s.upsert("dino_image", "candidates", ids + ids, ["source"] * n + ["edited"] * n,
                     e["source_media"] + e["edited_media"],
                     np.concatenate([e["src_dino"], e["edt_dino"]]), e["dino_ref"])
            edits: dict[int, int] = {}
            for i, eid in enumerate(e["edit_ids"]):
                edits.setdefault(eid, i)
            rows = list(edits.values())
            eids = list(edits)
            s.upsert("clip_text", "edits", eids + eids,
                     ["source_caption"] * len(eids) + ["target_caption"] * len(eids),
                     [e["source_caption"][i] for i in rows] + [e["target_caption"][i]
                                                               for i in rows],
                     np.concatenate([e["src_txt"][rows], e["tgt_txt"][rows]]), e["clip_ref"])
        super().write(w, result)

    def finish(self, w) -> None:
        if self._store is not None:
            self._store.optimize()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


def _cpu_pixel_scores(a, b) -> dict:
    return metrics.pixel_scores(np.asarray(a, np.float32) / 255, np.asarray(b, np.float32) / 255)


def _chw(im) -> Any:
    import torch
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _pixel_scores_on_device(pairs, device) -> dict[str, np.ndarray]:
    """Batched SSIM/L1/L2 on the device, grouping pairs of the same size."""
    import torch
    n = len(pairs)
    out = {k: np.zeros(n) for k in ("ssim", "l1", "l2")}
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
