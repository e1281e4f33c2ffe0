"""Ground: the region of a region-mode edit, as a SAM mask of its edit object.

For each edit (mode 'region' with an edit object other than NONE): detect the edit object
phrase in the anchor photo (GroundingDINO, or OWLv2; box threshold 0.3, text threshold 0.25:
names.BOX_THRESHOLD, TEXT_THRESHOLD),
prompt SAM with every box (one mask per box) and keep the union, at the anchor's resolution.
The mask is stored as a COCO RLE with its features (area fraction, bbox, connected components,
external contours). No box found: edit_status 'no_region' with the reason, no mask; the
generator skips it.

Batches are ordered by anchor, and SAM's image embedding (its costly part) is computed once per
anchor in a batch and shared by all of that anchor's edits. The compute is
`ultracurate.grounding.ground_batch`, which imports no catalog package; this stage runs it on its
batches and writes the results.
"""

from __future__ import annotations

import json
from typing import Any

from ..grounding import ground_batch
from ..images import BadImage
from ..names import BOX_THRESHOLD, FEATURE_COLUMNS, TEXT_THRESHOLD
from ..runner import BatchResult, Context, RowStage

REGION_WHERE = "mode = 'region' AND edit_object IS NOT NULL AND edit_object <> 'NONE'"

# What grounding writes: the mask and its features, the boxes, the status; a re-grounded edit
# loses its mask class (classify-masks redoes it).
MASK_COLUMNS = ("mask_rle", "mask_height", "mask_width", *FEATURE_COLUMNS,
                "ground_boxes", "ground_run",
                "edit_status", "edit_reasons", "mask_class", "classify_run")


def no_box_reason(edit_object: str) -> str:
    return f'no box found for "{edit_object}"'


class GroundStage(RowStage):
    name = "ground"
    table = "edits"
    default_where = REGION_WHERE
    columns = "edit_id, anchor_id, anchor_media, edit_object"
    writes = {"edits": set(MASK_COLUMNS)}
    batch_size = 16
    roles = ("grounding", "sam")
    # Consecutive rows of an anchor land in the same batch, so its embedding is shared
    # (within each key window of pending rows: an anchor's edits are read together but where
    # a window ends).
    order_by = "anchor_id, edit_id"
    order_in_windows = True

    def __init__(self, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD, backend: str | None = None,
                 sam_batch_size: int = 8):
        """Ground the selected region edits (see the module docstring); thresholds default
        to the released code's (names.BOX_THRESHOLD, TEXT_THRESHOLD)."""
        super().__init__(box_threshold=box_threshold, text_threshold=text_threshold,
                         backend=backend, sam_batch_size=sam_batch_size)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.backend = backend
        self.sam_batch_size = sam_batch_size
        self._models: tuple | None = None

    def setup(self, ctx: Context) -> None:
        from ..models import grounding, resolve, sam
        ws = ctx.workspace
        det = grounding.load(resolve(ws, "grounding"), ctx.device, backend=self.backend,
                             box_threshold=self.box_threshold,
                             text_threshold=self.text_threshold)
        self._models = (det, sam.load(resolve(ws, "sam"), ctx.device))

    def prepare(self, rows: list[dict], ctx: Context) -> dict[int, Any]:
        """Decode each anchor of the batch once: anchor_id -> PIL RGB image or the error."""
        ws = ctx.workspace
        out: dict[int, Any] = {}
        for r in rows:
            a = r["anchor_id"]
            if a not in out:
                try:
                    out[a] = ws.media.load_rgb(r["anchor_media"])
                except (BadImage, OSError) as e:
                    out[a] = BadImage(f"anchor {a}: {e}")
                except Exception as e:  # media store lookup errors
                    out[a] = BadImage(f"anchor {a}: {str(e).splitlines()[0]}")
        return out

    def process(self, rows: list[dict], prepared: dict[int, Any], ctx: Context
                ) -> BatchResult:
        if self._models is None:
            self.setup(ctx)
        det, sam = self._models
        failed = {r["edit_id"]: str(prepared[r["anchor_id"]]) for r in rows
                  if isinstance(prepared[r["anchor_id"]], Exception)}
        todo = [r for r in rows if r["edit_id"] not in failed]
        found = ground_batch(det, sam, [prepared[r["anchor_id"]] for r in todo],
                             [r["edit_object"] for r in todo], [r["anchor_id"] for r in todo],
                             sam_batch_size=self.sam_batch_size)
        out = []
        for r, g in zip(todo, found):
            row = {k: None for k in MASK_COLUMNS}
            row.update(edit_id=r["edit_id"], ground_run=ctx.run_id,
                       ground_boxes=json.dumps({**g.detections.to_json(),
                                                "detector": det.backend}))
            if g.rle is None:
                row.update(edit_status="no_region",
                           edit_reasons=[no_box_reason(r["edit_object"])])
            else:
                row.update(mask_rle=g.rle, mask_height=g.height, mask_width=g.width,
                           **g.features.columns(), edit_status="grounded")
            out.append(row)
        return BatchResult(updates={"edits": out}, failed=failed)
