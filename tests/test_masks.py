"""Masks: RLE round trip, features, quality classes on masks of known geometry, and soft masks
against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ultracurate import masks as M
from ultracurate.errors import UltracurateError
from ultracurate.images import resize_center_crop


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# -- RLE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (333, 500)])
def test_rle_round_trip_is_exact(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.03, 0.5, 1.0):
        m = rng.random(shape) < density
        rle = M.encode(m)
        assert isinstance(rle, str)
        back = M.decode(rle, *shape)
        assert back.dtype == bool and back.shape == shape
        assert np.array_equal(back, m)


def test_decode_corrupt_rle_is_one_line_error():
    with pytest.raises(UltracurateError, match="not a COCO RLE"):
        M.decode("\x00\x01garbage", 10, 10)


# -- features -------------------------------------------------------------------------------------
def test_features_of_known_geometry():
    m = np.zeros((40, 50), bool)
    m[5:15, 10:30] = True                      # 10 x 20 block
    f = M.features(m)
    assert f.area == pytest.approx(200 / 2000)
    assert f.bbox == [10, 5, 20, 10]
    assert (f.components, f.contours) == (1, 1)

    two = m.copy()
    two[30:35, 40:45] = True
    f2 = M.features(two)
    assert (f2.components, f2.contours) == (2, 2)
    assert f2.bbox == [10, 5, 35, 30]

    # A ring with a dot in its hole: two components, but only one external contour.
    ring = disc(60, 60, 30, 30, 20) & ~disc(60, 60, 30, 30, 12)
    ring[30, 30] = True
    f3 = M.features(ring)
    assert (f3.components, f3.contours) == (2, 1)

    empty = M.features(np.zeros((8, 8), bool))
    assert (empty.area, empty.bbox, empty.components, empty.contours) == (0.0, [0, 0, 0, 0], 0, 0)


def test_features_touching_the_border():
    m = np.zeros((20, 20), bool)
    m[0:5, 0:5] = True
    m[15:, 15:] = True
    f = M.rle_features(M.encode(m), 20, 20)
    assert f.bbox == [0, 0, 20, 20]
    assert (f.components, f.contours) == (2, 2)


# -- classes --------------------------------------------------------------------------------------
def _cls(m, **th):
    f = M.features(m)
    return M.classify(f.area, f.contours, M.thresholds(**th))


def test_classes_of_synthetic_masks():
    h = w = 200
    assert _cls(disc(h, w, 100, 100, 40)) == "fine"                 # ~12.6% of the image
    assert _cls(np.ones((h, w), bool)) == "too_large"
    few = np.zeros((h, w), bool)
    few[50:53, 60:63] = True                                         # 9 pixels
    assert _cls(few) == "too_small"
    assert _cls(np.zeros((h, w), bool)) == "too_small"
    salt = np.zeros((h, w), bool)
    salt[::3, ::3] = True                                            # 4489 isolated pixels
    rng = np.random.default_rng(0)
    salt |= rng.random((h, w)) < 0.01
    f = M.features(salt)
    assert 0.01 < f.area < 0.9 and f.contours > 500
    assert _cls(salt) == "fragmented"


def test_class_boundaries_follow_the_released_code():
    # kept only when 1% < area < 90%: both ends excluded
    assert M.classify(0.01, 1) == "too_small"
    assert M.classify(0.0101, 1) == "fine"
    assert M.classify(0.90, 1) == "too_large"
    assert M.classify(0.8999, 1) == "fine"
    assert M.classify(0.5, 500) == "fine"
    assert M.classify(0.5, 501) == "fragmented"
    # size is checked before fragmentation
    assert M.classify(0.95, 10_000) == "too_large"


def _boundary_cases(th: dict) -> list[tuple]:
    """(area, contours) just below, at and just above every threshold, with the other
    feature on either side of its own; an empty mask; NULLs."""
    def below(v):
        return math.nextafter(v, -math.inf)

    def above(v):
        return math.nextafter(v, math.inf)
    mid = (th["min_area"] + th["max_area"]) / 2
    many, few = th["max_contours"] + 1, max(th["max_contours"] - 1, 0)
    cases = []
    for v in (th["min_area"], th["max_area"]):
        for area in (below(v), v, above(v)):
            cases += [(max(area, 0.0), few), (max(area, 0.0), many)]
    for contours in (th["max_contours"] - 1, th["max_contours"], th["max_contours"] + 1):
        cases.append((mid, max(contours, 0)))
    cases += [(0.0, 0), (1.0, 10 ** 6), (mid, 10 ** 6), (None, 3), (mid, None), (None, None)]
    return cases


@pytest.mark.parametrize("overrides", [
    {},                                                  # the released code's
    {"min_area": 0.2, "max_area": 0.5, "max_contours": 3},
    {"min_area": 0, "max_area": 1, "max_contours": 0},   # the ends of the ranges
    {"min_area": 0.1, "max_area": 0.3000000000000001},   # a threshold a float32 would round
])
def test_sql_and_python_classes_agree_at_every_boundary(ws, overrides):
    """masks.classify_sql over the catalog's own columns gives what masks.classify and
    classify_many give on the same features, at each class boundary, for NULLs and for empty
    and fragmented masks (thresholds bound as parameters, never pasted)."""
    from _masks import add_masks, stored
    th = M.thresholds(**overrides)
    cases = _boundary_cases(th)
    ids = add_masks(ws, [stored(a, c) for a, c in cases])
    sql, params = M.classify_sql("mask_area", "mask_contours", th)
    assert all(str(v) not in sql for v in th.values() if v not in (0, 1))
    with ws.catalog(read_only=True) as cat:
        got = dict(cat.con.execute(f"SELECT edit_id, {sql} FROM edits", params).fetchall())
    want = [M.classify(a, c, th) for a, c in cases]
    assert [got[i] for i in ids] == want
    present = [(a, c) for a, c in cases if a is not None and c is not None]
    assert list(M.classify_many(*zip(*present), th)) == [M.classify(a, c, th) for a, c in present]
    assert set(want) == {*M.MASK_CLASSES, None}   # the table reaches every class


def test_thresholds_are_configurable_and_checked():
    th = M.thresholds(min_area=0.2, max_contours=3)
    assert th["max_area"] == M.DEFAULT_THRESHOLDS["max_area"]
    assert M.classify(0.15, 1, th) == "too_small"
    assert M.classify(0.3, 4, th) == "fragmented"
    areas = [0.15, 0.3, 0.3, 0.95]
    assert list(M.classify_many(areas, [1, 4, 1, 1], th)) == [
        M.classify(a, c, th) for a, c in zip(areas, [1, 4, 1, 1])]
    with pytest.raises(UltracurateError, match="unknown mask threshold"):
        M.thresholds(max_holes=3)
    with pytest.raises(UltracurateError, match="min_area < max_area"):
        M.thresholds(min_area=0.95)


# -- soft masks -----------------------------------------------------------------------------------
def l_shape():
    """8x8: a vertical bar (x 0-1) and a bottom bar (y 6-7). Its convex hull is the region
    y >= x - 1 (the hull's slanted edge runs from (1, 0) to (7, 6))."""
    m = np.zeros((8, 8), bool)
    m[:, 0:2] = True
    m[6:, :] = True
    return m


def test_soft_mask_ultraedit_hand_computed():
    m = l_shape()
    rle = M.encode(m)
    s = 0.3
    out = M.soft_mask(rle, 8, 8, (4, 4), soft_value=s, denoise=False)
    # latent (i, j) samples pixel (2i, 2j): L where j == 0 or i == 3; hull where i >= j.
    expected = np.array([[1, 0, 0, 0],
                         [1, s, 0, 0],
                         [1, s, s, 0],
                         [1, 1, 1, 1]], np.float32)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    assert np.array_equal(out, expected)

    full = M.soft_mask(rle, 8, 8, (8, 8), soft_value=s, denoise=False)
    yy, xx = np.mgrid[:8, :8]
    exp_full = np.where(m, 1.0, np.where(yy >= xx - 1, s, 0.0)).astype(np.float32)
    assert np.array_equal(full, exp_full)

    hard = M.soft_mask(rle, 8, 8, (4, 4), soft_value=None, denoise=False)
    assert np.array_equal(hard, (expected == 1).astype(np.float32))
    zero = M.soft_mask(rle, 8, 8, (4, 4), soft_value=0.0, denoise=False)
    assert np.array_equal(zero, hard)


def test_soft_mask_box_branch_for_many_contours():
    m = np.zeros((12, 12), bool)
    m[1:3, 1:3] = m[1:3, 8:10] = m[8:10, 4:6] = True     # three squares: 3 contours
    rle = M.encode(m)
    # with 2 <= 3 < 10 the rule uses the hulls (the squares) inside the bounding box
    out = M.soft_mask(rle, 12, 12, (12, 12), soft_value=0.5, hull_below=2, box_below=10,
                      denoise=False)
    box = np.zeros_like(m)
    box[1:10, 1:10] = True
    assert np.array_equal(out, np.where(m, 1.0, np.where(box, 0.5, 0.0)).astype(np.float32))
    # detector boxes, when given, are the outer mask
    out2 = M.soft_mask(rle, 12, 12, (12, 12), soft_value=0.5, hull_below=2, box_below=10,
                       denoise=False, boxes=[[0, 0, 11, 3], [4, 8, 5, 9]])
    box2 = np.zeros_like(m)
    box2[0:4, :] = True
    box2[8:10, 4:6] = True
    assert np.array_equal(out2, np.where(m, 1.0, np.where(box2, 0.5, 0.0)).astype(np.float32))
    # at or above box_below: no band at all
    out3 = M.soft_mask(rle, 12, 12, (12, 12), soft_value=0.5, hull_below=1, box_below=3,
                       denoise=False)
    assert np.array_equal(out3, m.astype(np.float32))


def test_hulls_contain_the_mask_unless_denoised_as_released():
    m = disc(64, 64, 32, 32, 18) | (disc(64, 64, 32, 52, 8))   # a blob, not convex
    hull = M.hull_mask(m)
    assert (hull & m).sum() == m.sum() and hull.sum() > m.sum()
    # the released code's denoising shrinks the hull below the mask's edge: there the soft
    # value lands inside the edit region
    released = M.hull_mask(m, denoise=True)
    assert (m & ~released).any()
    out = M.soft_mask(M.encode(m), 64, 64, (64, 64), soft_value=0.5, denoise=True)
    assert np.array_equal(out == 0.5, m ^ released)
    assert set(np.unique(out)) == {0.0, 0.5, 1.0}


def test_soft_mask_feathered():
    m = np.zeros((21, 21), bool)
    m[10, 10] = True
    rle = M.encode(m)
    same = M.soft_mask(rle, 21, 21, (21, 21), variant="feathered", dilate_px=0, blur_sigma=0)
    assert np.array_equal(same, m.astype(np.float32))
    dil = M.soft_mask(rle, 21, 21, (21, 21), variant="feathered", dilate_px=2, blur_sigma=0)
    # OpenCV's 5x5 elliptic element: full middle rows, one pixel at the top and bottom
    element = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                        [0, 0, 1, 0, 0]], bool)
    expected = np.zeros((21, 21), bool)
    expected[8:13, 8:13] = element
    assert np.array_equal(dil, expected.astype(np.float32))
    f = M.soft_mask(rle, 21, 21, (21, 21), variant="feathered", dilate_px=2, blur_sigma=2.0)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    assert f[10, 10] == 1.0
    row = f[10, 10:]
    assert np.all(np.diff(row) <= 1e-6) and row[-1] < 0.05     # falls off away from the object
    small = M.soft_mask(rle, 21, 21, (7, 7), variant="feathered")
    assert small.shape == (7, 7) and 0 < small.max() <= 1


