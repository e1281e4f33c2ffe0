"""generate's planning (set-based, in SQL) against a reference written from the rules: which
edits are planned or skipped and why, the missing candidate indices, calls (gen_call), ids,
seeds (the documented MD5 formula), and the rest of each planned row; planning twice adds
nothing. No model runs: planning reads and writes the catalog only."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from ultracurate import masks
from ultracurate.catalog import now
from ultracurate.errors import UltracurateError
from ultracurate.names import CAPTION_MAX_WORDS
from ultracurate.selection import Selection
from ultracurate.stages.generate import (GenerateStage, PlanReport, PlanRules,
                                         PlanWindows, plan_candidates)

PLANNED = ("candidate_id", "edit_id", "candidate_index", "seed", "gen_behaviour",
           "gen_params", "auto_status", "gen_call", "source_image", "edited_image", "error")
PER_CALL = {"method": {"free": 16, "region": 16}, "ultraedit-compat": {"free": 7, "region": 6}}


def _mask(h: int, w: int, box: tuple[slice, slice] | None) -> str:
    m = np.zeros((h, w), bool)
    if box is None:
        m[:] = True
    else:
        m[box] = True
    return masks.encode(m)


def _edits() -> list[dict]:
    """Edits covering every planning rule: free-form edits (one over 60 words, one of exactly
    60, one whose double spaces make it 61), region edits with a stored class of each kind,
    unclassified ones with stored features (each class) and without (classified from the
    mask), and region edits without a grounded mask."""
    fine = _mask(32, 32, (slice(8, 24), slice(8, 24)))
    full = _mask(32, 32, None)
    rows = []

    def add(mode, status="proposed", caption="a cat on a mat", rle=None, cls=None,
            area=None, contours=None, edit_type="replace"):
        rows.append({"edit_id": len(rows) + 1, "anchor_id": 1 + len(rows) % 3,
                     "source_caption": caption, "instruction": "make it snowy",
                     "target_caption": caption + " in the snow", "edit_object": "cat",
                     "edit_type": edit_type, "mode": mode, "edit_status": status,
                     "mask_rle": rle, "mask_height": 32 if rle else None,
                     "mask_width": 32 if rle else None, "mask_class": cls,
                     "mask_area": area, "mask_contours": contours, "created_at": now()})

    for i in range(20):                      # enough free edits for several calls
        add("free", edit_type=("replace", "add")[i % 2])
    add("free", caption=" ".join(["word"] * 57))            # 60 words with " in the snow"
    add("free", caption=" ".join(["word"] * 56) + "  x")    # 61: a double space is a word
    add("free", caption=" ".join(["word"] * 61))
    for i, cls in enumerate(masks.MASK_CLASSES * 3):        # stored classes
        add("region", "grounded", rle=fine, cls=cls, area=0.25, contours=1,
            edit_type=("replace", "add")[i % 2])
    for area, contours in ((0.95, 1), (0.005, 1), (0.3, 600), (0.3, 2), (0.5, 3)):
        add("region", "grounded", rle=fine, area=area, contours=contours)  # from features
    add("region", "grounded", rle=fine)                     # from the mask: fine
    add("region", "grounded", rle=full)                     # from the mask: too_large
    add("region", "no_region")                              # not grounded
    add("region", "grounded")                               # grounded, no mask
    add("region", "grounded", rle=fine, cls="fine", caption=" ".join(["word"] * 61))
    return rows


@pytest.fixture
def plan_ws(ws):
    """A catalog with three anchors and the edits above; edits 3 and 27 (region, fine) already have
    candidates 0 and 2 (a gap at 1), edit 5 has candidate 1 generated."""
    with ws.catalog() as cat:
        cat.con.execute("BEGIN")
        cat.anchors.insert([{"anchor_id": a, "sha256": f"{a:064x}", "media": f"m{a}.jpg",
                             "width": 32, "height": 32} for a in (1, 2, 3)])
        cat.edits.insert(pl.DataFrame(_edits()))
        cat.candidates.insert([
            {"candidate_id": i + 1, "edit_id": e, "candidate_index": k, "seed": 99,
             "gen_behaviour": "method", "gen_params": json.dumps({"mode": m}),
             "auto_status": st, "created_at": now(), "gen_call": i + 1}
            for i, (e, k, m, st) in enumerate([(3, 0, "free", "planned"),
                                               (3, 2, "free", "planned"),
                                               (27, 0, "region", "planned"),
                                               (27, 2, "region", "planned"),
                                               (5, 1, "free", "generated")])])
        cat.con.execute("COMMIT")
    return ws


def md5_seed(key: str, bits: int) -> int:
    """The documented seed formula (docs/generation.md), written independently of the SQL."""
    return int(hashlib.md5(key.encode()).hexdigest()[:16], 16) % 2 ** bits


def reference_plan(edits: list[dict], have: dict[int, set[int]], n: int, *, seed=0,
                   behaviour="method", mode="auto", classes=("fine",), pairs_per_call=None,
                   first: int) -> tuple[list[dict], dict[int, str]]:
    """The plan the rules give, edit by edit (the loop planning used to be): the new rows
    (in candidate_id order) and the skipped edits with their reasons."""
    per_call = dict(PER_CALL[behaviour])
    if pairs_per_call:
        per_call = {m: pairs_per_call for m in per_call}
    rows, skipped, ordinal = [], {}, {"free": 0, "region": 0}
    for e in sorted(edits, key=lambda e: e["edit_id"]):
        words = max(len(e["source_caption"].split(" ")), len(e["target_caption"].split(" ")))
        m = e["mode"] if mode == "auto" else mode
        if words > CAPTION_MAX_WORDS:
            skipped[e["edit_id"]] = f"caption over {CAPTION_MAX_WORDS} words"
            continue
        if m == "region" and (e["edit_status"] != "grounded" or e["mask_rle"] is None):
            skipped[e["edit_id"]] = "region edit without a mask (not grounded)"
            continue
        if m == "region" and classes is not None:
            cls = e["mask_class"]
            if cls is None:
                f = (masks.rle_features(e["mask_rle"], 32, 32) if e["mask_area"] is None
                     else None)
                cls = masks.classify(f.area if f else e["mask_area"],
                                     f.contours if f else e["mask_contours"])
            if cls not in classes:
                skipped[e["edit_id"]] = (f"mask class {cls} (region generation takes "
                                         f"--mask-class {','.join(classes)})")
                continue
        group = ordinal[m] // per_call[m]
        ordinal[m] += 1
        for k in range(n):
            if k in have.get(e["edit_id"], ()):
                continue
            s = (md5_seed(f"{seed}:call:{m}:{group}:{k}", 32) if behaviour != "method"
                 else md5_seed(f"{seed}:{e['edit_id']}:{k}", 63))
            rows.append({"order": (k, m == "region", group, e["edit_id"]),
                         "edit_id": e["edit_id"], "candidate_index": k, "seed": s,
                         "gen_behaviour": behaviour, "gen_params": json.dumps({"mode": m}),
                         "auto_status": "planned", "source_image": None,
                         "edited_image": None, "error": None})
    rows.sort(key=lambda r: r["order"])
    calls = {}
    for i, r in enumerate(rows):
        r["candidate_id"] = first + i
        r["gen_call"] = calls.setdefault(r.pop("order")[:3], first + i)
    return rows, skipped


def _state(cat) -> tuple[list[dict], dict[int, set[int]], int]:
    edits = cat.query("SELECT * FROM edits ORDER BY edit_id")
    have: dict[int, set[int]] = {}
    for eid, k in cat.con.execute("SELECT edit_id, candidate_index FROM candidates").fetchall():
        have.setdefault(eid, set()).add(k)
    return edits, have, cat.candidates.next_id()


def _rows(cat, first: int) -> list[dict]:
    cols = ", ".join(PLANNED)
    return cat.query(f"SELECT {cols} FROM candidates WHERE candidate_id >= ? "
                     "ORDER BY candidate_id", [first])


CASES = {   # name: (where, options); the reference takes the same options
    "defaults": (None, {"n": 2}),
    "five, small calls": (None, {"n": 5, "pairs_per_call": 3}),
    "run seed 7": ("edit_type = 'replace'", {"n": 3, "seed": 7}),
    "compat": (None, {"n": 3, "behaviour": "ultraedit-compat"}),
    "compat free": (None, {"n": 2, "behaviour": "ultraedit-compat", "mode": "free"}),
    "mode region": (None, {"n": 1, "mode": "region"}),
    "two classes": (None, {"n": 2, "mask_class": "fine,fragmented"}),
    "any class": (None, {"n": 2, "mask_class": "any"}),
    "where reads mask_class": ("mask_class IN ('fine', 'too_small') OR mode = 'free'",
                               {"n": 2}),
    "selects none": ("edit_id < 0", {"n": 3}),
}


def _case(cat, case: str):
    """A case's selection, options (those of plan_candidates) and the reference's plan
    (rows, skipped edits) over the catalog as it is."""
    where, opts = CASES[case]
    opts = dict(opts)
    n, seed = opts.pop("n"), opts.pop("seed", 0)
    edits, have, first = _state(cat)
    if where:
        picked = {r[0] for r in cat.con.execute(
            f"SELECT edit_id FROM edits_v WHERE {where}").fetchall()}
        edits = [e for e in edits if e["edit_id"] in picked]
    mask_class = opts.pop("mask_class", None)
    classes = (("fine",) if mask_class is None else
               None if mask_class == "any" else tuple(mask_class.split(",")))
    if where and "mask_class" in where:
        classes = None
    want, want_skipped = reference_plan(edits, have, n, seed=seed, classes=classes,
                                        first=first, **opts)
    return (Selection(where=where), n, seed, {**opts, "mask_class": mask_class}, first, want,
            want_skipped, len(edits))


def _counts(skipped: dict[int, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in skipped.values():
        counts[why] = counts.get(why, 0) + 1
    return counts


@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_the_rules_and_planning_again_adds_nothing(plan_ws, case):
    with plan_ws.catalog() as cat:
        sel, n, seed, opts, first, want, want_skipped, n_edits = _case(cat, case)
        rep = plan_candidates(cat, sel, n, seed, **opts)
        got = _rows(cat, first)
        assert got == want
        assert rep.planned == len(want)
        assert rep.skipped == want_skipped
        assert rep.edits == n_edits - len(want_skipped)
        assert rep.to_json() == {"planned": len(want), "edits": rep.edits,
                                 "skipped": _counts(want_skipped), "seeds": "md5-v1"}
        before = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
        again = plan_candidates(cat, sel, n, seed, **opts)
        assert again.planned == 0 and again.skipped == want_skipped
        assert cat.query("SELECT * FROM candidates ORDER BY candidate_id") == before
    if case == "defaults":
        assert {r["edit_id"] for r in want} >= {3, 5, 27}   # the gaps are filled
        assert len({r["gen_call"] for r in want}) > 2


def _plan_in_windows(cat, sel, n, seed, opts, stop: int | None = None
                     ) -> tuple[PlanReport, int]:
    """Plan through PlanWindows, a window per transaction (stop: after that many, as a
    killed job does); the report and the windows planned."""
    from ultracurate.runner import Access
    w = Access(cat, GenerateStage, writable=True)
    windows = PlanWindows(w, PlanRules.of(w, sel, n, seed, **opts), sel)
    steps = 0
    while not windows.done and steps != stop:
        with cat.transaction():
            windows.step(w)
        steps += 1
    return windows.report, steps


def _calls(rows: list[dict]) -> set[frozenset]:
    """The calls of planned rows, each the set of its (edit, candidate index)."""
    calls: dict[int, set] = {}
    for r in rows:
        calls.setdefault(r["gen_call"], set()).add((r["edit_id"], r["candidate_index"]))
    return {frozenset(c) for c in calls.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_plan_in_windows_of_edits_has_the_calls_and_seeds_of_a_plan_in_one_go(
        plan_ws, case, monkeypatch):
    """Planned two edit ids at a time, then four (so a call of 16, 7, 6 or 3 edits spans
    several windows and waits for the last of them), stopped after three windows and
    planned again from the start, the plan has the rows, calls and seeds the rules give a
    plan in one go: each call planned whole (its candidate ids contiguous, gen_call the
    first), only the ids differ. Planning again adds nothing."""
    monkeypatch.setattr(PlanWindows, "FIRST", 2)
    monkeypatch.setattr(PlanWindows, "MAX", 4)
    with plan_ws.catalog() as cat:
        sel, n, seed, opts, first, want, want_skipped, n_edits = _case(cat, case)
        stopped, _ = _plan_in_windows(cat, sel, n, seed, opts, stop=3)
        rep, steps = _plan_in_windows(cat, sel, n, seed, opts)
        assert steps >= 10
        got = _rows(cat, first)
        ids = {"candidate_id", "gen_call"}
        by_key = lambda rows: {(r["edit_id"], r["candidate_index"]):  # noqa: E731
                               {k: v for k, v in r.items() if k not in ids} for r in rows}
        assert by_key(got) == by_key(want)
        assert _calls(got) == _calls(want)
        for call in {r["gen_call"] for r in got}:
            members = sorted(r["candidate_id"] for r in got if r["gen_call"] == call)
            assert members == list(range(call, call + len(members)))
        assert stopped.planned + rep.planned == len(want)
        assert rep.to_json() == {"planned": rep.planned, "edits": n_edits - len(want_skipped),
                                 "skipped": _counts(want_skipped), "seeds": "md5-v1"}
        before = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
        again, _ = _plan_in_windows(cat, sel, n, seed, opts)
        assert again.planned == 0
        assert cat.query("SELECT * FROM candidates ORDER BY candidate_id") == before


def test_replanning_more_adds_the_new_indices_with_the_seeds_a_fresh_plan_gives(plan_ws):
    """A resumed plan (2, then 4 candidates) keeps the rows it had and adds rows whose seeds
    are those a plan of 4 at once gives: a seed depends on (run seed, edit, index) only."""
    sel = Selection(where="mode = 'free'")
    with plan_ws.catalog() as cat:
        old = {r["candidate_id"]: r for r in cat.query("SELECT * FROM candidates")}
        plan_candidates(cat, sel, 2)
        kept = {r["candidate_id"]: r for r in cat.query("SELECT * FROM candidates")}
        edits, have, first = _state(cat)
        want, _ = reference_plan([e for e in edits if e["mode"] == "free"], have, 4,
                                 first=first)
        assert plan_candidates(cat, sel, 4).planned == len(want) > 0
        assert _rows(cat, first) == want
        now_rows = {r["candidate_id"]: r for r in cat.query("SELECT * FROM candidates")}
        assert all(now_rows[c] == r for c, r in kept.items())      # nothing rewritten
        assert all(now_rows[c]["seed"] == 99 for c in old)         # stored seeds kept
        seeds = {(r["edit_id"], r["candidate_index"]): r["seed"] for r in now_rows.values()
                 if r["candidate_id"] not in old}
        assert all(s == md5_seed(f"0:{e}:{k}", 63) for (e, k), s in seeds.items())


def test_compat_region_at_another_size_is_refused_before_anything_is_written(plan_ws):
    from ultracurate.runner import Access
    from ultracurate.selection import selected_keys_sql
    from ultracurate.stages.generate import GenerateStage, plan_sql
    with plan_ws.catalog() as cat:
        before = cat.candidates.count()
        sel = Selection(where="mode = 'region'")
        sql, params = selected_keys_sql(cat.con, "edits_v", "edit_id", sel, None, "edit_id")
        with pytest.raises(UltracurateError, match="native size, 64 px .* not --size 128"):
            with cat.transaction():
                plan_sql(Access(cat, GenerateStage, writable=True), sel, sql, params, 2,
                         behaviour="ultraedit-compat", size=128, native_size=64)
        assert cat.candidates.count() == before
        with cat.transaction():      # free-form compat plans at any size
            rep = plan_sql(Access(cat, GenerateStage, writable=True), sel, sql, params, 1,
                           behaviour="ultraedit-compat", mode="free", size=128,
                           native_size=64)
        assert rep.planned > 0
