"""The instruct stage with the offline rule back-end, the validator, exemplars, planning,
the CLI and the importers: all on real DuckDB workspaces with the demo's real photos."""

import json
import os
import subprocess
import sys

import pytest

from _anchors import set_captions
from ultracurate.names import EDIT_TYPES
from ultracurate.errors import UltracurateError
from ultracurate.instruct.captions import contains_phrase, fix_articles, noun_phrases
from ultracurate.instruct.exemplars import by_type, load_exemplars, sample
from ultracurate.instruct.importers import import_instructions, infer_edit_type
from ultracurate.instruct.plan import parse_quota, plan_types
from ultracurate.instruct.prompt import PromptTemplate
from ultracurate.instruct.rule import propose
from ultracurate.instruct.validation import validate
from ultracurate.runner import run
from ultracurate.selection import Selection

CAPTION = "an orange tabby cat sitting on a wooden floor"


# -- caption parsing ---------------------------------------------------------------------
def test_noun_phrases_and_attributes():
    nps = noun_phrases("a red and black motorbike standing on a concrete floor")
    assert [(n.text, n.head, n.colours) for n in nps] == [
        ("red and black motorbike", "motorbike", ["red", "black"]),
        ("concrete floor", "floor", [])]
    # quantity nouns hand over to their complement; verbs end a phrase
    nps = noun_phrases("a collection of old coins lying on a dark table")
    assert [n.text for n in nps] == ["old coins", "dark table"]
    assert nps[0].plural and not nps[1].plural
    # every phrase is an exact substring at its recorded span
    cap = "a photographer in a dark coat standing behind a camera on a grassy field"
    for n in noun_phrases(cap):
        assert cap[n.start:n.end] == n.text
    assert fix_articles("a orange cat and an red car") == "an orange cat and a red car"
    assert contains_phrase(CAPTION, "Tabby Cat") and not contains_phrase(CAPTION, "cat sit")


# -- the rule back-end -------------------------------------------------------------------
def test_rule_backend_writes_valid_edits_of_every_type(demo_photos):
    captions = [c for line in demo_photos.read_text().splitlines()
                for c in json.loads(line)["captions"]]
    for t in EDIT_TYPES:
        for i, cap in enumerate(captions):
            answer = propose(cap, t, seed=i)
            proposal, reasons = validate(answer, cap, t)
            assert reasons == [], (t, cap, answer)
            assert proposal.edit_type == t
            if t in ("change_global", "transform_global"):
                assert proposal.edit_object == "NONE"
            if t in ("change_color", "replace", "turn", "change_local", "transform_local"):
                assert contains_phrase(cap, proposal.edit_object)
    # the edit does what it says
    a = propose("a red car parked on the street", "change_color", seed=3)
    assert "red car" == a["edit_object"] and "red" not in a["target_caption"].split()
    assert propose(CAPTION, "replace", 5) == propose(CAPTION, "replace", 5)


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("answer,reason", [
    ("not json at all", "not JSON"),
    ('{"instruction": "make it red"', "not JSON"),
    ('[1, 2]', "not an object"),
    ('{"instruction": 5, "target_caption": "x y", "edit_type": "add"}', "'instruction' is a int"),
    ('{"instruction": "make it pop", "target_caption": "a cat", "edit_type": "explode"}',
     "not one of the nine"),
    ('{"instruction": "make the cat black", "target_caption": "an orange tabby cat sitting on '
     'a wooden floor", "edit_object": "tabby cat", "edit_type": "change_color"}',
     "equals the source caption"),
    ('{"instruction": "make the dog black", "target_caption": "a black dog on a wooden floor",'
     ' "edit_object": "dog", "edit_type": "change_color"}', "does not occur in the source"),
    ('{"instruction": "replace it", "target_caption": "a dog on a floor", "edit_object": '
     '"NONE", "edit_type": "replace"}', "needs an edit object"),
    ('{"instruction": "make it night", "target_caption": "a cat at night", "edit_type": '
     '"change_global"}', "asked for a add edit"),
])
def test_validator_rejects_with_reasons(answer, reason):
    proposal, reasons = validate(answer, CAPTION, "add")
    assert proposal is None and any(reason in r for r in reasons), reasons