def test_crop_matches_resize_center_crop_geometry():
    h, w = 100, 200
    m = np.zeros((h, w), bool)
    m[:, :100] = True
    c = M.crop_mask(m, 50)
    assert c.shape == (50, 50)
    assert c[:, :25].all() and not c[:, 25:].any()
    # the same block through the images module's crop lands in the same place
    block = np.zeros((h, w), bool)
    block[20:60, 70:130] = True
    im = resize_center_crop(Image.fromarray(block.astype(np.uint8) * 255), 50,
                            resample=Image.NEAREST)
    ref = np.asarray(im) > 127
    got = M.crop_mask(block, 50)
    assert (ref & got).sum() / (ref | got).sum() > 0.9
    # soft_mask applies the crop before going to latent size
    s = M.soft_mask(M.encode(m), h, w, (10, 10), crop=(50, 50), soft_value=None)
    assert s.shape == (10, 10) and s[:, :5].all() and not s[:, 5:].any()
    assert M.crop_boxes([[0, 0, 100, 100]], w, h, 50) == [[-25.0, 0.0, 25.0, 50.0]]


def test_soft_mask_settings_record_the_choice():
    m = l_shape()
    st = M.soft_mask_settings("ultraedit", 0.3, (512,), rle=M.encode(m), height=8, width=8)
    assert st["variant"] == "ultraedit" and st["soft_value"] == 0.3 and st["crop"] == 512
    assert st["hull_below"] == 150 and st["box_below"] == 500 and st["denoise"] is False
    assert st["outer"] == "hull" and st["boxes"] == "mask_bbox"
    fe = M.soft_mask_settings("feathered", dilate_px=5)
    assert fe == {"variant": "feathered", "version": M.SOFT_MASK_VERSION, "crop": None,
                  "dilate_px": 5, "blur_sigma": M.FEATHERED_DEFAULTS["blur_sigma"]}
    import json
    json.dumps(st)
    with pytest.raises(UltracurateError, match="unknown soft mask variant"):
        M.soft_mask(M.encode(m), 8, 8, (4, 4), variant="blurry")
    with pytest.raises(UltracurateError, match="unknown ultraedit soft mask parameter"):
        M.soft_mask(M.encode(m), 8, 8, (4, 4), sigma=3)
    with pytest.raises(UltracurateError, match="soft_value"):
        M.soft_mask(M.encode(m), 8, 8, (4, 4), soft_value=2.0)


def test_features_many_matches_features():
    rng = np.random.default_rng(3)
    ms = [disc(30, 40, 15, 20, 8), np.zeros((30, 40), bool), np.ones((30, 40), bool),
          rng.random((30, 40)) < 0.2, l_shape()]
    got = M.features_many([M.encode(m) for m in ms], [m.shape[0] for m in ms],
                          [m.shape[1] for m in ms], chunk=2)
    for i, m in enumerate(ms):
        f = M.features(m)
        assert got["area"][i] == pytest.approx(f.area)
        assert got["bbox"][i] == f.bbox
        assert (got["components"][i], got["contours"][i]) == (f.components, f.contours)
    # past pycocotools' 255-object limit of one call
    many = M.features_many([M.encode(ms[0])] * 600, [30] * 600, [40] * 600, shape=False)
    assert len(many["area"]) == 600 and many["bbox"][599] == M.features(ms[0]).bbox
