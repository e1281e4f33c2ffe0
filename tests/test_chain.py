"""Multi-turn edit chains on the demo photos with tiny models: sessions and their lineage in
the catalog and in --where, resumption after a SIGKILL and after a failing stage, the end of a
session, the export in MagicBrush's layout that `eval --benchmark magicbrush` reads, and the
review App's session groups and judge view."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultracurate.cli import main
from ultracurate.errors import UltracurateError
from ultracurate.recipe import load_recipe
from ultracurate.selection import Selection
from ultracurate.runner import run
from ultracurate.thresholds import Thresholds
from ultracurate.workspace import Workspace

PHOTOS = ("astronaut", "chelsea", "coffee")
# the demo's loose keep rule (tiny random models' scores mean nothing): its recipe's filter step
DEMO_THRESHOLDS = next(s.options for s in load_recipe("quick").steps if s.stage == "filter")
CHAIN = dict(candidates=3, ground={"box_threshold": 0.0, "text_threshold": 0.0},
             generate={"size": 64}, progress=False)
CLI = ["--candidates", "3", "--size", "64", "--box-threshold", "0", "--text-threshold", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, demo_photos, tiny_dir):
    """A workspace (copied by each test) where three demo photos went through instruct (one
    edit each), ground, classify-masks, generate (3 candidates at 64 px), score and the demo's
    loose filter: each edit has accepted candidates to start a session from."""
    from ultracurate.models import make_tiny
    from ultracurate.stages.ingest import discover
    make_tiny(tiny_dir, ("editor", "clip", "dino", "grounding", "sam", "judge"))
    root = tmp_path_factory.mktemp("chain") / "ws"
    ws = Workspace.init(root, {"models": {"profile": "tiny", "tiny_dir": str(tiny_dir)}})
    run(ws, "ingest", items=discover([demo_photos]), progress=False)
    photos = Selection(where="list_contains($p, external_id)", params={"p": list(PHOTOS)})
    run(ws, "instruct", photos, per_anchor=1, backend="rule", progress=False)
    run(ws, "ground", box_threshold=0.0, text_threshold=0.0, progress=False)
    run(ws, "classify-masks", progress=False)
    run(ws, "generate", candidates=3, size=64, progress=False)
    run(ws, "score", progress=False)
    run(ws, "filter", thresholds=Thresholds.preset("ultraedit").override(**DEMO_THRESHOLDS))
    return root


def _copy(base: Path, tmp_path: Path, name: str = "ws") -> Workspace:
    shutil.copytree(base, tmp_path / name)
    return Workspace(tmp_path / name)


@pytest.fixture(scope="module")
def chained(base, tmp_path_factory):
    """`base` after an uninterrupted 3-turn chain (copied by the tests that change it): the
    workspace's folder and what the chain made."""
    ws = _copy(base, tmp_path_factory.mktemp("chained"))
    result = run(ws, "chain", turns=3, **CHAIN).result
    return ws.root, result, _state(ws)


def _state(ws) -> dict:
    """What a chain made, comparable between workspaces."""
    with ws.catalog(read_only=True) as cat:
        return {
            "sessions": cat.query("SELECT session_id, root_candidate_id, n_turns, ended_turn, "
                                  "end_reason, turn_candidates, turn_instructions "
                                  "FROM sessions_v ORDER BY session_id"),
            "anchors": cat.query("SELECT anchor_id, media, parent_candidate_id, session_id, "
                                 "turn, captions FROM anchors_v WHERE session_id IS NOT NULL "
                                 "ORDER BY anchor_id"),
            "candidates": cat.query("SELECT candidate_id, edit_id, edited_image, status, "
                                    "clip_sim_dir FROM candidates_v ORDER BY candidate_id")}