def test_validator_accepts_fenced_json_and_forces_global_object():
    text = ('Sure!\n```json\n{"instruction": "make it night", "target_caption": "an orange '
            'tabby cat sitting on a wooden floor at night", "edit_object": "cat", '
            '"edit_type": "Change Global"}\n```')
    proposal, reasons = validate(text, CAPTION, "change_global")
    assert reasons == [] and proposal.edit_object == "NONE"
    assert proposal.edit_type == "change_global"


# -- exemplars and prompt ------------------------------------------------------------------
def test_exemplar_file_and_prompt(tmp_path):
    ex = load_exemplars()
    assert all(len(v) >= 8 for v in by_type(ex).values())
    assert len({e.id for e in ex}) == len(ex)
    import random
    instr, full = sample(ex, "turn", 50, 10, random.Random(1))
    assert len(instr) == 50 and len(full) == 10
    assert sum(e.edit_type == "turn" for e in full) >= 2
    msgs = PromptTemplate.load("instruct-v1").messages(CAPTION, "turn", instr, full)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert CAPTION in msgs[1]["content"] and "$" not in msgs[0]["content"]
    assert all(e.instruction in msgs[0]["content"] for e in instr + full)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "source_caption": "a cat", "instruction": "make the "
                               "dog red", "target_caption": "a red dog", "edit_object": "dog",
                               "edit_type": "change_color"}) + "\n")
    with pytest.raises(UltracurateError, match="bad.jsonl:1 .x.: edit object 'dog'"):
        load_exemplars(bad)


# -- planning ------------------------------------------------------------------------------
def test_plan_balances_types_and_quotas():
    plan = plan_types(9, 2, list(EDIT_TYPES))
    flat = [t for p in plan for t in p]
    assert all(flat.count(t) == 2 for t in EDIT_TYPES)
    assert all(len(set(p)) == 2 for p in plan)
    q = parse_quota("add=3,replace=5,turn=2")
    flat = [t for p in plan_types(10, 1, list(EDIT_TYPES), q) for t in p]
    assert sorted(flat) == sorted(["add"] * 3 + ["replace"] * 5 + ["turn"] * 2)
    # too big a quota is cut in proportion, not by dropping whole types
    flat = [t for p in plan_types(3, 1, list(EDIT_TYPES), q) for t in p]
    assert sorted(flat) == ["add", "replace", "turn"]
    with pytest.raises(UltracurateError, match="unknown edit type 'bogus'"):
        parse_quota("bogus=1")


@pytest.mark.parametrize("quota, n_anchors, per_anchor", [
    ("add=3,replace=5,turn=2", 3, 1), ("add=3,replace=5,turn=2", 4, 2),
    ("replace=1000,add=10", 7, 3), ("change_color=7,add=7,turn=7", 10, 1),
    ("others=1,replace=99", 12, 2), ("add=5", 2, 1)])
def test_a_quota_over_capacity_is_cut_in_proportion_and_each_deal_ignores_the_count(
        quota, n_anchors, per_anchor):
    """Where the anchors run out before the quota, each type keeps its share of the
    capacity to within one; and the first anchors' types are the same whatever the number
    of anchors (a job deals them without counting its selection)."""
    q = parse_quota(quota)
    capacity, total = n_anchors * per_anchor, sum(q.values())
    assert capacity < total     # the case is what it says
    plan = plan_types(n_anchors, per_anchor, list(EDIT_TYPES), q)
    flat = [t for p in plan for t in p]
    assert len(flat) == capacity
    for t, n in q.items():
        assert abs(flat.count(t) - n * capacity / total) <= 1, (t, flat)
    more = plan_types(n_anchors + 5, per_anchor, list(EDIT_TYPES), q)
    assert more[:n_anchors] == plan


