"""The OpenAI-compatible back-end against a loopback chat-completions server (tests/_loopback.py),
which answers well, or with malformed JSON, wrong types, a sleep past the client's timeout,
429, 500 or a body that is not JSON, depending on the caption it is asked about."""

import json

import pytest

from _anchors import set_captions
from _loopback import LoopbackServer, completion
from ultracurate.instruct.rule import propose
from ultracurate.runner import run

KEY = "sekrit-key-123"

# caption -> what the server does on each successive call (the last entry repeats)
SCRIPT = {
    "a brown dog on a green lawn": ["good"],
    "a red car parked on the street": ["malformed"],
    "a white cup on a wooden table": ["wrong_types"],
    "a yellow bus on a road": ["sleep", "good"],
    "a green apple on a plate": ["429", "good"],
    "a man riding a bicycle down a street": ["500", "500", "good"],
    "a cat sleeping on a pillow": ["500"],
    "a lamp next to a bed": ["not_json_body", "good"],
    "a horse grazing in a field": ["malformed", "good"],
}


class Server(LoopbackServer):
    def __init__(self):
        super().__init__()
        self.override: dict[str, str] = {}

    def answer(self, body, headers):
        user = body["messages"][1]["content"]
        caption = user.split("Source caption: ")[1].split("\n")[0]
        edit_type = user.split("Edit type: ")[1].split("\n")[0]
        n = self.count(caption)
        steps = SCRIPT[caption]
        what = self.override.get(caption) or steps[min(n, len(steps) - 1)]
        if what == "sleep":  # the client gives up at its timeout
            self.sleep(1.5)
            what = "good"
        if what in ("429", "500"):
            return (int(what), {"error": {"message": "busy"}},
                    {"Retry-After": "0"} if what == "429" else {})
        if what == "not_json_body":
            return 200, b"<html>oops</html>", {}
        content = {"good": json.dumps(propose(caption, edit_type, 0)),
                   "malformed": '{"instruction": "make it', "wrong_types": json.dumps(
                       {"instruction": 7, "target_caption": ["x"], "edit_type": "zoom"})}[what]
        return 200, completion(content), {}


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_http_backend_against_loopback_server(ingested_ws, server, monkeypatch):
    ws = ingested_ws
    captions = list(SCRIPT)
    with ws.catalog() as cat:
        set_captions(cat, {aid: [cap] for aid, cap in enumerate(captions, 1)})
    monkeypatch.setenv("ULTRACURATE_LLM_API_KEY", KEY)
    kw = dict(backend="openai", model="test-model", base_url=server.url, types="replace",
              per_anchor=1, seed=5, n_instruction_examples=6, n_full_examples=3,
              concurrency=2, timeout=0.5, max_retries=2, backoff=0.01, progress=False)
    s = run(ws, "instruct", **kw)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 8, 1)

    with ws.catalog(read_only=True) as cat:
        edits = {r["source_caption"]: r for r in cat.query("SELECT * FROM edits")}
        state = cat.query("SELECT key, state, error FROM stage_state WHERE stage='instruct'")
        run_row = cat.query("SELECT params, models FROM runs WHERE run_id = ?", [s.run_id])[0]
    # 500 past the retries: the anchor failed (nothing written), with the reason
    failed = [r for r in state if r["state"] == "failed"]
    assert [r["key"] for r in failed] == [7]
    assert "HTTP 500: busy (after 3 tries)" in failed[0]["error"]
    assert "a cat sleeping on a pillow" not in edits
    # transient trouble (timeout, 429, 500, a non-JSON body, one malformed answer) recovers
    for cap in ("a brown dog on a green lawn", "a yellow bus on a road",
                "a green apple on a plate", "a man riding a bicycle down a street",
                "a lamp next to a bed", "a horse grazing in a field"):
        r = edits[cap]
        assert r["edit_status"] == "proposed", (cap, r["edit_reasons"])
        assert r["edit_type"] == "replace" and r["mode"] == "region"
        assert r["instruct_backend"] == "openai" and r["instruct_model"] == "test-model"
        assert r["prompt_version"] == "instruct-v1" and len(r["exemplar_ids"]) == 9
    assert server.calls["a yellow bus on a road"] == 2   # timed out once, then answered
    assert server.calls["a man riding a bicycle down a street"] == 3
    assert edits["a horse grazing in a field"]["edit_reasons"] is None
    # answers that never validate are kept as invalid rows with every try's reason
    bad = edits["a red car parked on the street"]
    assert bad["edit_status"] == "invalid" and len(bad["edit_reasons"]) == 3
    assert all("answer is not" in r and "JSON" in r for r in bad["edit_reasons"])
    wrong = edits["a white cup on a wooden table"]
    assert wrong["edit_status"] == "invalid"
    assert any("'instruction' is a int" in r for r in wrong["edit_reasons"])
    assert server.calls["a red car parked on the street"] == 3
    # the requests: JSON mode, the seed, bounded concurrency, the key only in the header
    assert all(b["response_format"] == {"type": "json_object"} for b in server.bodies)
    assert all(b["model"] == "test-model" for b in server.bodies)
    assert server.max_inflight <= 2
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY not in run_row["params"] and KEY not in run_row["models"]
    with ws.catalog(read_only=True) as cat:
        dump = json.dumps(cat.query("SELECT * FROM runs") + cat.query("SELECT * FROM edits")
                          + cat.query("SELECT * FROM stage_state"), default=str)
    assert KEY not in dump
    assert KEY not in ws.catalog_path.read_bytes().decode("latin-1")

    # a rerun retries only the failed anchor
    server.override["a cat sleeping on a pillow"] = "good"
    s2 = run(ws, "instruct", **kw)
    assert (s2.rows_in, s2.rows_done, s2.rows_failed) == (1, 1, 0)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT edit_status FROM edits WHERE anchor_id = 7") == "proposed"
        assert cat.scalar("SELECT count(*) FROM edits") == 9


