"""`generate` over the catalog: planning, rendering, resumption after SIGKILL, the CLI, and the
Ray engine, with the tiny editor on the demo's real photos."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ultracurate import masks
from ultracurate.catalog import now
from ultracurate.errors import UltracurateError
from ultracurate.models import make_tiny
from ultracurate.selection import Selection
from ultracurate.stages.generate import plan_candidates
from ultracurate.runner import run


def add_edits(ws) -> dict[str, int]:
    """Edits on the demo anchors: two free-form, one grounded region edit (with a mask), one
    region edit without a mask, one with an over-long caption. Returns name -> edit_id."""
    make_tiny(ws.section("models")["tiny_dir"], ("editor",))
    with ws.catalog() as cat:
        an = cat.query("SELECT anchor_id, captions, width, height FROM anchors_v "
                       "ORDER BY anchor_id")
        m = np.zeros((an[2]["height"], an[2]["width"]), bool)
        m[an[2]["height"] // 4: an[2]["height"] * 3 // 4, an[2]["width"] // 3:] = True
        long = " ".join(["word"] * 61)
        spec = [("free_a", an[0], "free", "proposed", None, "replace"),
                ("free_b", an[1], "free", "proposed", None, "add"),
                ("region", an[2], "region", "grounded", masks.encode(m), "replace"),
                ("ungrounded", an[3], "region", "no_region", None, "replace"),
                ("long", an[0], "free", "proposed", None, "replace")]
        rows, ids = [], {}
        for i, (name, a, mode, status, rle, etype) in enumerate(spec):
            ids[name] = i + 1
            cap = a["captions"][0]
            rows.append({"edit_id": i + 1, "anchor_id": a["anchor_id"], "source_caption": cap,
                         "instruction": "make it snowy",
                         "target_caption": (cap + " in the snow") if name != "long" else long,
                         "edit_object": "NONE", "edit_type": etype, "mode": mode,
                         "edit_status": status, "mask_rle": rle,
                         "mask_height": a["height"] if rle else None,
                         "mask_width": a["width"] if rle else None, "created_at": now()})
        cat.edits.insert(pl.DataFrame(rows))
    return ids


@pytest.fixture
def edits_ws(ingested_ws):
    return ingested_ws, add_edits(ingested_ws)


def candidates(ws) -> list[dict]:
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT * FROM candidates ORDER BY candidate_id")


def test_generate_plans_renders_and_resumes(edits_ws):
    ws, ids = edits_ws
    out = run(ws, "generate", Selection(where="edit_type = 'replace'"), candidates=2, size=64,
                       progress=False)
    plan = out.extra["plan"]
    assert plan["planned"] == 4 and plan["edits"] == 2
    assert plan["skipped"] == {"region edit without a mask (not grounded)": 1,
                               "caption over 60 words": 1}
    assert out.rows_done == 4 and out.rows_failed == 0
    rows = candidates(ws)
    assert {(r["edit_id"], r["candidate_index"]) for r in rows} == {
        (ids["free_a"], 0), (ids["free_a"], 1), (ids["region"], 0), (ids["region"], 1)}
    for r in rows:
        assert r["auto_status"] == "generated" and r["gen_behaviour"] == "method"
        assert r["source_is_anchor"] is False and r["gen_run"] == out.run_id
        for name in (r["source_image"], r["edited_image"]):
            im = Image.open(ws.media.path(name))
            assert im.format == "JPEG" and im.size == (64, 64)
        gp = json.loads(r["gen_params"])
        assert gp["behaviour"] == "method" and gp["size"] == 64
        if r["edit_id"] == ids["region"]:
            assert gp["mode"] == "region" and gp["total_steps"] in (10, 14)
            assert gp["mask"]["variant"] == "ultraedit"
        else:
            assert gp["mode"] == "free" and gp["total_steps"] in (3, 5, 8)
            assert 0.1 <= gp["self_replace_frac"] <= 0.9
    assert len({r["seed"] for r in rows}) == 4
    first = {r["candidate_id"]: (r["seed"], r["edited_image"]) for r in rows}

    # Rerun: nothing new to plan or render. Three candidates: only index 2 is added.
    again = run(ws, "generate", Selection(where="edit_type = 'replace'"), candidates=2, size=64,
                         progress=False)
    assert again.extra["plan"]["planned"] == 0 and again.rows_in == 0
    more = run(ws, "generate", Selection(where="edit_type = 'replace'"), candidates=3, size=64,
                        progress=False)
    assert more.extra["plan"]["planned"] == 2 and more.rows_done == 2
    rows = candidates(ws)
    assert len(rows) == 6
    assert {r["candidate_id"]: (r["seed"], r["edited_image"]) for r in rows
            if r["candidate_id"] in first} == first

    # A planned row is rendered again from its seed, in its call, to the same bytes.
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET auto_status = 'planned' WHERE candidate_id = 1")
    redo = run(ws, "generate", Selection(where="edit_type = 'replace'"), candidates=3, size=64,
                        progress=False, force=True)
    assert redo.rows_in == 6
    redone = {r["candidate_id"]: r["edited_image"] for r in candidates(ws)}[1]
    assert redone == first[1][1]


def test_the_bar_moves_per_diffusion_step(edits_ws, monkeypatch):
    """A generate batch reports each denoising step of each call to the runner's bar: the bar
    moves as many times as the calls have steps, forward only, within the batch, before the
    batch commits, and ends at the batch's rows."""
    from ultracurate.progress import JobBar
    ws, ids = edits_ws
    seen = []
    original = JobBar.__call__

    def spy(self, rows_in_batch):
        seen.append((self.committed, rows_in_batch))
        original(self, rows_in_batch)
    monkeypatch.setattr(JobBar, "__call__", spy)
    out = run(ws, "generate", Selection(where="edit_type = 'replace'"), candidates=2, size=64,
              progress=True)
    assert out.rows_done == 4
    rows = candidates(ws)
    calls = {}
    for r in rows:   # one pair per call here: a call's steps are its candidate's
        calls[r["gen_call"]] = max(calls.get(r["gen_call"], 0),
                                   json.loads(r["gen_params"])["real_steps"])
    assert len(seen) == sum(calls.values()) > len(calls)
    assert {c for c, _ in seen} == {0}                       # all before the batch committed
    done = [x for _, x in seen]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == 4