@pytest.mark.parametrize("quota", [
    {"add": 3, "replace": 5, "turn": 2}, {"change_color": 7, "add": 7, "turn": 7},
    {"others": 1, "replace": 99}, {"add": 5, "replace": 0}, {t: 3 ** i for i, t in
                                                            enumerate(EDIT_TYPES)},
    {"add": 45_555, "replace": 45_556, "turn": 100_003, "others": 17}])
def test_a_slice_of_the_quota_sequence_is_the_whole_sorted_sequence_cut(quota):
    """quota_slice computes places of the sequence from the slots near them: equal to the
    sequence's definition (every type's slots at (i + 0.5) / n, sorted by position then type,
    ties included), at every place of a small quota and at the ends and random places of a
    large one."""
    import random
    from ultracurate.instruct.plan import quota_slice
    order = {t: i for i, t in enumerate(EDIT_TYPES)}
    whole = [t for _, _, t in sorted(((i + 0.5) / n, order[t], t)
                                     for t, n in quota.items() for i in range(n))]
    q = tuple(sorted(quota.items()))
    n = len(whole)
    rng = random.Random(0)
    starts = range(n) if n < 2000 else [0, 1, n - 3, n - 1] + rng.sample(range(n), 200)
    for start in starts:
        width = rng.randint(1, 4)
        assert quota_slice(q, start, start + width) == whole[start:start + width], start
    assert quota_slice(q, n, n + 2) == []


# -- the stage -----------------------------------------------------------------------------
def _edits(ws):
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT * FROM edits ORDER BY edit_id")


def test_instruct_stage_rule_backend(ingested_ws, tmp_path):
    ws = ingested_ws
    s = run(ws, "instruct", per_anchor=2, seed=7, progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 9, 0)
    rows = _edits(ws)
    assert len(rows) == 18
    counts = {t: sum(r["edit_type"] == t for r in rows) for t in EDIT_TYPES}
    assert all(n == 2 for n in counts.values())
    for r in rows:
        assert r["edit_status"] == "proposed" and r["instruct_backend"] == "rule"
        assert r["prompt_version"] == "rule-v1" and r["instruct_run"] == s.run_id
        assert r["mode"] == ("free" if r["edit_object"] == "NONE" else "region")
        assert r["target_caption"] != r["source_caption"]
    # a rerun skips done anchors; same seed elsewhere gives the same rows
    assert run(ws, "instruct", per_anchor=2, seed=7, progress=False).rows_in == 0
    from ultracurate.workspace import Workspace
    from ultracurate.stages.ingest import IngestStage, discover
    ws2 = Workspace.init(tmp_path / "ws2")
    run(ws2, IngestStage(items=discover([_photos(ws)])), progress=False)
    run(ws2, "instruct", per_anchor=2, seed=7, progress=False)
    key = ("anchor_id", "instruction", "target_caption", "edit_object", "edit_type",
           "instruct_seed")
    assert [tuple(r[k] for k in key) for r in _edits(ws2)] == \
        [tuple(r[k] for k in key) for r in rows]
    # another seed gives other edits
    ws3 = Workspace.init(tmp_path / "ws3")
    run(ws3, IngestStage(items=discover([_photos(ws)])), progress=False)
    run(ws3, "instruct", per_anchor=2, seed=8, progress=False)
    assert [r["instruction"] for r in _edits(ws3)] != [r["instruction"] for r in rows]


def _photos(ws):
    with ws.catalog(read_only=True) as cat:
        path = cat.scalar("SELECT source_path FROM anchors LIMIT 1")
    from pathlib import Path
    return Path(path).parent / "demo_anchors.jsonl"


