"""Classify masks: too_large | too_small | fragmented | fine, from the stored mask features.

A stage of its own, so that new thresholds need no new SAM run: it reads mask_area and
mask_contours (computing them from the RLE when a mask arrived without them) and writes
mask_class. A rerun redoes the rows classified under other thresholds (and those never
classified, or re-grounded since); rows already classified under the same thresholds are
skipped unless forced. Thresholds default to the released code's (masks.DEFAULT_THRESHOLDS).
"""

from __future__ import annotations

import json
from typing import Any


from .. import masks as M
from ..catalog import VIEWS, Catalog
from ..runner import BatchResult, Context, RunSummary, Stage, run_stage
from ..selection import Selection, selected_keys_sql


class ClassifyMasksStage(Stage):
    name = "classify-masks"
    table = "edits"
    default_where = "mask_rle IS NOT NULL"
    columns = "edit_id, mask_rle, mask_height, mask_width, mask_area, mask_bbox, " \
              "mask_components, mask_contours"
    writes = {"edits": {"mask_class", "classify_run", "mask_area", "mask_bbox",
                        "mask_components", "mask_contours"}}
    batch_size = 4096

    def __init__(self, min_area: float | None = None, max_area: float | None = None,
                 max_contours: int | None = None):
        self.thresholds = M.thresholds(min_area=min_area, max_area=max_area,
                                       max_contours=max_contours)
        super().__init__(thresholds=self.thresholds)

    def items_sql(self, cat: Catalog, selection: Selection, force: bool) -> tuple[str, dict]:
        pred = f"({self.default_where})"
        params: dict[str, Any] = {}
        if not force:
            same = [r["run_id"] for r in cat.query(
                "SELECT run_id, params FROM runs WHERE stage = ?", [self.name])
                if json.loads(r["params"] or "{}").get("thresholds") == self.thresholds]
            pred += (" AND (classify_run IS NULL OR NOT list_contains($_uc_same, classify_run)"
                     " OR NOT EXISTS (SELECT 1 FROM stage_state s WHERE s.stage = $_uc_stage"
                     " AND s.state = 'done' AND s.key = sel.edit_id))")
            params = {"_uc_same": same or [-1], "_uc_stage": self.name}
        sql, p = selected_keys_sql(cat.con, VIEWS[self.table], "edit_id", selection, pred,
                                   self.columns)
        return sql, {**p, **params}

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


def run_classify_masks(ws, selection: Selection | None = None, *,
                       min_area: float | None = None, max_area: float | None = None,
                       max_contours: int | None = None, force: bool = False,
                       engine: Any = None, progress: bool = True) -> RunSummary:
    """Classify the selected masks (thresholds default to masks.DEFAULT_THRESHOLDS)."""
    stage = ClassifyMasksStage(min_area=min_area, max_area=max_area, max_contours=max_contours)
    return run_stage(ws, stage, selection, force=force, engine=engine, progress=progress)