def test_compat_plans_one_seed_per_released_call_and_keeps_the_anchor(edits_ws):
    ws, ids = edits_ws
    out = run(ws, "generate", Selection(where="mode = 'free'"), candidates=2, size=64,
                       behaviour="ultraedit-compat", keep_anchor_source=True, progress=False)
    assert out.rows_done == 4
    rows = candidates(ws)
    by_index = {}
    for r in rows:
        by_index.setdefault(r["candidate_index"], set()).add(r["seed"])
        assert r["gen_behaviour"] == "ultraedit-compat" and r["source_is_anchor"] is True
        assert r["seed"] < 2 ** 32
        assert json.loads(r["gen_params"])["source_is_anchor"] is True
    assert all(len(s) == 1 for s in by_index.values())  # the edits share one call per index
    assert by_index[0] != by_index[1]
    sources = {r["source_image"] for r in rows if r["edit_id"] == ids["free_a"]}
    assert len(sources) == 1  # the real anchor photo, the same for every candidate


def test_plan_is_idempotent_and_checks_its_arguments(edits_ws):
    ws, ids = edits_ws
    with ws.catalog() as cat:
        free_a = Selection(where="edit_id = $e", params={"e": ids["free_a"]})
        assert plan_candidates(cat, free_a, 3, 0).planned == 3
        assert plan_candidates(cat, free_a, 3, 0).planned == 0
        assert plan_candidates(cat, free_a, 5, 0).planned == 2
        with pytest.raises(UltracurateError, match="unknown --mode"):
            plan_candidates(cat, free_a, 5, 0, mode="both")
        with pytest.raises(UltracurateError, match="behaviour"):
            plan_candidates(cat, free_a, 5, 0, behaviour="fast")
        # --mode free renders a region edit free-form (its mask is not needed)
        ungrounded = Selection(where="edit_id = $e", params={"e": ids["ungrounded"]})
        rep = plan_candidates(cat, ungrounded, 1, 0, mode="free")
        assert rep.planned == 1 and not rep.skipped
        assert cat.scalar("SELECT count(*) FROM candidates") == 6


