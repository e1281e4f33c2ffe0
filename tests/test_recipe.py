"""Recipes (`ultracurate run RECIPE.toml`): stages in order with their options and selections, a
per-stage table, the recipe and each stage's options in `runs`, resumption on rerun; a bad
recipe is one line before anything runs. And the contract's registry: `show` lists the stages
that touched a row, and a child selection is scoped in SQL, not by ids bound from Python."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ultracurate.cli import main
from ultracurate.runner import run
from ultracurate.selection import Selection


def _recipe(ws, text: str):
    path = ws.root / "r.toml"
    path.write_text(text)
    return str(path)


RECIPE = """
[recipe]
name = "small"

[[steps]]
stage = "ingest"
paths = ["photos/demo_anchors.jsonl"]

[[steps]]
stage = "instruct"
backend = "rule"
per_anchor = 2
types = "add,replace"
select = { where = "external_id IN ('astronaut', 'coffee')" }

[[steps]]
stage = "ingest"
name = "ingest_more"
paths = ["more"]
"""


@pytest.fixture
def recipe_ws(ws, demo_photos):
    shutil.copytree(demo_photos.parent, ws.root / "photos")
    return ws


def _runs(ws) -> list[dict]:
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT run_id, stage, state, params, selection, parent_run, rows_in, "
                         "rows_done FROM runs ORDER BY run_id")


def test_recipe_runs_in_order_records_its_steps_and_resumes(recipe_ws, capsys):
    ws = recipe_ws
    path = _recipe(ws, RECIPE)
    # the third step's folder is missing: the recipe stops there, failed
    with pytest.raises(SystemExit) as e:
        main(["run", path, "-w", str(ws.root)])
    assert e.value.code == 1
    assert "recipe small: step 3 (ingest_more): " in capsys.readouterr().err
    first = _runs(ws)
    parent = first[0]
    assert (parent["stage"], parent["state"], parent["rows_done"]) == ("recipe", "failed", 2)
    steps = json.loads(parent["params"])["steps"]
    assert [s["stage"] for s in steps] == ["ingest", "instruct", "ingest"]
    assert steps[1]["per_anchor"] == 2 and steps[1]["select"]["where"].startswith("external_id")
    children = [r for r in first if r["parent_run"] == parent["run_id"]]
    assert [r["stage"] for r in children] == ["ingest", "instruct"]
    instruct = children[1]
    assert json.loads(instruct["params"])["per_anchor"] == 2
    assert "external_id IN" in json.loads(instruct["selection"])["where"]
    with ws.catalog(read_only=True) as cat:  # the step's selection and options held
        edits = cat.query("SELECT a.external_id, e.edit_type FROM edits e JOIN anchors a "
                          "USING (anchor_id) ORDER BY 1, 2")
    assert {r["external_id"] for r in edits} == {"astronaut", "coffee"}
    assert len(edits) == 4 and {r["edit_type"] for r in edits} <= {"add", "replace"}

    # the folder made, the same command resumes: the two finished steps are skipped
    (ws.root / "more").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        ws.root / "more" / "noise.png")
    main(["run", path, "-w", str(ws.root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [(s["stage"], s["state"]) for s in out["steps"]] == [
        ("ingest", "skipped"), ("instruct", "skipped"), ("ingest_more", "completed")]
    assert out["resumed_from"] == parent["run_id"]
    again = _runs(ws)[len(first):]
    assert [r["stage"] for r in again] == ["recipe", "ingest"]
    assert again[0]["state"] == "completed" and again[1]["parent_run"] == again[0]["run_id"]

    # a finished recipe runs every step again; each finds its rows done
    main(["run", path, "-w", str(ws.root)])
    text = capsys.readouterr().out
    assert "rate" in text and "instruct" in text and "ingest_more" in text
    last = _runs(ws)[len(first) + len(again):]
    assert [r["stage"] for r in last] == ["recipe", "ingest", "instruct", "ingest"]
    assert [r["rows_in"] for r in last[1:]] == [0, 0, 0]


@pytest.mark.parametrize("text, message", [
    ('[[steps]]\nstage = "nope"\n', "step 1: unknown stage 'nope'"),
    ('[[steps]]\nstage = "instruct"\nper_anchors = 2\n',
     "step 1 (instruct): unknown option 'per_anchors'"),
    ('[[steps]]\nstage = "instruct"\nper_anchor = 0\n', "--per-anchor must be at least 1"),
    ('[[steps]]\nstage = "filter"\nselect = { wher = "x" }\n', "select takes"),
    ('[recipe]\nname = "x"\n', "no [[steps]]"),
    ('[[steps]\n', "not a valid TOML recipe"),
])
def test_a_bad_recipe_is_one_line_before_anything_runs(ws, capsys, text, message):
    path = _recipe(ws, text)
    with pytest.raises(SystemExit) as e:
        main(["run", path, "-w", str(ws.root)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _runs(ws) == []


def test_show_lists_the_stages_that_touched_a_row(ingested_ws, capsys):
    ws = ingested_ws
    run(ws, "instruct", Selection(where="anchor_id = 1"), backend="rule", per_anchor=2,
        mode="region", progress=False)
    with ws.catalog() as cat:  # edit 1 a mask that cannot be decoded, edit 2 none
        cat.con.execute("UPDATE edits SET mask_rle = 'not an rle', mask_height = 4, "
                        "mask_width = 4 WHERE edit_id = 1")
    s = run(ws, "classify-masks", progress=False)
    assert (s.rows_in, s.rows_failed) == (1, 1)
    main(["show", "e1", "-w", str(ws.root), "--json"])
    e1 = json.loads(capsys.readouterr().out)
    assert [(m["stage"], m["state"], m["run_id"]) for m in e1["stages"]] == \
        [("classify-masks", "failed", s.run_id)]
    assert "edit 1" in e1["stages"][0]["error"]
    main(["show", "a1", "-w", str(ws.root), "--json"])
    a1 = json.loads(capsys.readouterr().out)
    assert [(m["stage"], m["state"]) for m in a1["stages"]] == [("instruct", "done")]


@pytest.mark.parametrize("selection", [
    Selection(),
    Selection(where="edit_type = $t", params={"t": "add"}),
    Selection(where="edit_id > 0", limit=2),
    Selection(sample=2, seed=3),
])
def test_a_child_selection_is_a_semi_join_not_ids_bound_from_python(ingested_ws, selection):
    """generate runs over the candidates of the edits the user selects: the pending rows' SQL
    scopes them by the parent's selection inside DuckDB; no parameter is a list of ids."""
    from ultracurate.runner import pending_sql
    from ultracurate.stages.generate import GenerateStage
    ws = ingested_ws
    run(ws, "instruct", backend="rule", per_anchor=2, mode="free", progress=False)
    stage = GenerateStage(candidates=2, size=64)
    with ws.catalog() as cat:
        from ultracurate.catalog import KEYS, VIEWS
        from ultracurate.runner import Access
        from ultracurate.selection import selected_keys_sql
        psql, pparams = selected_keys_sql(cat.con, VIEWS["edits"], KEYS["edits"], selection,
                                          None, "edit_id")
        with cat.transaction():
            stage.plan(Access(cat, stage, writable=True, workspace=ws), selection, psql,
                       pparams)
        scoped = Selection(parent=selection, parent_table="edits")
        sql, params = pending_sql(stage, cat, scoped, False)
        assert not any(isinstance(v, (list, tuple)) for v in params.values()), params
        got = {r["edit_id"] for r in cat.query(f"SELECT edit_id FROM ({sql}) p", params)}
        want = {r["edit_id"] for r in cat.query(psql, pparams)}
    assert got == want and len(got) > 0
