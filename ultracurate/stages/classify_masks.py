"""Classify masks: too_large | too_small | fragmented | fine, from the stored mask features.

A stage of its own, so that new thresholds need no new SAM run: it reads mask_area and
mask_contours (computing them from the RLE when a mask arrived without them) and writes
mask_class. A rerun redoes the rows classified under other thresholds (and those never
classified, or re-grounded since); rows already classified under the same thresholds are
skipped unless forced (the runner's resumption: `resume_on`, `run_column`). Thresholds default
to the released code's (masks.DEFAULT_THRESHOLDS).
"""

from __future__ import annotations

from typing import Any

from .. import masks as M
from ..names import FEATURE_COLUMNS
from ..runner import Access, BatchResult, Context, RowStage


class ClassifyMasksStage(RowStage):
    name = "classify-masks"
    table = "edits"
    default_where = "mask_rle IS NOT NULL"
    columns = "edit_id, mask_rle, mask_height, mask_width, " + ", ".join(FEATURE_COLUMNS)
    writes = {"edits": {"mask_class", "classify_run", *FEATURE_COLUMNS}}
    # Classifying stored features is arithmetic: large batches keep the per-batch cost
    # (transaction, row marks) small against the rows (bench/scale.py).
    batch_size = 16384
    # A row is classified while the run that did it had these thresholds and its
    # classify_run still names that run (grounding again clears it).
    resume_on = ("thresholds",)
    run_column = "classify_run"

    def __init__(self, min_area: float | None = None, max_area: float | None = None,
                 max_contours: int | None = None):
        """Thresholds default to the released code's (masks.DEFAULT_THRESHOLDS)."""
        self.thresholds = M.thresholds(min_area=min_area, max_area=max_area,
                                       max_contours=max_contours)
        super().__init__(thresholds=self.thresholds)

    def process(self, rows: list[dict], prepared: Any, ctx: Context) -> BatchResult:
        classified, computed, failed = [], [], {}
        for r in rows:
            if any(r[c] is None for c in FEATURE_COLUMNS):  # a mask that came without them
                try:
                    f = M.rle_features(r["mask_rle"], r["mask_height"], r["mask_width"])
                except Exception as e:
                    failed[r["edit_id"]] = f"edit {r['edit_id']}: {e}"
                    continue
                computed.append({"edit_id": r["edit_id"], **f.columns()})
                r = {**r, **computed[-1]}
            classified.append(r)
        classes = M.classify_many([r["mask_area"] for r in classified],
                                  [r["mask_contours"] for r in classified], self.thresholds)
        out = {"edit_id": [r["edit_id"] for r in classified], "mask_class": list(classes),
               "classify_run": [ctx.run_id] * len(classified)}
        # the stored features are left as they are; only computed ones are written
        return BatchResult(updates={"edits": out}, failed=failed,
                           extra={"features": computed})

    def write(self, w: Access, result: BatchResult) -> None:
        import pyarrow as pa
        w.edits.update(pa.table(result.updates["edits"]) if result.updates else [])
        if result.extra.get("features"):
            w.edits.update(result.extra["features"])