def test_cli_generate(edits_ws, monkeypatch, capsys):
    from ultracurate.cli import main
    ws, ids = edits_ws
    try:
        main(["generate", "-w", str(ws.root), "--where", "edit_id = :e", "-p", "e",
              str(ids["free_b"]), "--candidates", "1", "--size", "64", "--json"])
    except SystemExit as e:
        assert e.code in (0, None)
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["planned"] == 1 and data["rows_done"] == 1
    assert [r["edit_id"] for r in candidates(ws)] == [ids["free_b"]]
    with pytest.raises(SystemExit) as e:
        main(["generate", "-w", str(ws.root), "--size", "60"])
    assert e.value.code == 1
    assert "--size must be a multiple of 8" in capsys.readouterr().err


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from ultracurate.runner import run
    from ultracurate.selection import Selection
    from ultracurate.workspace import Workspace
    run(Workspace(sys.argv[1]), "generate", Selection(where="edit_id IN (1, 2, 3)"),
        candidates=4, size=64, batch_size=1, progress=False)
""")


def test_sigkill_then_rerun_finishes_without_loss_or_duplicates(edits_ws, tmp_path):
    ws, ids = edits_ws
    script = tmp_path / "gen.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jpgs = lambda: len(list((ws.root / "media").rglob("*.jpg")))  # noqa: E731
    before = jpgs()  # the anchors
    deadline = time.time() + 240
    # the first call (edits 1 and 2, index 0) writes 4 images, commits, then the next writes
    while jpgs() < before + 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = candidates(ws)
    done_before = [r for r in rows if r["auto_status"] == "generated"]
    assert len(rows) == 12 and 0 < len(done_before) < 12

    out = run(ws, "generate", Selection(where="edit_id IN (1, 2, 3)"), candidates=4, size=64,
                       progress=False)
    assert out.extra["plan"]["planned"] == 0 and out.rows_in == 12 - len(done_before)
    rows = candidates(ws)
    assert len(rows) == 12
    assert len({(r["edit_id"], r["candidate_index"]) for r in rows}) == 12
    assert all(r["auto_status"] == "generated" for r in rows)
    assert all(ws.media.path(r[c]).exists() for r in rows
               for c in ("source_image", "edited_image"))
    assert not list((ws.root / "media" / "tmp").glob("*"))
    with ws.catalog(read_only=True) as cat:
        states = cat.query("SELECT state, count(*) n FROM stage_state WHERE stage = "
                           "'generate' GROUP BY state")
    assert states == [{"state": "done", "n": 12}]


def test_ray_engine(edits_ws):
    ray = pytest.importorskip("ray")
    ws, ids = edits_ws
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run(ws, "generate", Selection(where="edit_id IN (1, 3)"), candidates=2, size=64,
                           engine="ray", batch_size=2, progress=False)
    finally:
        ray.shutdown()
    assert out.rows_done == 4 and out.rows_failed == 0
    rows = candidates(ws)
    assert all(r["auto_status"] == "generated" for r in rows)
    assert all(ws.media.path(r["edited_image"]).exists() for r in rows)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT engine FROM runs WHERE run_id = ?", [out.run_id]) == "ray"


# -- a candidate's pixels do not depend on the runner's batches --------------------------------
BATCH_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from ultracurate.runner import run
    from ultracurate.selection import Selection
    from ultracurate.workspace import Workspace
    run(Workspace(sys.argv[1]), "generate", Selection(where="edit_id IN (1, 2, 3)"),
        candidates=4, size=64, batch_size=1, behaviour=sys.argv[2], progress=False)
""")


def _images(ws) -> dict:
    return {(r["edit_id"], r["candidate_index"]): (r["source_image"], r["edited_image"])
            for r in candidates(ws)}