def test_unreachable_server_fails_rows_not_the_job(ingested_ws):
    s = run(ingested_ws, "instruct", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                     types="add", max_retries=1, backoff=0.01, timeout=0.5, progress=False,
                     n_instruction_examples=2, n_full_examples=1)
    assert (s.rows_in, s.rows_failed, s.state) == (9, 9, "completed")
    with ingested_ws.catalog(read_only=True) as cat:
        errs = {r[0] for r in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'instruct'").fetchall()}
        assert cat.scalar("SELECT count(*) FROM edits") == 0
    assert errs == {"openai: cannot reach the server (ConnectError) (after 2 tries)"}


def test_backend_from_workspace_role_custom_prompt_and_mode(ingested_ws, server, tmp_path):
    import importlib.resources
    ws = ingested_ws
    with ws.catalog() as cat:
        set_captions(cat, {aid: ["a brown dog on a green lawn"] for aid in range(1, 10)})
    ws.set_config("models", {"llm": f"{server.url}#cfg-model"})
    prompt = tmp_path / "my-prompt.txt"
    text = importlib.resources.files("ultracurate").joinpath("prompts", "instruct-v1.txt")
    prompt.write_text(text.read_text().replace("### user\n", "### user\nBe brief.\n"))
    from ultracurate.selection import Selection
    s = run(ws, "instruct", Selection(limit=2), types="change_global", mode="region",
                     prompt=str(prompt), n_instruction_examples=3, n_full_examples=1,
                     progress=False)
    assert s.rows_done == 2
    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT * FROM edits")
    assert {(r["instruct_backend"], r["instruct_model"], r["prompt_version"], r["mode"],
             r["edit_object"]) for r in rows} == \
        {("openai", "cfg-model", "my-prompt", "region", "NONE")}
    assert all(b["messages"][1]["content"].startswith("Be brief.") for b in server.bodies)
