"""Region masks: COCO RLE storage, features, quality classes, and the soft masks that
region-based generation blends with.

A mask is stored in the catalog as a COCO RLE (pycocotools' compressed counts string) with its
height and width. Everything else is derived from it on demand:

- `features`: area fraction, bounding box, connected components, external contours (OpenCV's
  findContours with RETR_EXTERNAL, as the released UltraEdit code counts them);
- `classify`: too_large | too_small | fragmented | fine, with the released code's thresholds
  as defaults (`DEFAULT_THRESHOLDS`, the one place they are defined) and one table of rules
  (`CLASS_RULES`) that the Python, numpy (`classify_many`) and SQL (`classify_sql`) forms all
  read;
- `soft_mask`: the mask at latent resolution that region-based generation uses, either
  UltraEdit's construction (edit mask, an outer mask around it, a constant soft value in the
  band between them) or a feathered variant (dilate, then Gaussian blur).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from .errors import UltracurateError
from .names import BBOX_COLUMNS

# The released code keeps a mask when 1% < area < 90% and it has at most 500 external
# contours; the paper names the rejects overly small, overly large and fragmented.
DEFAULT_THRESHOLDS = {
    "min_area": 0.01,       # area fraction at or below this: too_small
    "max_area": 0.90,       # area fraction at or above this: too_large
    "max_contours": 500,    # more external contours than this: fragmented
}
MASK_CLASSES = ("too_large", "too_small", "fragmented", "fine")
# How a mask's class follows from its area fraction and external contours: the first rule it
# meets, in this order (size before fragmentation, as in the released code, so an empty mask
# is too_small); a mask meeting none is fine. (class, feature, comparison, threshold name).
CLASS_RULES = (
    ("too_large", "area", ">=", "max_area"),
    ("too_small", "area", "<=", "min_area"),
    ("fragmented", "contours", ">", "max_contours"),
)
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt}

# The released soft-mask branch: with fewer than `hull_below` external contours the outer mask
# is the convex hulls of the object's contours; from there up to `box_below` the edit mask
# becomes those hulls and the outer mask the detector's box(es); otherwise there is no band.
# The released code first runs non-local-means denoising (h=60) over the mask image before
# taking the hulls; that shrinks the hulls below the mask's own edge (so soft values land
# inside the edit region) and costs ~0.7 s per 512 px mask on a CPU core. Our default skips
# it (the outer mask then always contains the edit mask); denoise=True reproduces it.
ULTRAEDIT_SOFT_DEFAULTS = {"hull_below": 150, "box_below": 500, "denoise": False}
FEATHERED_DEFAULTS = {"dilate_px": 8, "blur_sigma": 4.0}
SOFT_VALUES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8)  # the released code's choices
SOFT_MASK_VERSION = 1


# -- RLE --------------------------------------------------------------------------------------
def encode(mask: np.ndarray) -> str:
    """COCO RLE compressed counts string of a 2-D boolean (or 0/1) mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UltracurateError(f"a mask must be 2-D, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8) != 0, dtype=np.uint8))
    return rle["counts"].decode("ascii")


def _rle(rle: str, height: int, width: int) -> dict:
    return {"size": [int(height), int(width)],
            "counts": rle.encode("ascii") if isinstance(rle, str) else rle}


def decode(rle: str, height: int, width: int, check: bool = True) -> np.ndarray:
    """The boolean (height, width) mask of a stored RLE. pycocotools decodes any string
    without complaint, so with check the mask is re-encoded and must give the same string
    (a stored RLE is always canonical)."""
    try:
        out = coco_mask.decode(_rle(rle, height, width)).astype(bool)
    except Exception as e:  # pycocotools raises bare exceptions on some corrupt strings
        raise UltracurateError(f"not a COCO RLE of a {height}x{width} mask ({e})") from None
    if check and encode(out) != (rle if isinstance(rle, str) else rle.decode("ascii")):
        raise UltracurateError(f"not a COCO RLE of a {height}x{width} mask (its runs do "
                               f"not cover the image)")
    return out


# -- features and classes ----------------------------------------------------------------------
@dataclass
class MaskFeatures:
    area: float            # fraction of the image
    bbox: list[int]        # x, y, w, h in pixels ([0, 0, 0, 0] when empty)
    components: int        # 8-connected components
    contours: int          # external contours (cv2.RETR_EXTERNAL)

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self) -> dict:
        """The features as the catalog's columns (FEATURE_COLUMNS)."""
        return {"mask_area": self.area, **dict(zip(BBOX_COLUMNS, self.bbox)),
                "mask_components": self.components, "mask_contours": self.contours}


