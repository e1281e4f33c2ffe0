"""Balance: quotas (cap, target water-filling), the marks in the catalog, seeded
reproducibility, the plot, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultracurate.cli import main
from ultracurate.errors import UltracurateError
from ultracurate.stages.balance import quotas
from ultracurate.runner import run

from _scoring import add_candidates


def test_quotas():
    counts = {"add": 10, "replace": 3, "turn": 6}
    assert quotas(counts, cap=4) == {"add": 4, "replace": 3, "turn": 4}
    # 12 in all: level 4 gives 4 + 3 + 4 = 11 (replace has only 3); the last unit goes to
    # the largest group
    q = quotas(counts, target=12)
    assert q == {"add": 5, "replace": 3, "turn": 4} and sum(q.values()) == 12
    assert quotas(counts, target=100) == counts
    assert quotas(counts, target=3) == {"add": 1, "replace": 1, "turn": 1}
    with pytest.raises(UltracurateError, match="exactly one"):
        quotas(counts)
    with pytest.raises(UltracurateError, match="exactly one"):
        quotas(counts, target=3, cap=3)


@pytest.fixture
def accepted_ws(ingested_ws):
    """6 edits (add x3, replace x2, turn x1) with 3 candidates each, all accepted,
    except a rejected one and a duplicate."""
    ws = ingested_ws
    c = add_candidates(ws, n_edits=6, per_edit=3, types=("add", "add", "add", "replace",
                                                         "replace", "turn"),
                       status="accepted")
    ids = c["candidate_id"].to_list()
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET auto_status = 'rejected' WHERE candidate_id = ?",
                        [ids[0]])
        cat.con.execute("UPDATE candidates SET duplicate_of = ? WHERE candidate_id = ?",
                        [ids[2], ids[1]])
    return ws, ids


def _selected(ws):
    with ws.catalog() as cat:
        return cat.query("SELECT candidate_id, edit_type, selected, balance_run FROM "
                         "candidates_v ORDER BY candidate_id")


def test_balance_cap_marks_rows_and_plots(accepted_ws):
    ws, ids = accepted_ws
    res = run(ws, "balance", cap=4, seed=1).result
    # add: 9 rows - 1 rejected - 1 duplicate = 7 accepted; replace 6; turn 3
    assert res.before == {"add": 7, "replace": 6, "turn": 3}
    assert res.after == {"add": 4, "replace": 4, "turn": 3}
    rows = _selected(ws)
    assert sum(r["selected"] for r in rows) == 11
    assert all(r["balance_run"] == res.run_id for r in rows)
    sel = {r["candidate_id"] for r in rows if r["selected"]}
    assert ids[0] not in sel and ids[1] not in sel      # rejected / duplicate never chosen
    assert Path(res.plot).exists() and Path(res.plot).read_bytes()[:4] == b"\x89PNG"
    # same seed, same rows; another seed, another choice among the add rows
    again = run(ws, "balance", cap=4, seed=1, plot=False).result
    assert {r["candidate_id"] for r in _selected(ws) if r["selected"]} == sel
    assert again.after == res.after
    picks = set()
    for s in range(2, 6):
        run(ws, "balance", cap=4, seed=s, plot=False)
        picks.add(frozenset(r["candidate_id"] for r in _selected(ws) if r["selected"]))
    assert len(picks) > 1


def test_balance_target_and_by_two_columns(accepted_ws, capsys):
    ws, ids = accepted_ws
    res = run(ws, "balance", target=9, seed=0, plot=False).result
    assert res.after == {"add": 3, "replace": 3, "turn": 3} and res.selected == 9
    res = run(ws, "balance", by=("edit_type", "mode"), cap=2, plot=False).result
    assert set(res.before) == {"add / free", "add / region", "replace / free",
                               "replace / region", "turn / region"}
    assert all(v <= 2 for v in res.after.values())
    with pytest.raises(UltracurateError, match="no column 'nope'"):
        run(ws, "balance", by=("nope",), cap=1)
    # CLI, narrowed by --where: rows outside the selection keep their marks
    main(["balance", "-w", str(ws.root), "--by", "edit_type", "--target", "2",
          "--where", "edit_type = 'add'", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["after"] == {"add": 2} and Path(out["plot"]).exists()
    rows = _selected(ws)
    assert sum(r["selected"] for r in rows if r["edit_type"] == "add") == 2
    assert sum(r["selected"] for r in rows if r["edit_type"] != "add") == 6


@pytest.mark.parametrize("selection", [
    {}, {"where": "edit_type = 'add'"}, {"where": "  "}, {"limit": 5}, {"sample": 7}])
def test_balance_marks_exactly_the_rows_of_its_selection(accepted_ws, selection):
    """Every row of the selection gets this run's mark (selected or not), every other row
    keeps the last run's: whole selections are updated in place, others through their ids."""
    from ultracurate.selection import Selection
    from ultracurate.selection import selected_keys_sql
    ws, ids = accepted_ws
    first = run(ws, "balance", cap=1, seed=3, plot=False).result
    before = {r["candidate_id"]: r for r in _selected(ws)}
    sel = Selection(**selection)
    with ws.catalog(read_only=True) as cat:
        sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", sel,
                                        columns="candidate_id")
        inside = {r[0] for r in cat.con.execute(sql, params).fetchall()}
    assert sel.everything == (inside == set(before))   # the case is what it says
    res = run(ws, "balance", sel, cap=2, seed=3, plot=False).result
    after = {r["candidate_id"]: r for r in _selected(ws)}
    for cid, r in after.items():
        if cid in inside:
            assert r["balance_run"] == res.run_id
        else:
            assert (r["balance_run"], r["selected"]) == (first.run_id, before[cid]["selected"])
    assert sum(after[c]["selected"] for c in inside) == res.selected
    assert 0 < res.selected <= 2 * len(res.before)