def _check_lineage(ws, per_anchor: int = 1) -> dict:
    """Every session's turns are 1..n, each an accepted candidate on its turn's anchor, that
    anchor the previous turn's edited image with its target caption; returns sessions_v rows
    by id."""
    with ws.catalog(read_only=True) as cat:
        sessions = {r["session_id"]: r for r in cat.query("SELECT * FROM sessions_v")}
        turns = cat.query("SELECT session_id, turn, candidate_id, anchor_id, anchor_session_id, "
                          "anchor_turn, parent_candidate_id, status, edited_image, "
                          "target_caption FROM candidates_v WHERE session_id IS NOT NULL "
                          "ORDER BY session_id, turn")
        anchors = {r["anchor_id"]: r for r in cat.query(
            "SELECT a.*, (SELECT count(*) FROM edits e WHERE e.anchor_id = a.anchor_id) AS "
            "edits FROM anchors_v a")}
    by_session: dict[int, list[dict]] = {}
    for t in turns:
        by_session.setdefault(t["session_id"], []).append(t)
    for sid, ts in by_session.items():
        assert [t["turn"] for t in ts] == list(range(1, len(ts) + 1))
        assert [t["candidate_id"] for t in ts] == sessions[sid]["turn_candidates"]
        assert ts[0]["candidate_id"] == sessions[sid]["root_candidate_id"]
        assert ts[0]["anchor_session_id"] is None  # turn 1 edits a photo
        for prev, t in zip(ts, ts[1:]):
            a = anchors[t["anchor_id"]]
            assert t["status"] == "accepted"
            assert (t["anchor_session_id"], t["anchor_turn"], t["parent_candidate_id"]) == \
                (sid, t["turn"], prev["candidate_id"])
            assert a["media"] == prev["edited_image"]
            assert (a["captions"], a["caption_sources"]) == ([prev["target_caption"]],
                                                             ["chain"])
            assert a["edits"] == per_anchor and a["dataset"] == "chain"
    return sessions


def test_three_turn_chain_end_to_end(chained, tmp_path, capsys):
    ws = _copy(chained[0], tmp_path)
    res = chained[1]
    sessions = _check_lineage(ws)
    # one session per edit on a photo, from its best accepted candidate
    assert res.roots == res.sessions == res.new_sessions == len(PHOTOS) == len(sessions)
    assert max(s["n_turns"] for s in sessions.values()) == 3
    assert res.by_length == {k: sum(1 for s in sessions.values() if s["n_turns"] == k)
                             for k in {s["n_turns"] for s in sessions.values()}}
    for s in sessions.values():
        assert (s["session_state"] == "ended") == (s["n_turns"] < 3)
    # sessions are first-class in --where: sessions_v, and session_id / turn on candidates_v
    main(["select", "-w", str(ws.root), "--from", "sessions", "--where", "n_turns = :n",
          "-p", "n", "3", "--json"])
    three = json.loads(capsys.readouterr().out)
    assert {r["session_id"] for r in three} == {k for k, s in sessions.items()
                                                if s["n_turns"] == 3}
    sid = three[0]["session_id"]
    main(["select", "-w", str(ws.root), "--where", "session_id = :s AND turn >= 2", "-p", "s",
          str(sid), "--columns", "candidate_id,turn", "--json"])
    assert [r["candidate_id"] for r in json.loads(capsys.readouterr().out)] == \
        sessions[sid]["turn_candidates"][1:]
    main(["stats", "-w", str(ws.root), "--json"])
    assert sum(json.loads(capsys.readouterr().out)["sessions"].values()) == len(sessions)

    # a rerun makes nothing new; a larger --turns extends the open sessions
    before = _state(ws)
    again = run(ws, "chain", turns=3, **CHAIN).result
    assert _state(ws) == before and again.new_sessions == 0
    assert all(t.sessions == 0 for t in again.turns)
    longer = run(ws, "chain", turns=4, **CHAIN).result
    assert longer.turns[-1].turn == 4
    assert longer.turns[-1].sessions == sum(1 for s in sessions.values()
                                            if s["session_state"] == "open")
    _check_lineage(ws)