def test_instruct_selection_quota_mode_and_bad_captions(ingested_ws):
    ws = ingested_ws
    with ws.catalog() as cat:  # an anchor whose only caption is too long, one with none
        set_captions(cat, {1: ["word " * 61], 2: []})
    s = run(ws, "instruct", Selection(where="anchor_id <= :n", params={"n": 6}),
                     quota="replace=4,change_color=4", per_anchor=2, mode="free",
                     progress=False)
    # anchors 1 (a caption too long) and 2 (none) fail with their reasons and take no share
    # of the quota: anchors 3-6 get all eight edits
    assert (s.rows_in, s.rows_failed) == (6, 2)
    with ws.catalog(read_only=True) as cat:
        errs = dict(cat.con.execute("SELECT key, error FROM stage_state "
                                    "WHERE stage='instruct' AND state = 'failed'").fetchall())
    assert "no caption of 1 to 60 words" in errs[1]
    assert errs[2].startswith("anchor 2: no caption (write one with `ultracurate caption`")
    rows = _edits(ws)
    assert {r["anchor_id"] for r in rows} == {3, 4, 5, 6}
    assert sorted(r["edit_type"] for r in rows) == ["change_color"] * 4 + ["replace"] * 4
    assert all(r["mode"] == "free" for r in rows)


def test_unknown_type_is_one_clear_error(ingested_ws):
    with pytest.raises(UltracurateError, match="unknown edit type 'zoom'"):
        run(ingested_ws, "instruct", types="add,zoom", progress=False)
    assert _edits(ingested_ws) == []



BAD_QUOTAS = [   # (--quota, what the one-line error names)
    ("add=1,add=2", "add more than once"),
    ("add=1,ADD=2", "add more than once"),
    ("change-color=1,change_color=2", "change_color more than once"),
    ("add=-1", "add is negative"),
    ("add=1.5", "'1.5' is not a whole number"),
    ("add=", "'' is not a whole number"),
    ("add=1,", "expects TYPE=N"),
    ("=3", "unknown edit type ''"),
    ("zoom=3", "unknown edit type 'zoom'"),
]


def test_a_bad_quota_is_one_line_and_writes_nothing(ingested_ws):
    """Every bad --quota is refused with one line before the job starts (one process for
    the table: tests/_clirun.py); the catalog keeps no edit and no run."""
    from _clirun import one_line_error, run_many
    from test_hardening import contents
    before = contents(ingested_ws)
    ws = str(ingested_ws.root)
    results = run_many([["instruct", "-w", ws, "--quota", q] for q, _ in BAD_QUOTAS])
    for (quota, message), res in zip(BAD_QUOTAS, results):
        one_line_error(res, message, code=1)
    assert contents(ingested_ws) == before

# -- CLI -----------------------------------------------------------------------------------
def _cli(*args, env=None):
    e = dict(os.environ, ULTRACURATE_PROGRESS="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ultracurate.cli", *args], env=e,
                          capture_output=True, text=True, timeout=300)


def test_cli_instruct_and_stats(ingested_ws):
    ws = str(ingested_ws.root)
    res = _cli("instruct", "-w", ws, "--per-anchor", "1", "--types", "add,replace,turn",
               "--where", "dataset = :d", "-p", "d", "demo_anchors", "--seed", "3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rows_done"] == 9
    stats = json.loads(_cli("stats", "-w", ws, "--json").stdout)
    assert stats["edits_by_type"] == {"add": 3, "replace": 3, "turn": 3}
    res = _cli("instruct", "-w", ws, "--types", "add,zoom")
    assert res.returncode == 1 and res.stderr.strip() == \
        "error: unknown edit type 'zoom' (one of " + ", ".join(EDIT_TYPES) + ")"


# -- importers -----------------------------------------------------------------------------
def test_infer_edit_type():
    assert infer_edit_type("replace the dog with a cat") == "replace"
    assert infer_edit_type("turn the cat into a statue") == "turn"
    assert infer_edit_type("make it look like a watercolor painting") == "transform_global"
    assert infer_edit_type("make it snow") == "change_global"
    assert infer_edit_type("make the car blue") == "change_color"
    assert infer_edit_type("add a hat to the man") == "add"
    assert infer_edit_type("make the cat wear a hat") == "add"
    assert infer_edit_type("remove the spoon") == "others"
    assert infer_edit_type("make the dog bigger") == "transform_local"


