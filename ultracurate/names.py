"""The names and defaults the package shares, each defined once: the values catalog columns
take (edit types, modes), the score columns, the method's grounding thresholds and caption
limit, the export formats. Modules import them from here; the CLI's choice types
(`commands/_common.py`) are checked against them by tests/test_hardening.py. The method's
facts behind the defaults are in docs/method.md.

Imports nothing, so that any module (the catalog, a model adapter, a stage) can use it.
"""

from __future__ import annotations

# The nine edit types of the method (edits.edit_type; the schema's CHECK lists the same).
EDIT_TYPES = (
    "add", "change_global", "change_local", "change_color", "transform_global",
    "transform_local", "replace", "turn", "others",
)

# An edit's mode (edits.mode), and the --mode of instruct and generate: auto takes each
# edit's own (instruct: region when the answer names an edit object).
MODES = ("free", "region")
EDIT_MODES = ("auto", *MODES)

# The score stage's columns of candidates, in the order it computes them; UltraEdit's release
# publishes the first six.
SCORE_COLUMNS = ("clip_sim_source", "clip_sim_target", "clip_sim_dir", "clip_sim_image",
                 "dinov2_sim", "ssim", "l1", "l2")
PUBLISHED_SCORES = SCORE_COLUMNS[:6]

# A mask's features as columns of edits: the box as four scalars (x, y, w, h in pixels), since
# updating a list column rewrites the whole row (migration 011); edits_v lists them as
# `mask_bbox`.
BBOX_COLUMNS = ("mask_bbox_x", "mask_bbox_y", "mask_bbox_w", "mask_bbox_h")
FEATURE_COLUMNS = ("mask_area", *BBOX_COLUMNS, "mask_components", "mask_contours")

# Grounding: keep detector boxes scoring above BOX_THRESHOLD; GroundingDINO labels a box with
# the phrase tokens above TEXT_THRESHOLD (the released code's values).
BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25

# UltraEdit skips captions longer than this many words: instruct writes from none longer,
# generate skips an edit with a longer source or target caption, and a captioner's longer
# answer is invalid.
CAPTION_MAX_WORDS = 60

# What `export` writes: the formats, and the layouts of the hf format.
EXPORT_FORMATS = ("hf", "jsonl", "ip2p", "wds")
EXPORT_LAYOUTS = ("default", "ultraedit")
