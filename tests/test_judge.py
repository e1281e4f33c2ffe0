"""The judge: answers validated (a table of good and bad ones), an OpenAI-compatible vision
endpoint on loopback (both images as data URLs, a JSON schema asked for, malformed answers asked
again then recorded, 429 and 5xx retried), the tiny random-weight judge (two images per prompt,
JSON through constrained decoding), its default selection and dry run, and its scores gating
`filter`, shown in the report and the CLI."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from _loopback import LoopbackServer, completion
from _scoring import add_candidates, set_scores
from ultracurate.cli import main
from ultracurate.errors import UltracurateError
from ultracurate.judge import JUDGE_SCHEMA, validate_judgement
from ultracurate.selection import Selection
from ultracurate.runner import run
from ultracurate.stages.judge import plan_judge
from ultracurate.thresholds import Thresholds, parse_judge_min

GOOD = dict(clip_sim_source=0.3, clip_sim_target=0.3, clip_sim_dir=0.3, clip_sim_image=0.8,
            dinov2_sim=0.6, ssim=0.7, l1=0.05, l2=0.01)
LOOSE = Thresholds.preset("ultraedit").override(top_k=10, drop_if_fewer=False)


def _answer(i=5, p=4, q=3, why="the dog is red now"):
    return json.dumps({"instruction": i, "preservation": p, "quality": q, "rationale": why})


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, scores, reasons", [
    (_answer(), (5, 4, 3), []),
    ("```json\n" + _answer(1, 1, 1) + "\n```", (1, 1, 1), []),
    ("Here is my rating: " + _answer(2, 3, 4) + " Thanks.", (2, 3, 4), []),
    (_answer(4.0, 4, 4), (4, 4, 4), []),
    (_answer(4.5, 4, 4), None, ["instruction score 4.5 is not a whole number"]),
    (_answer("4", 4, 4), None, ['instruction score "4" is not a whole number']),
    (_answer(True, 4, 4), None, ["instruction score true is not a whole number"]),
    (_answer(7, 0, 4), None, ["instruction score 7 is outside 1-5",
                              "preservation score 0 is outside 1-5"]),
    ('{"instruction": 3, "quality": 3, "rationale": "ok"}', None, ["no preservation score"]),
    (_answer(why=""), None, ["no rationale"]),
    (_answer(why=" ".join(["word"] * 61)), None,
     ["rationale too long (61 words, 304 characters; at most 60 words and 400 characters)"]),
    (_answer(why="bad \x00 byte"), None,
     ["rationale holds control, private or undecodable characters"]),
    ('{"instruction": 3,', None, ["no JSON object in the answer"]),
    ('{"instruction": 3, }', None,
     ["not valid JSON (Expecting property name enclosed in double quotes: line 1 column 20 "
      "(char 19))"]),
    ("[1, 2]", None, ["no JSON object in the answer"]),
    ("", None, ["empty answer"]),
    (None, None, ["answer is a NoneType, not text"]),
])
def test_validate_judgement(text, scores, reasons):
    verdict, why = validate_judgement(text)
    assert why == reasons
    if scores is None:
        assert verdict is None
    else:
        assert (verdict.instruction, verdict.preservation, verdict.quality) == scores
        assert verdict.rationale


@pytest.mark.parametrize("items, error", [
    (["instruction=6"], "threshold judge_instruction >= 6 can never hold"),
    (["colour=4"], "--judge-min expects ASPECT=VALUE with ASPECT one of instruction, "
                   "preservation, quality, got 'colour=4'"),
    (["quality"], "--judge-min expects ASPECT=VALUE"),
    (["quality=high"], "--judge-min quality: 'high' is not a number"),
    (["quality=nan"], "--judge-min quality: 'nan' is not a number"),
])
def test_impossible_or_malformed_judge_bounds(items, error):
    with pytest.raises(UltracurateError, match=re.escape(error)):
        Thresholds.preset("ultraedit").override(**parse_judge_min(items))


# -- the workspace -----------------------------------------------------------------------------
@pytest.fixture
def pairs_ws(ingested_ws):
    """Eight edits of one candidate each (source: a demo photo at 64 px; edited: a brighter
    copy), each instruction naming what the loopback server does with it ('#good'); every pair
    passes the CLIP thresholds but the last, which fails clip_sim_dir."""
    ws = ingested_ws
    c = add_candidates(ws, n_edits=len(CASES) + 1, per_edit=2)
    c = c.filter(c["candidate_index"] == 1)
    ids = c["candidate_id"].to_list()
    with ws.catalog() as cat:
        cat.con.execute("DELETE FROM candidates WHERE candidate_index = 0")
        for cid, case in zip(ids, [*CASES, "good"]):
            cat.con.execute("UPDATE edits SET instruction = ? WHERE edit_id = (SELECT edit_id "
                            "FROM candidates WHERE candidate_id = ?)",
                            [f"make the dog red #{case}", cid])
    set_scores(ws, {cid: GOOD for cid in ids[:-1]} | {ids[-1]: dict(GOOD, clip_sim_dir=0.1)})
    return ws, dict(zip(CASES, ids)), ids[-1]


# case -> the server's answers on successive calls (the last repeats)
CASES = {
    "good": ["good"],
    "low": ["low"],
    "fenced": ["fenced"],
    "malformed_then_good": ["malformed", "good"],
    "out_of_range": ["out_of_range"],
    "slow_down": ["429", "good"],
    "overloaded_then_good": ["500", "500", "low"],
    "down": ["500"],
}


class JudgeServer(LoopbackServer):
    def answer(self, body, headers):
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        case = re.search(r"#(\w+)", text).group(1)
        steps = CASES[case]
        what = steps[min(self.count(case), len(steps) - 1)]
        if what == "429":
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.05"}
        if what == "500":
            return 500, {"error": {"message": "overloaded"}}, {}
        content = {"good": _answer(5, 4, 5, "the dog is red and nothing else moved"),
                   "low": _answer(2, 5, 4, "the dog is not red"),
                   "fenced": "```json\n" + _answer(4, 4, 4, "fine") + "\n```",
                   "malformed": '{"instruction": 5, "preservation": ',
                   "out_of_range": _answer(9, 4, 4, "very red")}[what]
        return 200, completion(content), {}


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def _judged(ws):
    with ws.catalog(read_only=True) as cat:
        rows = {r["candidate_id"]: r for r in cat.query("SELECT * FROM candidates_v")}
        state = {k: (s, e) for k, s, e in cat.con.execute(
            "SELECT key, state, error FROM stage_state WHERE stage = 'judge'").fetchall()}
    return rows, state


def test_judge_through_a_vision_endpoint_then_gate_filter(pairs_ws, server, monkeypatch):
    ws, case, not_clip = pairs_ws
    monkeypatch.setenv("ULTRACURATE_VLM_API_KEY", "judge-key-789")
    s = run(ws, "judge", backend="openai", model="judge-vlm", base_url=server.url, concurrency=3,
                  max_retries=2, backoff=0.01, timeout=5, progress=False)
    rows, state = _judged(ws)
    scores = {k: (rows[cid]["judge_instruction"], rows[cid]["judge_preservation"],
                  rows[cid]["judge_quality"]) for k, cid in case.items()}
    # valid answers, once asked again (malformed, 429, 5xx): stored with model and prompt
    assert scores == {"good": (5, 4, 5), "low": (2, 5, 4), "fenced": (4, 4, 4),
                      "malformed_then_good": (5, 4, 5), "out_of_range": (None,) * 3,
                      "slow_down": (5, 4, 5), "overloaded_then_good": (2, 5, 4),
                      "down": (None,) * 3}
    good = rows[case["good"]]
    assert good["judge_rationale"] == "the dog is red and nothing else moved"
    assert (good["judge_model"], good["judge_prompt"], good["judge_run"]) == \
        ("judge-vlm", "judge-v1", s.run_id)
    # an answer still invalid after its tries is kept with the reason, and the row failed
    bad = rows[case["out_of_range"]]
    assert bad["judge_invalid_reason"] == (
        "no valid answer after 2 tries: instruction score 9 is outside 1-5 (answer: "
        + _answer(9, 4, 4, "very red") + ")")
    assert state[case["out_of_range"]] == ("failed", f"candidate {case['out_of_range']}: "
                                                     + bad["judge_invalid_reason"])
    assert server.calls["out_of_range"] == 2 and server.calls["malformed_then_good"] == 2
    # a server that stays down fails the row with nothing written
    assert state[case["down"]] == ("failed", "openai: HTTP 500: overloaded (after 3 tries)")
    assert rows[case["down"]]["judge_invalid_reason"] is None
    # only the rows CLIP passed were judged (the default selection)
    assert rows[not_clip]["judge_run"] is None and not_clip not in state
    assert (s.rows_in, s.rows_done, s.rows_failed) == (8, 6, 2)
    assert s.extra["judged"] == 6 and s.extra["invalid_answers"] == 1
    # the requests: both images as data URLs, source first, the instruction, the schema
    body = next(b for b in server.bodies if "#good" in json.dumps(b))
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    src, edt = (Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1])))
                for p in parts[:2])
    assert src.size == edt.size == (64, 64)
    assert np.asarray(src).mean() < np.asarray(edt).mean()  # the edited copy is the brighter
    assert 'this instruction: "make the dog red #good"' in parts[2]["text"]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "edit_judgement", "schema": JUDGE_SCHEMA, "strict": True}}
    assert server.max_inflight <= 3
    assert server.auth == {"Bearer judge-key-789"}
    assert "judge-key-789" not in ws.catalog_path.read_bytes().decode("latin-1")

    # the judge's scores gate filter beside CLIP's, every reason recorded
    t = LOOSE.override(judge_instruction_min=4, judge_preservation_min=4)
    res = run(ws, "filter", thresholds=t).result
    rows, _ = _judged(ws)
    reasons = {k: rows[cid]["reject_reasons"] for k, cid in case.items()}
    assert reasons == {
        "good": None, "fenced": None, "malformed_then_good": None, "slow_down": None,
        "low": ["judge_instruction < 4"], "overloaded_then_good": ["judge_instruction < 4"],
        "out_of_range": ["judge_instruction missing", "judge_preservation missing"],
        "down": ["judge_instruction missing", "judge_preservation missing"]}
    assert rows[not_clip]["reject_reasons"] == ["clip_sim_dir < 0.22",
                                                "judge_instruction missing",
                                                "judge_preservation missing"]
    steps = {f.step: f.removed for f in res.funnel}
    assert steps["judge_instruction >= 4"] == 4 and steps["judge_preservation >= 4"] == 0

    # a rerun asks only for the failed rows
    s2 = run(ws, "judge", backend="openai", model="judge-vlm", base_url=server.url,
                   backoff=0.01, max_retries=0, progress=False)
    assert s2.rows_in == 2


def test_dry_run_sample_and_cli(pairs_ws, server, capsys):
    ws, case, not_clip = pairs_ws
    opts = dict(backend="openai", model="judge-vlm", base_url=server.url)
    plan = plan_judge(ws, **opts)
    assert (plan.candidates, plan.requests, plan.max_requests) == (8, 8, 16)
    assert plan_judge(ws, Selection(sample=3, seed=1), **opts).candidates == 3
    assert plan_judge(ws, Selection(where="true"), **opts).candidates == 9  # replaces CLIP's
    main(["judge", "-w", str(ws.root), "--backend", "openai", "--model", "judge-vlm",
          "--base-url", server.url, "--dry-run", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["candidates"], out["requests"]) == (8, 8)
    assert server.bodies == []  # a dry run asks nothing
    main(["judge", "-w", str(ws.root), "--backend", "openai", "--model", "judge-vlm",
          "--base-url", server.url, "--where", "instruction LIKE :c", "-p", "c", "%#good"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "judge: 2 candidates, 2 requests to openai " \
                                           "judge-vlm (at most 4 if invalid answers are " \
                                           "asked again)"
    assert "judge: run" in captured.out and "2 done, 0 failed of 2 rows" in captured.out
    main(["filter", "-w", str(ws.root), "--judge-min", "instruction=5", "--top-k", "10",
          "--json"])
    res = json.loads(capsys.readouterr().out)
    # the two judged rows score 5; one of them fails CLIP's clip_sim_dir
    assert res["accepted"] == 1 and res["thresholds"]["free"]["judge_instruction_min"] == 5


def test_judge_bound_is_one_clear_error_on_the_cli(pairs_ws, capsys):
    ws, _, _ = pairs_ws
    with pytest.raises(SystemExit) as e:
        from ultracurate.cli import main as cli
        cli(["filter", "-w", str(ws.root), "--judge-min", "quality=9"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: threshold judge_quality >= 9 can never hold (judge_quality is in "
                   "[1, 5]); no row would pass"]


# -- the tiny local judge ----------------------------------------------------------------------
@pytest.fixture
def tiny_judge(tiny_dir):
    from ultracurate.models import make_tiny
    return make_tiny(tiny_dir, ("judge",))["judge"]


def test_tiny_local_judge_answers_json_under_its_grammar(pairs_ws, tiny_judge):
    ws, case, not_clip = pairs_ws
    # without the grammar a random model's answer is not JSON: recorded, the rows failed
    s = run(ws, "judge", Selection(where="candidate_id = $c", params={"c": case["good"]}),
                  progress=False)
    rows, state = _judged(ws)
    assert s.rows_failed == 1 and state[case["good"]][0] == "failed"
    assert rows[case["good"]]["judge_invalid_reason"].startswith(
        "no valid answer after 1 try: ")  # greedy decoding: asking again would not help
    # under the tiny-judge grammar: JSON with scores in range, from the model's logits
    s = run(ws, "judge", grammar="tiny-judge", batch_size=3, progress=False)
    rows, state = _judged(ws)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (8, 8, 0)
    judged = [rows[c] for c in case.values()]
    for r in judged:
        assert all(1 <= r[f"judge_{a}"] <= 5 for a in ("instruction", "preservation",
                                                         "quality"))
        assert re.fullmatch(r"the (edit|change|result) (looks|seems|is) "
                            r"(faithful|partial|unclear|clean|blurry|wrong)",
                            r["judge_rationale"])
        assert r["judge_model"] == tiny_judge and r["judge_invalid_reason"] is None
        assert r["judge_prompt"] == "judge-v1+grammar:tiny-judge"
    # a rerun has nothing left to do; the run recorded the judge
    assert run(ws, "judge", grammar="tiny-judge", progress=False).rows_in == 0
    with ws.catalog(read_only=True) as cat:
        models = json.loads(cat.scalar("SELECT models FROM runs WHERE stage = 'judge' "
                                       "ORDER BY run_id DESC LIMIT 1"))
    assert models["judge"]["model"] == tiny_judge
    assert models["judge"]["grammar"] == "tiny-judge"


def test_bad_grammar_or_prompt_is_one_error_before_any_run(pairs_ws, tiny_judge, tmp_path):
    ws, _, _ = pairs_ws
    with pytest.raises(UltracurateError, match="no grammar 'nope'"):
        run(ws, "judge", grammar="nope", progress=False)
    prompt = tmp_path / "judge-x.txt"
    prompt.write_text("Rate the edit.\n")
    with pytest.raises(UltracurateError, match=r"judge prompt judge-x has no \$instruction"):
        run(ws, "judge", prompt=str(prompt), progress=False)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'judge'") == 0


# -- the report ---------------------------------------------------------------------------------
def test_report_shows_how_often_clip_and_the_judge_disagree(pairs_ws, tmp_path):
    from ultracurate.report import judge_confusion, write_report
    ws, case, not_clip = pairs_ws
    verdicts = {"good": (5, 5, 5), "low": (2, 5, 5), "fenced": (4, 4, 4)}
    with ws.catalog() as cat:
        for k, (i, p, q) in verdicts.items():
            cat.con.execute("UPDATE candidates SET judge_instruction = ?, judge_preservation "
                            "= ?, judge_quality = ?, judge_rationale = 'r', judge_run = 1 "
                            "WHERE candidate_id = ?", [i, p, q, case[k]])
        cat.con.execute("UPDATE candidates SET judge_instruction = 5, judge_preservation = 5, "
                        "judge_quality = 5, judge_run = 1 WHERE candidate_id = ?", [not_clip])
        cat.con.execute("UPDATE candidates SET judge_invalid_reason = 'no rationale' "
                        "WHERE candidate_id = ?", [case["down"]])
        conf = judge_confusion(cat, Selection(), Thresholds.preset("ultraedit"))
    # CLIP passes good, low, fenced (judge: pass, fail, pass); fails not_clip (judge: pass)
    assert conf["table"] == {(True, True): 2, (True, False): 1, (False, True): 1}
    assert (conf["judged"], conf["not_judged"], conf["invalid"]) == (4, 5, 1)
    assert [r["candidate_id"] for r in conf["disagree"]] == [case["low"], not_clip]
    html = write_report(ws, tmp_path / "r.html").read_text()
    assert "CLIP and the judge" in html and "disagree on 2" in html


@pytest.mark.slow
def test_judge_on_the_ray_engine(pairs_ws, tiny_judge):
    """Two Ray workers each load the tiny judge and rate their batches; the driver alone
    writes, and the scores are what the local engine gives."""
    import ray

    from ultracurate.runner import RayEngine
    ws, case, _ = pairs_ws
    local = run(ws, "judge", grammar="tiny-judge", batch_size=2, progress=False)
    assert local.rows_done == len(CASES)
    want, _ = _judged(ws)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run(ws, "judge", grammar="tiny-judge", batch_size=2, force=True,
                      engine=RayEngine(num_workers=2), progress=False)
    finally:
        ray.shutdown()
    got, _ = _judged(ws)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (len(CASES), len(CASES), 0)
    cols = ("judge_instruction", "judge_preservation", "judge_quality", "judge_rationale")
    assert {c: [got[c][k] for k in cols] for c in case.values()} == \
        {c: [want[c][k] for k in cols] for c in case.values()}
    assert {got[c]["judge_run"] for c in case.values()} == {s.run_id}
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT engine FROM runs WHERE run_id = ?", [s.run_id]) == "ray"