def test_import_ultraedit_ip2p_magicbrush(ws, demo_photos, tmp_path):
    photos = demo_photos.parent
    ue = tmp_path / "ue.jsonl"
    ue.write_text("".join(json.dumps(r) + "\n" for r in [
        {"edit_instruction": "make the cat black", "input_text": "an orange tabby cat",
         "input_image": str(photos / "chelsea.jpg"), "output_text": "a black tabby cat",
         "global_idx": 17, "edit_object": "orange tabby cat", "edit_type": "change_color"},
        {"edit_instruction": "make it snow", "input_text": "a white rocket",
         "input_image": "rocket.jpg", "output_text": "a white rocket in snow",
         "global_idx": 18, "edit_object": None},
        {"edit_instruction": "add a hat", "input_text": "x", "input_image": "missing.jpg",
         "output_text": "y", "global_idx": 19, "edit_object": "NONE"},
    ]))
    out = import_instructions(ws, ue, "ultraedit", images_root=photos, progress=False)
    assert (out["imported"], out["skipped"], out["anchors_created"]) == (2, 1, 2)
    assert list(out["reasons"]) == ["image not found and no anchor has its source caption"]
    rows = _edits(ws)
    assert [(r["edit_type"], r["mode"], r["edit_object"], r["external_id"]) for r in rows] == [
        ("change_color", "region", "orange tabby cat", "17"),
        ("change_global", "free", None, "18")]
    assert rows[0]["instruct_backend"] == "import:ultraedit"
    # importing again adds nothing
    again = import_instructions(ws, ue, "ultraedit", images_root=photos, progress=False)
    assert again["imported"] == 0 and again["reasons"]["already imported"] == 2

    # InstructPix2Pix: no image; attached by caption to the anchor that has it
    ip = tmp_path / "ip2p.jsonl"
    ip.write_text(json.dumps({"input": "an orange tabby cat", "edit": "make it a dog",
                              "output": "an orange dog"}) + "\n" +
                  json.dumps({"input": "nobody has this caption", "edit": "x y",
                              "output": "z"}) + "\n")
    out = import_instructions(ws, ip, "ip2p", progress=False)
    assert out["imported"] == 1 and out["skipped"] == 1
    with ws.catalog(read_only=True) as cat:
        aid = cat.scalar("SELECT anchor_id FROM edits WHERE instruction = 'make it a dog'")
        assert aid == cat.scalar("SELECT anchor_id FROM anchors WHERE source_path LIKE "
                                 "'%chelsea.jpg'")

    # MagicBrush edit_sessions.json with images/<img_id>/ and global descriptions
    mb = tmp_path / "mb"
    (mb / "images" / "327726").mkdir(parents=True)
    (mb / "images" / "327726" / "327726-input.png").write_bytes(
        (photos / "coins.png").read_bytes())
    (mb / "edit_sessions.json").write_text(json.dumps({"327726": [
        {"input": "327726-input.png", "mask": "327726-mask1.png",
         "instruction": "put a hat on the coin", "output": "327726-output1.png"}]}))
    (mb / "global_descriptions.json").write_text(json.dumps({"327726": {
        "327726-input.png": "coins on a table", "327726-output1.png": "coins and a hat"}}))
    out = import_instructions(ws, mb / "edit_sessions.json", "magicbrush", progress=False)
    assert out["imported"] == 1 and out["anchors_created"] == 1
    with ws.catalog(read_only=True) as cat:
        r = cat.query("SELECT * FROM edits_v WHERE instruct_backend = 'import:magicbrush'")[0]
    assert (r["edit_type"], r["source_caption"], r["target_caption"], r["external_id"]) == \
        ("add", "coins on a table", "coins and a hat", "327726:1")
    with pytest.raises(UltracurateError, match="record 1 has no 'edit' field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
        import_instructions(ws, bad, "ip2p", progress=False)