@pytest.mark.parametrize("behaviour", ["ultraedit-compat", "method"])
def test_pixels_do_not_depend_on_batch_size_or_a_kill(edits_ws, tmp_path, behaviour):
    """The same seeds give byte-identical images whether the run was killed (SIGKILL) and
    resumed, or rendered at --batch-size 1, 7, 16 or 64: the runner never splits a generator
    call (gen_call), and a call's composition is fixed when it is planned. Edits 1 and 2
    (free-form) share a call per candidate index; edit 3 (region) has its own."""
    ws, ids = edits_ws
    script = tmp_path / "gen.py"
    script.write_text(BATCH_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root), behaviour], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jpgs = lambda: len(list((ws.root / "media").rglob("*.jpg")))  # noqa: E731
    before = jpgs()
    deadline = time.time() + 240
    while jpgs() < before + 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [r for r in candidates(ws) if r["auto_status"] == "generated"]
    assert 0 < len(done) < 12
    calls = {}
    for r in candidates(ws):
        calls.setdefault(r["gen_call"], set()).add(r["auto_status"])
    assert all(len(states) == 1 for states in calls.values())   # no call half done

    sel = Selection(where="edit_id IN (1, 2, 3)")
    run(ws, "generate", sel, candidates=4, size=64, batch_size=64, behaviour=behaviour,
                 progress=False)
    resumed = _images(ws)
    assert len(resumed) == 12 and all(None not in v for v in resumed.values())
    rows = candidates(ws)
    assert {r["edit_id"]: json.loads(r["gen_params"])["call_pairs"] for r in rows} == {
        ids["free_a"]: 2, ids["free_b"]: 2, ids["region"]: 1}
    for size in (1, 7, 16):
        run(ws, "generate", sel, candidates=4, size=64, batch_size=size, behaviour=behaviour,
                     force=True, progress=False)
        assert _images(ws) == resumed, f"--batch-size {size}"


def test_compat_call_with_a_long_caption_is_dropped_with_its_reason(edits_ws):
    """Captions over 77 tokens (within 60 words) make the released call fail and its driver
    drop the whole call: those rows are marked failed with the reason, other calls render,
    and a rerun does not try them again."""
    ws, ids = edits_ws
    long = " ".join(["photosynthesizing"] * 30)   # 30 words, 92 tokens
    with ws.catalog() as cat:
        cat.con.execute("UPDATE edits SET target_caption = ? WHERE edit_id = ?",
                        [long, ids["free_b"]])
    out = run(ws, "generate", Selection(where="edit_id IN (1, 2, 3)"), candidates=1, size=64,
                       behaviour="ultraedit-compat", progress=False)
    assert out.rows_failed == 2 and out.rows_done == 1
    rows = {r["edit_id"]: r for r in candidates(ws)}
    for e in (ids["free_a"], ids["free_b"]):        # one released call: both dropped
        assert rows[e]["auto_status"] == "failed" and rows[e]["edited_image"] is None
        assert rows[e]["error"].startswith("dropped: prompt 3 of the released call has 92")
    assert rows[ids["region"]]["auto_status"] == "generated"
    again = run(ws, "generate", Selection(where="edit_id IN (1, 2, 3)"), candidates=1, size=64,
                         behaviour="ultraedit-compat", progress=False)
    assert again.rows_in == 0


def test_compat_region_needs_the_editors_native_size(edits_ws):
    """The released inpaint pipeline works at unet.sample_size * 8 (64 px for the tiny
    editor, 512 for SDXL-Turbo): compat region generation at another size is refused before
    anything is planned; free-form compat and method run at any size."""
    ws, ids = edits_ws
    sel = Selection(where="edit_id = :e", params={"e": ids["region"]})
    with pytest.raises(UltracurateError, match="native size, 64 px .* not --size 128"):
        run(ws, "generate", sel, candidates=1, size=128, behaviour="ultraedit-compat",
                     progress=False)
    assert candidates(ws) == []
    out = run(ws, "generate", sel, candidates=1, size=128, progress=False)
    assert out.rows_done == 1


CLASSES = ("fine", "fragmented", "too_small", "too_large")


def _set_mask_classes(ws, ids) -> dict[str, int]:
    """The grounded region edit is 'fine'; three copies of it carry the other classes."""
    with ws.catalog() as cat:
        cat.con.execute("UPDATE edits SET mask_class = 'fine' WHERE edit_id = ?",
                        [ids["region"]])
        for k, cls in enumerate(CLASSES[1:]):
            cat.con.execute("INSERT INTO edits SELECT * REPLACE (? AS edit_id, ? AS "
                            "mask_class) FROM edits WHERE edit_id = ?",
                            [100 + k, cls, ids["region"]])
    return {"fine": ids["region"], **{c: 100 + k for k, c in enumerate(CLASSES[1:])}}