def test_a_turn_with_nothing_accepted_ends_its_session(base, tmp_path):
    ws = _copy(base, tmp_path)
    never = Thresholds.preset("ultraedit").override(**DEMO_THRESHOLDS).override(
        clip_sim_dir_min=0.99)
    res = run(ws, "chain", turns=3, thresholds=never, **CHAIN).result
    assert [(t.turn, t.sessions, t.continued, t.ended) for t in res.turns] == \
        [(2, 3, 0, 3), (3, 0, 0, 0)]
    with ws.catalog(read_only=True) as cat:
        ended = cat.query("SELECT n_turns, ended_turn, end_reason, session_state FROM "
                          "sessions_v ORDER BY session_id")
    assert all(e["n_turns"] == 1 and e["ended_turn"] == 2 and e["session_state"] == "ended"
               and e["end_reason"] == "turn 2: no accepted candidate (3 candidates of 1 edit)"
               for e in ended)


def test_chain_resumes_after_a_failing_stage(base, chained, tmp_path):
    ws = _copy(base, tmp_path)
    good = dict(ws.section("models"))
    ws.set_config("models", {**good, "clip": str(tmp_path / "no-such-clip")})
    with pytest.raises(UltracurateError):
        run(ws, "chain", turns=3, **CHAIN)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT state FROM runs WHERE stage = 'chain'") == "failed"
        # turn 2 stopped before score: nothing decided, nothing ended
        assert cat.scalar("SELECT count(*) FROM session_turns WHERE turn = 2") == 0
        assert cat.scalar("SELECT count(*) FROM sessions WHERE ended_turn IS NOT NULL") == 0
        assert cat.scalar("SELECT count(*) FROM candidates_v WHERE anchor_turn = 2 AND "
                          "auto_status = 'generated'") == 9
    ws.config["models"] = good  # the clip role back to the profile's
    ws.set_config("models", {})
    ws = Workspace(ws.root)
    res = run(ws, "chain", turns=3, **CHAIN).result
    assert res.turns[0].anchors_made == 0  # the anchors of the first try are used
    _check_lineage(ws)
    assert _state(ws) == chained[2]