def count_contours(mask: np.ndarray) -> int:
    """External contours, as the released code counts them (RETR_EXTERNAL, SIMPLE)."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return len(contours)


def count_components(mask: np.ndarray) -> int:
    n, _ = cv2.connectedComponents(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8)
    return int(n) - 1


def features(mask: np.ndarray) -> MaskFeatures:
    """Area fraction, bbox, components and external contours of a boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return MaskFeatures(0.0, [0, 0, 0, 0], 0, 0)
    xs = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    # Components and contours only depend on the box (padded by one so that borders match).
    sub = mask[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1].astype(np.uint8)
    return MaskFeatures(float(mask.sum()) / (h * w), [x0, y0, x1 - x0, y1 - y0],
                        count_components(sub), count_contours(sub))


def rle_features(rle: str, height: int, width: int) -> MaskFeatures:
    return features(decode(rle, height, width))


def thresholds(**overrides) -> dict:
    """The classification thresholds: the defaults with any of them overridden (None keeps
    the default). Unknown names are an error."""
    unknown = set(overrides) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise UltracurateError(f"unknown mask threshold(s) {sorted(unknown)} "
                               f"(known: {', '.join(DEFAULT_THRESHOLDS)})")
    out = dict(DEFAULT_THRESHOLDS)
    out.update({k: v for k, v in overrides.items() if v is not None})
    if not 0 <= out["min_area"] < out["max_area"] <= 1:
        raise UltracurateError(f"mask thresholds need 0 <= min_area < max_area <= 1, got "
                               f"min_area={out['min_area']}, max_area={out['max_area']}")
    return out


def classify(area: float | None, contours: int | None, th: dict | None = None) -> str | None:
    """too_large | too_small | fragmented | fine by CLASS_RULES (an empty mask is too_small);
    None when a feature is missing (NULL), as classify_sql gives."""
    if area is None or contours is None:
        return None
    th = th or DEFAULT_THRESHOLDS
    value = {"area": float(area), "contours": float(contours)}
    for name, feature, op, threshold in CLASS_RULES:
        if _COMPARE[op](value[feature], float(th[threshold])):
            return name
    return "fine"


def classify_many(areas: Sequence[float], contours: Sequence[int],
                  th: dict | None = None) -> np.ndarray:
    """Vectorised `classify` over present features (object array of class names)."""
    th = th or DEFAULT_THRESHOLDS
    value = {"area": np.asarray(areas, dtype=np.float64),
             "contours": np.asarray(contours, dtype=np.int64).astype(np.float64)}
    return np.select([_COMPARE[op](value[feature], float(th[threshold]))
                      for _, feature, op, threshold in CLASS_RULES],
                     [name for name, *_ in CLASS_RULES], "fine").astype(object)


def classify_sql(area: str, contours: str, th: dict | None = None) -> tuple[str, dict]:
    """`classify` as an SQL expression over two trusted column expressions, and the
    thresholds as its parameters (never pasted in): NULL when a feature is NULL. Every
    comparison is in DOUBLE, as Python and numpy compare (a threshold bound as an integer or
    a column of another type cannot round differently)."""
    th = th or DEFAULT_THRESHOLDS
    value = {"area": f"CAST({area} AS DOUBLE)", "contours": f"CAST({contours} AS DOUBLE)"}
    whens = " ".join(f"WHEN {value[feature]} {op} CAST($_uc_mask_{threshold} AS DOUBLE) "
                     f"THEN '{name}'" for name, feature, op, threshold in CLASS_RULES)
    sql = (f"(CASE WHEN {area} IS NULL OR {contours} IS NULL THEN NULL {whens} "
           f"ELSE 'fine' END)")
    params = {f"_uc_mask_{threshold}": float(th[threshold])
              for _, _, _, threshold in CLASS_RULES}
    return sql, params


