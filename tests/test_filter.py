"""Filter: all reasons per rejected row, per-mode defaults, top-k, the region rule, human
decisions surviving re-filtering, the dry-run funnel, impossible thresholds, the CLI."""

from __future__ import annotations

import json

import pytest

from ultracurate.cli import main
from ultracurate.errors import UltracurateError
from ultracurate.selection import Selection
from ultracurate.thresholds import Thresholds
from ultracurate.runner import run

from _scoring import add_candidates, set_scores

GOOD = dict(clip_sim_source=0.3, clip_sim_target=0.3, clip_sim_dir=0.3, clip_sim_image=0.8,
            dinov2_sim=0.6, ssim=0.7, l1=0.05, l2=0.01)


@pytest.fixture
def scored(ingested_ws):
    """Edit A (free, 6 candidates) and edit B (region, 6 candidates) with chosen scores."""
    ws = ingested_ws
    c = add_candidates(ws, n_edits=2, per_edit=6, modes=("free", "region"))
    ids = c["candidate_id"].to_list()
    a, b = ids[:6], ids[6:]
    scores = {}
    # A: all pass except a[5] (two reasons); clip_sim_dir decides the top 4 among a[0..4]
    for i, cid in enumerate(a):
        scores[cid] = dict(GOOD, clip_sim_dir=0.30 + 0.01 * i)
    scores[a[5]] = dict(GOOD, clip_sim_image=0.72, clip_sim_dir=0.10)
    # B (region): clip_sim_image 0.72 passes region's 0.70; only b[0], b[1] pass -> dropped
    for i, cid in enumerate(b):
        scores[cid] = dict(GOOD, clip_sim_image=0.72, dinov2_sim=0.3 if i >= 2 else 0.6)
    set_scores(ws, scores)
    return ws, a, b


def _rows(ws):
    with ws.catalog() as cat:
        return {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, auto_status, status, reject_reasons, human_decision, "
            "filter_run FROM candidates_v")}


def test_reasons_topk_and_region_rule(scored):
    ws, a, b = scored
    res = run(ws, "filter").result
    rows = _rows(ws)
    # A: a[5] records both of its reasons
    assert rows[a[5]]["auto_status"] == "rejected"
    assert rows[a[5]]["reject_reasons"] == ["clip_sim_image < 0.75", "clip_sim_dir < 0.22"]
    # top 4 by clip_sim_dir among the 5 that pass: a[1..4]; a[0] is cut
    assert [rows[c]["auto_status"] for c in a[1:5]] == ["accepted"] * 4
    assert rows[a[0]]["reject_reasons"] == ["not in top 4 by clip_sim_dir"]
    assert all(rows[c]["reject_reasons"] is None for c in a[1:5])
    # B: region threshold 0.70 lets clip_sim_image 0.72 pass, but only 2 < 3 pass: dropped
    assert rows[b[0]]["reject_reasons"] == ["edit has 2 < 3 passing candidates"]
    assert rows[b[3]]["reject_reasons"] == ["dinov2_sim < 0.4",
                                            "edit has 2 < 3 passing candidates"]
    assert all(rows[c]["auto_status"] == "rejected" for c in b)
    assert (res.rows_in, res.accepted, res.rejected) == (12, 4, 8)
    assert all(r["filter_run"] == res.run_id for r in rows.values())
    steps = {s.step: s for s in res.funnel}
    assert steps["clip_sim_image >= 0.75 (free)"].removed_alone == 1
    assert steps["dinov2_sim >= 0.4"].removed_alone == 4
    assert steps["region rule (edit has fewer than k passing)"].removed == 2
    assert steps["top-k by clip_sim_dir"].removed == 1
    assert res.funnel[-1].remaining == 4


def test_human_decisions_override_and_survive_refiltering(scored):
    ws, a, b = scored
    run(ws, "filter")
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET human_decision = 'accept' WHERE candidate_id = ?",
                        [b[4]])
        # the best automatic row is rejected by a human: it takes no top-k place
        cat.con.execute("UPDATE candidates SET human_decision = 'reject' WHERE candidate_id = ?",
                        [a[4]])
    res = run(ws, "filter", thresholds=Thresholds.preset().override(clip_sim_dir_min=0.2)).result
    rows = _rows(ws)
    assert rows[b[4]]["status"] == "accepted" and rows[b[4]]["human_decision"] == "accept"
    assert rows[a[4]]["status"] == "rejected" and rows[a[4]]["human_decision"] == "reject"
    # a[0] moves up into the top 4 now that a[4] is out
    assert [rows[c]["status"] for c in a[:4]] == ["accepted"] * 4
    assert res.human_accepted == 1 and res.human_rejected == 1