@pytest.mark.slow
def test_chain_resumes_after_sigkill(base, chained, tmp_path):
    """A `chain` process killed (SIGKILL) during turn 2 and rerun ends where an uninterrupted
    run ends: the same sessions, anchors and candidates, nothing twice."""
    ws = _copy(base, tmp_path)
    cmd = [sys.executable, "-m", "ultracurate.cli", "chain", "-w", str(ws.root), "--turns", "3",
           *CLI]
    env = dict(os.environ, ULTRACURATE_PROGRESS="0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("== chain: turn 2: generate"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    with ws.catalog(read_only=True) as cat:  # killed in the middle of turn 2
        assert cat.scalar("SELECT count(*) FROM anchors WHERE turn = 2") == 3
        assert cat.scalar("SELECT count(*) FROM edits_v WHERE anchor_turn = 2") == 3
        assert cat.scalar("SELECT count(*) FROM session_turns WHERE turn = 2") == 0
    main(cmd[3:])  # the same command again
    assert _state(ws) == chained[2]
    _check_lineage(ws)
    with ws.catalog(read_only=True) as cat:
        runs = cat.query("SELECT stage, state FROM runs WHERE stage = 'chain' ORDER BY run_id")
        # the rerun's turn-2 instruct found its anchors done
        redo = cat.scalar("SELECT rows_in FROM runs WHERE stage = 'instruct' ORDER BY run_id "
                          "DESC LIMIT 1 OFFSET 1")
    assert [r["state"] for r in runs] == ["killed", "completed"]
    assert redo == 0


def test_sessions_export_in_magicbrush_layout_and_eval_reads_it(chained, tmp_path, tiny_dir,
                                                                 capsys):
    from ultracurate.export import export_dataset
    ws = _copy(chained[0], tmp_path)
    sessions = _check_lineage(ws)
    out = tmp_path / "out"
    s = export_dataset(ws, Selection("session_id IS NOT NULL AND status = 'accepted'"), out,
                       fmt="jsonl", sessions=True, extra_columns=True, progress=False)
    lengths = [v["n_turns"] for v in sessions.values()]
    assert s.sessions == {k: lengths.count(k) for k in sorted(set(lengths))}
    assert s.rows == sum(lengths)  # flat rows: every turn
    mb = out / "sessions"
    edit_sessions = json.loads((mb / "edit_sessions.json").read_text())
    captions = json.loads((mb / "global_descriptions.json").read_text())
    assert set(edit_sessions) == {str(k) for k in sessions}
    with ws.catalog(read_only=True) as cat:
        media = {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, source_image, edited_image, source_caption, target_caption "
            "FROM candidates_v WHERE session_id IS NOT NULL")}
    for sid, steps in edit_sessions.items():
        session = sessions[int(sid)]
        assert [st["instruction"] for st in steps] == session["turn_instructions"]
        assert steps[0]["input"] == f"{sid}-input.png"
        for i, st in enumerate(steps, 1):
            # each turn's input is the previous turn's output, as in MagicBrush's sessions
            assert st["output"] == f"{sid}-output{i}.png" and st["mask"] == f"{sid}-mask{i}.png"
            if i > 1:
                assert st["input"] == steps[i - 2]["output"]
            row = media[session["turn_candidates"][i - 1]]
            got = np.asarray(Image.open(mb / "images" / sid / st["output"]))
            want = np.asarray(Image.open(ws.media.path(row["edited_image"])).convert("RGB"))
            assert np.array_equal(got, want)
            mask = Image.open(mb / "images" / sid / st["mask"])
            assert mask.mode == "L" and mask.size == (64, 64)
            assert captions[sid][st["output"]] == row["target_caption"]
        first = media[session["turn_candidates"][0]]
        assert captions[sid][f"{sid}-input.png"] == first["source_caption"]
    flat = [json.loads(line) for line in (out / "train-00000-of-00001.jsonl").open()]
    assert {(r["session_id"], r["turn"]) for r in flat} == {
        (k, t) for k, v in sessions.items() for t in range(1, v["n_turns"] + 1)}

    # a model that returns its input (the copy-input baseline), in MagicBrush's naming; eval
    # reads the export as its references
    pred = tmp_path / "pred"
    want_multi = []
    for sid, steps in edit_sessions.items():
        (pred / sid).mkdir(parents=True)
        images = mb / "images" / sid
        shutil.copy(images / f"{sid}-input.png", pred / sid / f"{sid}_1.png")
        for i in range(2, len(steps) + 1):
            shutil.copy(images / steps[i - 1]["input"], pred / sid / f"{sid}_inde_{i}.png")
            shutil.copy(images / f"{sid}-input.png", pred / sid / f"{sid}_iter_{i}.png")
        a = np.asarray(Image.open(images / f"{sid}-input.png"), np.float32) / 255
        b = np.asarray(Image.open(images / steps[-1]["output"]), np.float32) / 255
        want_multi.append(np.abs(a - b).mean())
    from ultracurate.models import make_tiny
    clip = make_tiny(tiny_dir, ("clip",))["clip"]
    main(["eval", "--benchmark", "magicbrush", "--predictions", str(pred), "--references",
          str(mb / "images"), "--captions", str(mb / "global_descriptions.json"), "--clip",
          clip, "--metrics", "l1,l2,clip_i,clip_t", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"single_turn": sum(lengths), "multi_turn": len(sessions)}
    assert result["metrics"]["multi_turn"]["l1"] == pytest.approx(np.mean(want_multi),
                                                                  abs=1e-6)
    assert "clip_t" in result["metrics"]["single_turn"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_review_groups_sessions_and_shows_judge_disagreement(chained, tmp_path):
    from fiftyone import ViewField as F

    from ultracurate.review import build_review_dataset, open_review_dataset
    from ultracurate.stages.filter import JUDGED, latest_thresholds, verdict_sql
    ws = _copy(chained[0], tmp_path)
    run(ws, "judge", Selection("true"), grammar="tiny-judge", progress=False)
    summary = build_review_dataset(ws, embeddings=False, progress=False)
    assert {"sessions", "judge-disagrees-clip", "judge-invalid"} <= set(summary.views)
    ds = open_review_dataset(ws)
    with ws.catalog(read_only=True) as cat:
        sessions = {r["session_id"]: r["turn_candidates"] for r in cat.query(
            "SELECT session_id, turn_candidates FROM sessions_v")}
        clip, judge = verdict_sql(latest_thresholds(cat))
        disagree = {r[0] for r in cat.con.execute(
            f"SELECT candidate_id FROM candidates_v WHERE {JUDGED} AND ({clip}) <> ({judge})"
        ).fetchall()}
    # one group per session, its turns in order
    groups = {g.first().session_id: [s.candidate_id for s in g]
              for g in ds.load_saved_view("sessions").iter_dynamic_groups()}
    assert groups == sessions
    view = ds.load_saved_view("judge-disagrees-clip")
    assert set(view.select_group_slices("edited").values("candidate_id")) == disagree
    # the judge's fields are on every sample
    edited = ds.select_group_slices("edited")
    assert edited.match(F("judge_rationale") != None).count() > 0  # noqa: E711


@pytest.mark.parametrize("args, message", [
    (["--turns", "0"], "Invalid value for '--turns'"),
    (["--types", "add,fly"], "unknown edit type 'fly'"),
    (["--size", "100"], "--size must be a multiple of 8"),
    (["--where", "status = 'accepted'; DROP TABLE anchors"], "--where is not a valid SQL"),
    (["--where", "no_such_column = 1"], "--where names an unknown column 'no_such_column'"),
])
def test_bad_options_are_one_line_before_anything_is_made(base, tmp_path, capsys, args,
                                                          message):
    ws = _copy(base, tmp_path)
    before = _state(ws)
    with pytest.raises(SystemExit) as e:
        main(["chain", "-w", str(ws.root), *args])
    assert e.value.code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _state(ws) == before
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'chain'") == 0


def test_a_turn_image_that_cannot_be_an_anchor_ends_its_session(base, tmp_path):
    """A turn's edited image already an anchor (same bytes), or gone from the media store:
    that session ends with the reason, the others go on."""
    ws = _copy(base, tmp_path)
    run(ws, "chain", turns=1, **CHAIN).result   # the sessions and their roots, nothing more
    with ws.catalog() as cat:
        roots = [r[0] for r in cat.con.execute(
            "SELECT root_candidate_id FROM sessions ORDER BY session_id").fetchall()]
        photo = cat.query("SELECT anchor_id, media FROM anchors ORDER BY anchor_id LIMIT 1")[0]
        cat.con.execute("UPDATE candidates SET edited_image = ? WHERE candidate_id = ?",
                        [photo["media"], roots[0]])
        gone = cat.scalar("SELECT edited_image FROM candidates WHERE candidate_id = ?",
                          [roots[1]])
    ws.media.path(gone).unlink()
    res = run(ws, "chain", turns=2, **CHAIN).result
    with ws.catalog(read_only=True) as cat:
        reasons = [r[0] for r in cat.con.execute(
            "SELECT end_reason FROM sessions ORDER BY session_id").fetchall()]
    assert reasons[0] == (f"turn 2: the edited image of candidate {roots[0]} is already "
                          f"anchor {photo['anchor_id']}")
    assert reasons[1].startswith(f"turn 2: candidate {roots[1]}'s edited image: ")
    assert "file not found" in reasons[1]
    assert res.turns[0].ended >= 2 and res.turns[0].sessions == 3
    assert res.turns[0].anchors_made == 1
