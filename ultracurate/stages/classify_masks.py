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
from ..runner import BatchResult, Context, RowStage


class ClassifyMasksStage(RowStage):
    name = "classify-masks"
    table = "edits"
    default_where = "mask_rle IS NOT NULL"
    columns = "edit_id, mask_rle, mask_height, mask_width, mask_area, mask_bbox, " \
              "mask_components, mask_contours"
    writes = {"edits": {"mask_class", "classify_run", "mask_area", "mask_bbox",
                        "mask_components", "mask_contours"}}
    batch_size = 4096
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
        out, failed = [], {}
        for r in rows:
            row = {"edit_id": r["edit_id"], "classify_run": ctx.run_id}
            area, contours = r["mask_area"], r["mask_contours"]
            if None in (area, contours, r["mask_bbox"], r["mask_components"]):
                try:
                    f = M.rle_features(r["mask_rle"], r["mask_height"], r["mask_width"])
                except Exception as e:
                    failed[r["edit_id"]] = f"edit {r['edit_id']}: {e}"
                    continue
                area, contours = f.area, f.contours
                row.update(mask_area=f.area, mask_bbox=f.bbox, mask_components=f.components,
                           mask_contours=f.contours)
            else:
                row.update(mask_area=area, mask_bbox=r["mask_bbox"],
                           mask_components=r["mask_components"], mask_contours=contours)
            row["mask_class"] = M.classify(area, contours, self.thresholds)
            out.append(row)
        return BatchResult(updates={"edits": out}, failed=failed)