@pytest.mark.parametrize("mask_class,where,selected,planned", [
    (None, None, CLASSES, {"fine"}),
    ("fine,fragmented", None, CLASSES, {"fine", "fragmented"}),
    ("any", None, CLASSES, set(CLASSES)),
    (None, "mask_class IN ('fragmented', 'too_small')", {"fragmented", "too_small"},
     {"fragmented", "too_small"}),                     # a --where on mask_class decides
    ("fine", "mask_class <> 'too_large'", {"fine", "fragmented", "too_small"}, {"fine"}),
])
def test_region_generation_takes_fine_masks_unless_asked(edits_ws, mask_class, where,
                                                         selected, planned):
    ws, ids = edits_ws
    by_class = _set_mask_classes(ws, ids)
    region = "mode = 'region' AND edit_status = 'grounded'"
    sel = Selection(where=f"{region} AND ({where})" if where else region)
    with ws.catalog() as cat:
        rep = plan_candidates(cat, sel, 1, 0, mask_class=mask_class)
        got = {r[0] for r in cat.con.execute("SELECT edit_id FROM candidates").fetchall()}
    assert got == {by_class[c] for c in planned}
    assert set(rep.skipped) == {by_class[c] for c in set(selected) - planned}
    for eid, why in rep.skipped.items():
        cls = next(c for c, e in by_class.items() if e == eid)
        assert why == (f"mask class {cls} (region generation takes --mask-class "
                       f"{mask_class or 'fine'})")


def test_cli_mask_class_is_checked(edits_ws, capsys):
    from ultracurate.cli import main
    ws, _ = edits_ws
    with pytest.raises(SystemExit) as e:
        main(["generate", "-w", str(ws.root), "--mask-class", "fine,blobby", "--size", "64"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "unknown --mask-class 'fine,blobby'" in err and "Traceback" not in err
    assert candidates(ws) == []


def test_a_job_plans_a_window_of_edits_at_a_time_and_renders_every_call_whole(edits_ws,
                                                                            monkeypatch):
    """Planned one edit id at a time with calls of two pairs: edits 1 and 2 share a call
    (planned with window 2), region edit 3's call waits for the last window, planned while
    the first batches render. Every candidate renders once, in its call; the run records
    the whole plan and its total."""
    from ultracurate.stages.generate import PlanWindows
    monkeypatch.setattr(PlanWindows, "FIRST", 1)
    monkeypatch.setattr(PlanWindows, "MAX", 1)
    threads = []
    step = PlanWindows.step

    def recorded(self, w):
        threads.append(threading.current_thread().name)
        return step(self, w)
    monkeypatch.setattr(PlanWindows, "step", recorded)
    ws, ids = edits_ws
    out = run(ws, "generate", Selection(where="edit_id <= 3"), candidates=2, size=64,
              pairs_per_call=2, batch_size=2, progress=False)
    assert len(threads) == 5 and "uc-pending" in threads[2:]   # 1-2 before the first batch
    assert out.rows_in == out.rows_done == 6 and out.rows_failed == 0
    rows = candidates(ws)
    assert all(r["auto_status"] == "generated" for r in rows) and len(rows) == 6
    calls: dict[int, set] = {}
    for r in rows:
        calls.setdefault(r["gen_call"], set()).add(r["edit_id"])
        assert json.loads(r["gen_params"])["call_pairs"] == len(
            [x for x in rows if x["gen_call"] == r["gen_call"]])
    assert sorted(map(sorted, calls.values())) == [[1, 2], [1, 2], [3], [3]]
    with ws.catalog(read_only=True) as cat:
        params = json.loads(cat.scalar("SELECT params FROM runs WHERE run_id = ?",
                                       [out.run_id]))
        rows_in = cat.scalar("SELECT rows_in FROM runs WHERE run_id = ?", [out.run_id])
    assert params["plan"] == {"planned": 6, "edits": 3, "skipped": {}, "seeds": "md5-v1"}
    assert rows_in == 6