def test_dry_run_changes_nothing_and_prints_funnel(scored, capsys):
    ws, a, b = scored
    before = _rows(ws)
    with ws.catalog() as cat:
        n_runs = cat.scalar("SELECT count(*) FROM runs")
    res = run(ws, "filter", dry_run=True).result
    assert res.accepted == 4 and res.run_id is None
    assert _rows(ws) == before
    main(["filter", "-w", str(ws.root), "--dry-run", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["accepted"] == 4
    assert [s["step"] for s in out["funnel"]][:2] == ["clip_sim_image >= 0.75 (free)",
                                                      "clip_sim_image >= 0.7 (region)"]
    main(["filter", "-w", str(ws.root), "--dry-run", "--clip-dir-min", "0.305"])
    text = capsys.readouterr().out
    assert "clip_sim_dir >= 0.305" in text and "dry run" in text
    with ws.catalog() as cat:
        assert cat.scalar("SELECT count(*) FROM runs") == n_runs
    assert _rows(ws) == before


def test_impossible_thresholds_are_one_line_errors(scored, capsys):
    ws, a, b = scored
    before = _rows(ws)
    with pytest.raises(UltracurateError, match="clip_sim_source >= 2 can never hold"):
        run(ws, "filter", thresholds=Thresholds.preset().override(clip_min=2))
    with pytest.raises(UltracurateError, match="min 0.9 > max 0.5"):
        Thresholds.preset().override(ssim_min=0.9, ssim_max=0.5)
    with pytest.raises(SystemExit) as e:
        main(["filter", "-w", str(ws.root), "--clip-min", "2"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: threshold clip_sim_source >= 2") and "\n" not in err
    assert _rows(ws) == before


def test_cli_filter_options_selection_and_topk(scored, capsys):
    ws, a, b = scored
    # --where narrows to the free edit; --top-k 2; --no-dino switches a bound off
    main(["filter", "-w", str(ws.root), "--where", "mode = :m", "-p", "m", "free",
          "--top-k", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["rows_in"] == 6 and out["accepted"] == 2
    rows = _rows(ws)
    assert [rows[c]["auto_status"] for c in a[3:5]] == ["accepted"] * 2
    assert rows[a[0]]["reject_reasons"] == ["not in top 2 by clip_sim_dir"]
    assert rows[b[0]]["auto_status"] == "scored"   # not selected: untouched
    main(["filter", "-w", str(ws.root), "--preset", "ultraedit", "--dino-min", "0.2",
          "--where", "mode = 'region'", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["accepted"] == 3   # region top 3 of 6 once DINO lets all pass
    sel = Selection(where="candidate_id = $c", params={"c": a[5]})
    r = run(ws, "filter", sel, thresholds=Thresholds.preset().override(
        unset=("clip_sim_image_min", "clip_sim_dir_min"))).result
    assert r.accepted == 1
    # no top-k in any mode: every passing row of the free edit is accepted
    r = run(ws, "filter", Selection(where="mode = 'free'"),
            thresholds=Thresholds.preset().override(unset=("top_k",))).result
    assert r.accepted == 5


def test_reasons_are_rows_of_a_side_table_and_refiltering_replaces_only_the_selected(scored):
    """One row per candidate and reason in candidate_rejects (filter's order kept); a filter
    over part of the rows replaces those rows' reasons and leaves the others' as they were."""
    ws, a, b = scored
    first = run(ws, "filter").result

    def rejects():
        with ws.catalog(read_only=True) as cat:
            return [tuple(r.values()) for r in cat.query(
                "SELECT candidate_id, reason_index, reason, filter_run FROM candidate_rejects "
                "ORDER BY candidate_id, reason_index")]
    got = rejects()
    assert [r[1:3] for r in got if r[0] == a[5]] == [(0, "clip_sim_image < 0.75"),
                                                    (1, "clip_sim_dir < 0.22")]
    assert len(got) == len({(r[0], r[2]) for r in got})      # one row per reason
    assert {r[3] for r in got} == {first.run_id}
    assert not [r for r in got if r[0] in a[1:5]]             # accepted rows have none

    # b[0] alone: its edit now has 1 < 3 passing candidates in the selection
    second = run(ws, "filter", Selection(where="candidate_id = $c", params={"c": b[0]})).result
    after = rejects()
    assert [r[1:] for r in after if r[0] == b[0]] == [
        (0, "edit has 1 < 3 passing candidates", second.run_id)]
    assert [r for r in after if r[0] != b[0]] == [r for r in got if r[0] != b[0]]