def boxes_mask(boxes: Iterable[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of filled boxes (x0, y0, x1, y1 in pixels, inclusive ends as the released
    code draws them)."""
    out = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        xa, ya = max(int(x0), 0), max(int(y0), 0)
        xb, yb = min(int(x1), width - 1), min(int(y1), height - 1)
        if xb >= xa and yb >= ya:
            out[ya:yb + 1, xa:xb + 1] = True
    return out


# -- geometry shared with the generator's input crop ---------------------------------------------
def center_crop_geometry(width: int, height: int, size: int = 512
                         ) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, left, top) of `images.resize_center_crop(im, size)`: the short
    side goes to size, then a centred size x size crop."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def crop_mask(mask: np.ndarray, size: int = 512) -> np.ndarray:
    """Apply resize_center_crop's geometry to a boolean mask (bilinear, binarised at 0.5), so
    the mask lines up with the generator's square input."""
    h, w = mask.shape
    nw, nh, left, top = center_crop_geometry(w, h, size)
    resized = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
    return resized[top:top + size, left:left + size] >= 0.5


def crop_boxes(boxes: Iterable[Sequence[float]], width: int, height: int, size: int = 512
               ) -> list[list[float]]:
    """Boxes (x0, y0, x1, y1, anchor pixels) mapped into the size x size crop."""
    nw, nh, left, top = center_crop_geometry(width, height, size)
    sx, sy = nw / width, nh / height
    return [[x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top]
            for x0, y0, x1, y1 in boxes]


def _crop_size(crop) -> int | None:
    if crop is None:
        return None
    if isinstance(crop, (int, np.integer)):
        return int(crop)
    crop = tuple(crop)
    if len(crop) == 1 or (len(crop) == 2 and crop[0] == crop[1]):
        return int(crop[0])
    raise UltracurateError(f"crop must be a square size (512,) or (512, 512), got {crop}")


def resize_nearest(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with torch's `interpolate(mode='nearest')` indexing
    (source index = floor(i * in / out)), as the released pipeline resizes masks."""
    h, w = mask.shape
    oh, ow = out_hw
    rows = np.minimum((np.arange(oh) * h) // oh, h - 1)
    cols = np.minimum((np.arange(ow) * w) // ow, w - 1)
    return mask[rows[:, None], cols[None, :]]


# -- soft masks ---------------------------------------------------------------------------------
def hull_mask(mask: np.ndarray, denoise: bool = False) -> np.ndarray:
    """The released code's contour mask: the filled convex hull of each contour of the mask
    (after its non-local-means denoising of the mask image, when denoise)."""
    img = mask.astype(np.uint8) * 255
    if denoise:
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        img = cv2.cvtColor(cv2.fastNlMeansDenoisingColored(rgb, None, 60, 60, 7, 15),
                           cv2.COLOR_BGR2GRAY)
    _, binary = cv2.threshold(img, 127, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(mask.shape, dtype=np.uint8)
    for c in contours:
        cv2.drawContours(out, [cv2.convexHull(c)], -1, 255, -1)
    return out > 0


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """The mask's bounding box as one (x0, y0, x1, y1) box, inclusive ends ([] if empty)."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return []
    return [[int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])]]


def ultraedit_masks(mask: np.ndarray, boxes: Sequence[Sequence[float]] | None = None, *,
                    hull_below: int = 150, box_below: int = 500, denoise: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(edit mask, outer mask, kind) at the mask's resolution, by the released code's rule on
    the number n of external contours: 0 < n < hull_below: edit = mask, outer = convex hulls
    of its contours ('hull'); hull_below <= n < box_below: edit = those hulls, outer = the
    detector boxes, or the mask's bounding box when boxes are not given ('box'); otherwise
    edit = outer = mask ('none': no band)."""
    n = count_contours(mask)
    if 0 < n < hull_below:
        return mask, hull_mask(mask, denoise), "hull"
    if hull_below <= n < box_below:
        h, w = mask.shape
        box = boxes_mask(boxes if boxes else bbox_of(mask), h, w)
        return hull_mask(mask, denoise), box, "box"
    return mask, mask, "none"


def soft_mask(rle: str, height: int, width: int, latent_hw: tuple[int, int], *,
              variant: str = "ultraedit", soft_value: float | None = 0.5,
              crop: tuple | None = None, **params) -> np.ndarray:
    """The (soft) mask M that region-based generation blends with, as float32 of shape
    latent_hw with values in [0, 1] (1: the model may change this latent pixel).

    rle, height, width: the stored mask (anchor resolution). crop: the generator's square
    input size, e.g. (512,) or (512, 512): the mask goes through resize_center_crop's
    geometry first. variant:
    - "ultraedit": edit and outer masks by `ultraedit_masks` (params: boxes = detector boxes
      x0, y0, x1, y1 in anchor pixels, hull_below, box_below, denoise), each binarised at 0.5
      and resized to latent size by nearest neighbour; latent pixels where they disagree get
      soft_value. soft_value None: the hard edit mask.
    - "feathered": the mask dilated by dilate_px pixels and Gaussian-blurred with blur_sigma
      (both at the cropped image's resolution), never below the mask itself, then area-resized
      to latent size. soft_value is ignored.
    """
    cfg = _settings(variant, soft_value, crop, params)
    mask = decode(rle, height, width)
    boxes = params.get("boxes")
    size = cfg["crop"]
    if size is not None:
        mask = crop_mask(mask, size)
        if boxes:
            boxes = crop_boxes(boxes, width, height, size)
    lh, lw = (int(v) for v in latent_hw)
    if variant == "ultraedit":
        edit, outer, _ = ultraedit_masks(mask, boxes, hull_below=cfg["hull_below"],
                                         box_below=cfg["box_below"], denoise=cfg["denoise"])
        edit_l = resize_nearest(edit, (lh, lw))
        out = edit_l.astype(np.float32)
        if soft_value is not None:
            outer_l = resize_nearest(outer, (lh, lw))
            out[edit_l != outer_l] = np.float32(soft_value)
        return out
    # feathered
    m = mask.astype(np.uint8)
    d = int(cfg["dilate_px"])
    if d > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1))
        m = cv2.dilate(m, kernel)
    f = m.astype(np.float32)
    if cfg["blur_sigma"] > 0:
        f = cv2.GaussianBlur(f, (0, 0), float(cfg["blur_sigma"]), borderType=cv2.BORDER_REPLICATE)
    f = np.maximum(f, mask.astype(np.float32))
    out = cv2.resize(f, (lw, lh), interpolation=cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def pair_mask(rle: str, height: int, width: int, crop: int | None,
              out_hw: tuple[int, int]) -> np.ndarray:
    """The stored mask in the geometry of a candidate's image pair (out_hw = its images'
    height, width): through `crop_mask` first when generation cropped the anchor to crop x
    crop (the very mask the editor blended with), then nearest neighbour to out_hw if the
    pair's images have another size still (e.g. imported rows)."""
    mask = decode(rle, height, width)
    if crop is not None and mask.shape != (crop, crop):
        mask = crop_mask(mask, crop)
    if mask.shape != tuple(out_hw):
        mask = resize_nearest(mask, out_hw)
    return mask


def recorded_soft_mask(rle: str, height: int, width: int, settings: dict,
                       out_hw: tuple[int, int], boxes: Sequence | None = None) -> np.ndarray:
    """The soft mask a candidate was generated with, rebuilt from the settings
    `soft_mask_settings` recorded in its gen_params, at out_hw (its images' size: the mask
    before generation's nearest-neighbour step down to latent size). boxes: the detector
    boxes (anchor pixels), needed when the settings say they were used."""
    variant = settings.get("variant", "ultraedit")
    if settings.get("version", SOFT_MASK_VERSION) != SOFT_MASK_VERSION:
        raise UltracurateError(f"soft mask settings of version {settings.get('version')} "
                               f"(this ultracurate builds version {SOFT_MASK_VERSION})")
    known = ULTRAEDIT_SOFT_DEFAULTS if variant == "ultraedit" else FEATHERED_DEFAULTS
    params: dict[str, Any] = {k: settings[k] for k in known if k in settings}
    if variant == "ultraedit" and settings.get("boxes") == "detector":
        if not boxes:
            raise UltracurateError("its soft mask used the detector's boxes, which the edit "
                                   "no longer has")
        params["boxes"] = boxes
    return soft_mask(rle, height, width, out_hw, variant=variant,
                     soft_value=settings.get("soft_value"), crop=settings.get("crop"),
                     **params)


def _settings(variant: str, soft_value, crop, params: dict) -> dict:
    if variant == "ultraedit":
        known = dict(ULTRAEDIT_SOFT_DEFAULTS)
    elif variant == "feathered":
        known = dict(FEATHERED_DEFAULTS)
    else:
        raise UltracurateError(f"unknown soft mask variant '{variant}' (ultraedit or feathered)")
    unknown = set(params) - set(known) - {"boxes"}
    if unknown:
        raise UltracurateError(f"unknown {variant} soft mask parameter(s) {sorted(unknown)} "
                               f"(known: {', '.join(known)}, boxes)")
    if soft_value is not None and not 0.0 <= float(soft_value) <= 1.0:
        raise UltracurateError(f"soft_value must be in [0, 1] or None, got {soft_value}")
    known.update({k: v for k, v in params.items() if k != "boxes"})
    out: dict[str, Any] = {"variant": variant, "version": SOFT_MASK_VERSION,
                           "crop": _crop_size(crop)}
    if variant == "ultraedit":
        out["soft_value"] = None if soft_value is None else float(soft_value)
    out.update(known)
    return out


def soft_mask_settings(variant: str = "ultraedit", soft_value: float | None = 0.5,
                       crop: tuple | None = None, *, rle: str | None = None,
                       height: int | None = None, width: int | None = None,
                       **params) -> dict:
    """What to record with a generated candidate about its mask: the variant and every
    parameter with defaults filled in (JSON-ready). Given the stored mask (rle, height,
    width) of an ultraedit mask, it also records which outer mask the rule chose ('hull',
    'box' or 'none') and whether detector boxes were passed."""
    out = _settings(variant, soft_value, crop, params)
    if variant == "ultraedit":
        out["boxes"] = "detector" if params.get("boxes") else "mask_bbox"
        if rle is not None and height is not None and width is not None:
            mask = decode(rle, height, width)
            if out["crop"] is not None:
                mask = crop_mask(mask, out["crop"])
            n = count_contours(mask)
            out["outer"] = ("hull" if 0 < n < out["hull_below"] else
                            "box" if out["hull_below"] <= n < out["box_below"] else "none")
    return out


# -- many masks at once ---------------------------------------------------------------------------
def _shape_features(args) -> tuple[list[int], list[int]]:
    """Components and contours of a chunk of (rle, h, w, bbox) rows: decode, crop to the
    bbox (plus a one-pixel border), count with OpenCV."""
    rles, hs, ws, boxes = args
    comps, conts = [], []
    for rle, h, w, (x, y, bw, bh) in zip(rles, hs, ws, boxes):
        if bw == 0 or bh == 0:
            comps.append(0)
            conts.append(0)
            continue
        m = coco_mask.decode(_rle(rle, h, w))
        sub = np.ascontiguousarray(m[max(y - 1, 0):y + bh + 1, max(x - 1, 0):x + bw + 1])
        comps.append(count_components(sub))
        conts.append(count_contours(sub))
    return comps, conts


def features_many(rles: Sequence[str], heights: Sequence[int], widths: Sequence[int], *,
                  shape: bool = True, workers: int = 1, chunk: int = 2048) -> dict:
    """Features of many stored masks: area fraction and bbox from the RLEs themselves
    (pycocotools' C loops, no decoding), and, with shape, components and external contours
    (decoded one at a time, counted on the bbox crop, over `workers` processes).
    Returns columns as lists/arrays: area, bbox, components, contours."""
    objs = [_rle(r, h, w) for r, h, w in zip(rles, heights, widths)]
    if not objs:
        return {"area": np.zeros(0), "bbox": [], "components": [], "contours": []}
    pix = np.asarray(heights, dtype=np.float64) * np.asarray(widths, dtype=np.float64)
    # pycocotools' area/toBbox overflow a uint8 count past 255 objects under numpy 2: chunk.
    area = np.concatenate([coco_mask.area(objs[i:i + 255]) for i in range(0, len(objs), 255)]
                          ).astype(np.float64) / pix
    bbox = np.concatenate([coco_mask.toBbox(objs[i:i + 255])
                           for i in range(0, len(objs), 255)]).astype(np.int64)
    out = {"area": area, "bbox": bbox.tolist(), "components": None, "contours": None}
    if shape:
        jobs = [(list(rles[i:i + chunk]), list(heights[i:i + chunk]),
                 list(widths[i:i + chunk]), bbox[i:i + chunk].tolist())
                for i in range(0, len(objs), chunk)]
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(workers) as pool:
                parts = list(pool.map(_shape_features, jobs))
        else:
            parts = [_shape_features(j) for j in jobs]
        out["components"] = [c for p in parts for c in p[0]]
        out["contours"] = [c for p in parts for c in p[1]]
    return out
