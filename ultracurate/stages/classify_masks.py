"""Classify masks: too_large | too_small | fragmented | fine, from the stored mask features.

A stage of its own, so that new thresholds need no new SAM run: it reads mask_area and
mask_contours and writes mask_class. Masks whose features are stored (ground stores them) are
classified in SQL, in one statement over all of them (`set_where`, `apply_set`: the class is
`masks.classify_sql`, built from the same rules and thresholds as the Python one); masks that
came without them go through batches that decode the RLE, store the features and classify
(`process`). A rerun redoes the rows classified under other thresholds (and those never
classified, or re-grounded since); rows already classified under the same thresholds are
skipped unless forced (the runner's resumption: `resume_on`, `run_column`). Thresholds
default to the released code's (masks.DEFAULT_THRESHOLDS).
"""

from __future__ import annotations

from typing import Any

from .. import masks as M
from ..names import FEATURE_COLUMNS
from ..runner import Access, BatchResult, Context, RowStage

# Masks whose features are all stored: their class is arithmetic, done in SQL.
FEATURES_STORED = " AND ".join(f"{c} IS NOT NULL" for c in FEATURE_COLUMNS)


class ClassifyMasksStage(RowStage):
    name = "classify-masks"
    table = "edits"
    default_where = "mask_rle IS NOT NULL"
    columns = "edit_id, mask_rle, mask_height, mask_width, " + ", ".join(FEATURE_COLUMNS)
    writes = {"edits": {"mask_class", "classify_run", *FEATURE_COLUMNS}}
    # Stored features: one UPDATE for every such row (2.7M rows at 4.1M edits in seconds,
    # bench/scale.py); the batches only decode the masks that came without them.
    set_where = FEATURES_STORED
    set_columns = "edit_id, mask_area, mask_contours"
    batch_size = 512
    columnar = True
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

    def apply_set(self, w: Access, rows: str) -> None:
        """The masks with stored features (rows: edit_id, mask_area, mask_contours): their
        class, in one UPDATE."""
        cls, params = M.classify_sql("mask_area", "mask_contours", self.thresholds)
        w.edits.update_from(f"SELECT edit_id, {cls} AS mask_class, $_uc_run AS classify_run "
                            f"FROM {rows}", {**params, "_uc_run": w.run_id},
                            ["mask_class", "classify_run"])

    def process(self, rows, prepared: Any, ctx: Context) -> BatchResult:
        """rows: a pyarrow Table (columnar) of masks lacking a stored feature: each is
        decoded, its features computed (and stored), and the classes are numpy over them."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        missing = np.zeros(rows.num_rows, dtype=bool)
        for c in FEATURE_COLUMNS:
            missing |= rows.column(c).is_null().to_numpy(zero_copy_only=False)
        ids = rows.column("edit_id").to_numpy()
        area = pc.fill_null(rows.column("mask_area"), 0.0).to_numpy().copy()
        contours = pc.fill_null(rows.column("mask_contours"), 0).to_numpy().copy()
        computed, failed = [], {}
        keep = np.ones(rows.num_rows, dtype=bool)
        for i in np.flatnonzero(missing):   # a mask that came without its features
            r = {c: rows.column(c)[int(i)].as_py()
                 for c in ("edit_id", "mask_rle", "mask_height", "mask_width")}
            try:
                f = M.rle_features(r["mask_rle"], r["mask_height"], r["mask_width"])
            except Exception as e:
                failed[r["edit_id"]] = f"edit {r['edit_id']}: {e}"
                keep[i] = False
                continue
            computed.append({"edit_id": r["edit_id"], **f.columns()})
            area[i], contours[i] = f.area, f.contours
        classes = M.classify_many(area[keep], contours[keep], self.thresholds)
        out = pa.table({"edit_id": ids[keep], "mask_class": pa.array(classes, pa.string()),
                        "classify_run": pa.array(np.full(int(keep.sum()), ctx.run_id))})
        # the stored features are left as they are; only computed ones are written
        return BatchResult(updates={"edits": out}, failed=failed,
                           extra={"features": computed})

    def write(self, w: Access, result: BatchResult) -> None:
        for table, rows in result.updates.items():
            w.table(table).update(rows)
        if result.extra.get("features"):
            w.edits.update(result.extra["features"])
