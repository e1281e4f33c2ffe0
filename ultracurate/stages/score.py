"""Score: the method's scores for every generated candidate pair (docs/method.md).

    clip_sim_source  cos(CLIP source image, CLIP source caption)
    clip_sim_target  cos(CLIP edited image, CLIP target caption)
    clip_sim_dir     cos(edited - source image embedding, target - source caption embedding)
    clip_sim_image   cos(CLIP source image, CLIP edited image)
    dinov2_sim       cos(DINOv2 source image, DINOv2 edited image)
    ssim, l1, l2     on [0, 1] pixels (scikit-image SSIM, data_range 1.0, mean over RGB)

The compute (embedding each distinct image and caption once, decoding ahead on CPU threads,
the scores) is `ultracurate.scoring.PairScorer`, which imports no catalog package; this stage
runs it on its batches and writes the results.

Writes the score columns, `score_run` and `auto_status = 'scored'`; the embeddings go to
LanceDB (`ultracurate.embeddings`), CLIP and DINOv2 image embeddings keyed by candidate id,
caption embeddings keyed by edit id.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..embeddings import EmbeddingStore
from ..names import SCORE_COLUMNS
from ..runner import BatchResult, Context, RowStage
from ..scoring import PairScorer, Prepared


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
        self.scorer: PairScorer | None = None
        self._store: EmbeddingStore | None = None

    def __getstate__(self):  # shipped to Ray workers without models or the LanceDB handle
        d = self.__dict__.copy()
        d.update(scorer=None, _store=None)
        return d

    # -- worker side ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        from ..models import load
        ws = ctx.workspace
        self.scorer = PairScorer(load(ws, "clip", ctx.device), load(ws, "dino", ctx.device),
                                 ctx.device, cache_size=self.cache_size,
                                 decode_threads=self.decode_threads,
                                 pixel_scores_on_device=self.pixel_scores_on_device,
                                 images_per_call=self.images_per_call)

    def prepare(self, rows: list[dict], ctx: Context) -> Prepared:
        return self.scorer.prepare(rows, ctx.workspace.media.load_rgb)

    def process(self, rows: list[dict], prepared: Prepared, ctx: Context) -> BatchResult:
        s = self.scorer.score(rows, prepared, progress=ctx.progress)
        if not s.pairs:
            return BatchResult(failed=s.failed)
        ids, pairs = s.ids, s.pairs
        df = pl.DataFrame({"candidate_id": ids, **s.scores,
                           "score_run": [ctx.run_id] * len(ids),
                           "auto_status": ["scored"] * len(ids)})
        emb = {
            "ids": ids, "edit_ids": [r["edit_id"] for r in pairs],
            "source_media": [r["source_image"] for r in pairs],
            "edited_media": [r["edited_image"] for r in pairs],
            "source_caption": [r["source_caption"] for r in pairs],
            "target_caption": [r["target_caption"] for r in pairs],
            **s.embeddings, "clip_ref": self.scorer.clip.ref, "dino_ref": self.scorer.dino.ref,
        }
        return BatchResult(updates={"candidates": df}, failed=s.failed, extra=emb)

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
        if getattr(self, "scorer", None) is not None:
            self.scorer.close()
