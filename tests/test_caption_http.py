"""The caption stage against a loopback OpenAI-compatible vision server (tests/_loopback.py):
real photos (crops of a demo photo, told apart by their size) go as JPEG data URLs, and the
server answers well, with quotes, with malformed or non-text bodies, with garbage, with 429
(Retry-After), with 5xx, or too slowly, depending on the photo."""

import base64
import io
import json
import time

import pytest
from PIL import Image

from _loopback import LoopbackServer, completion
from ultracurate.runner import run
from ultracurate.stages.ingest import IngestStage, discover

KEY = "vision-key-456"
GOOD = "a ginger cat resting on a wooden floor"

# photo width -> what the server does on each successive call (the last entry repeats)
SCRIPT = {
    40: ["good"],
    41: ["quoted"],
    42: ["429", "good"],
    43: ["500", "500", "good"],
    44: ["500"],
    45: ["not_json_body", "good"],
    46: ["list_content"],
    47: ["garbage", "good"],
    48: ["too_long"],
    49: ["sleep", "good"],
}
ANSWERS = {"good": GOOD, "quoted": '"A ginger cat on a floor."',
           "garbage": "\x00\x01 ## \x02 ##", "too_long": " ".join(["cat"] * 61 + ["floor"])}


class VisionServer(LoopbackServer):
    def __init__(self):
        super().__init__()
        self.override: dict[int, str] = {}
        self.when: dict[int, list[float]] = {}

    def answer(self, body, headers):
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        width = im.size[0]
        n = self.count(str(width))
        with self.lock:
            self.when.setdefault(width, []).append(time.monotonic())
        steps = SCRIPT[width]
        what = self.override.get(width) or steps[min(n, len(steps) - 1)]
        if what == "sleep":
            self.sleep(1.5)
            what = "good"
        if what == "429":
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}
        if what == "500":
            return 500, {"error": {"message": "overloaded"}}, {}
        if what == "not_json_body":
            return 200, b"<html>oops</html>", {}
        if what == "list_content":
            return 200, {"choices": [{"message": {"content": ["a", "cat"]}}]}, {}
        return 200, completion(ANSWERS[what]), {}


@pytest.fixture
def server():
    s = VisionServer()
    yield s
    s.close()


@pytest.fixture
def crops_ws(ws, demo_photos, tmp_path):
    """Anchors ingested without captions: crops of a real photo, 40 to 49 pixels wide."""
    folder = tmp_path / "crops"
    folder.mkdir()
    photo = Image.open(demo_photos.parent / "chelsea.jpg")
    for w in SCRIPT:
        photo.crop((100, 50, 100 + w, 50 + 36)).save(folder / f"crop{w}.png")
    s = run(ws, IngestStage(items=discover([folder])), progress=False)
    assert s.extra["anchors_without_caption"] == len(SCRIPT)
    return ws


def _width_of(cat):
    return dict(cat.con.execute("SELECT anchor_id, width FROM anchors").fetchall())


def test_caption_through_a_vision_endpoint(crops_ws, server, monkeypatch):
    ws = crops_ws
    monkeypatch.setenv("ULTRACURATE_VLM_API_KEY", KEY)
    kw = dict(backend="openai", model="test-vlm", base_url=server.url, concurrency=3,
              timeout=0.5, max_retries=2, backoff=0.01, max_attempts=2, batch_size=5,
              progress=False)
    s = run(ws, "caption", **kw)
    with ws.catalog(read_only=True) as cat:
        width = _width_of(cat)
        caps = cat.query("SELECT * FROM anchor_captions ORDER BY anchor_id, caption_index")
        state = {width[k]: (st, err) for k, st, err in cat.con.execute(
            "SELECT key, state, error FROM stage_state WHERE stage = 'caption'").fetchall()}
        run_row = cat.query("SELECT params, models, message FROM runs WHERE run_id = ?",
                        [s.run_id])[0]
    valid = {width[r["anchor_id"]]: r["caption"] for r in caps if not r["invalid_reason"]}
    invalid = {}
    for r in caps:
        if r["invalid_reason"]:
            invalid.setdefault(width[r["anchor_id"]], []).append(r["invalid_reason"])
    # good answers, and transient trouble that recovers (429, 5xx, a non-JSON body, garbage
    # once, a timeout): a caption each, the quotes of a quoted answer trimmed
    assert valid == {40: GOOD, 41: "A ginger cat on a floor.", 42: GOOD, 43: GOOD, 45: GOOD,
                     47: GOOD, 49: GOOD}
    assert all(r["source"] == "caption:test-vlm" and r["model"] == "test-vlm"
               and r["prompt"] == "caption-v1" and r["run_id"] == s.run_id for r in caps)
    # unusable answers are kept with their reasons; asked again, then the anchor fails
    assert invalid[45] == ["server response is not JSON"]
    assert invalid[46] == ["message content is a list, not text"]
    assert "holds control, private or undecodable characters" in invalid[47][0]
    assert invalid[48][0].startswith("too long (62 words") and "repeats itself" in invalid[48][0]
    assert server.calls["46"] == server.calls["48"] == 2
    assert state[46][0] == state[48][0] == "failed"
    assert state[48][1].startswith("anchor ") and "no usable caption after 2 tries (too long" \
        in state[48][1]
    # a server that keeps failing: the anchor fails with the HTTP reason, nothing written
    assert state[44] == ("failed", "openai: HTTP 500: overloaded (after 3 tries)")
    assert 44 not in valid and 44 not in invalid
    assert (s.rows_in, s.rows_done, s.rows_failed) == (10, 7, 3)
    assert server.calls["43"] == 3 and server.calls["49"] == 2
    # Retry-After is honoured (1 s asked; the client's own backoff is 10 ms)
    assert server.when[42][1] - server.when[42][0] >= 0.9
    # the requests: the prompt and the photo as a data URL, bounded concurrency, the key
    # only in the header
    body = server.bodies[0]
    assert body["model"] == "test-vlm" and body["temperature"] == 0.0
    text = [p for p in body["messages"][0]["content"] if p["type"] == "text"][0]["text"]
    assert text.startswith("Write a caption for this photo")
    assert server.max_inflight <= 3
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY not in run_row["params"] + run_row["models"] + (run_row["message"] or "")
    assert KEY not in ws.catalog_path.read_bytes().decode("latin-1")
    assert json.loads(run_row["models"])["captioner"]["model"] == "test-vlm"
    assert run_row["message"] == ("new captions (caption:test-vlm): 7, invalid answers kept with "
                              "their reasons: 4; anchors still without a caption: 3 (the "
                              "failed ones are retried by a rerun)")

    # instruct: the anchors still without a caption fail with that reason
    si = run(ws, "instruct", progress=False)
    assert (si.rows_in, si.rows_done, si.rows_failed) == (10, 7, 3)
    with ws.catalog(read_only=True) as cat:
        errs = [r[0] for r in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'instruct' AND state = 'failed'")
            .fetchall()]
    assert len(errs) == 3 and all("no caption (write one with `ultracurate caption`" in e
                                  for e in errs)

    # a rerun asks only for the failed anchors; the server now answers them
    server.override.update({44: "good", 46: "good", 48: "good"})
    s2 = run(ws, "caption", **kw)
    assert (s2.rows_in, s2.rows_done, s2.rows_failed) == (3, 3, 0)
    assert s2.extra["anchors_without_caption"] == 0
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM anchors_v WHERE len(captions) = 1") == 10


def test_unreachable_endpoint_fails_rows_not_the_job(crops_ws):
    s = run(crops_ws, "caption", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                    max_retries=1, backoff=0.01, timeout=0.5, progress=False)
    assert (s.rows_in, s.rows_failed, s.state) == (10, 10, "completed")
    with crops_ws.catalog(read_only=True) as cat:
        errs = {r[0] for r in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'caption'").fetchall()}
        assert cat.scalar("SELECT count(*) FROM anchor_captions") == 0
    assert errs == {"openai: cannot reach the server (ConnectError) (after 2 tries)"}


def test_captioner_role_names_a_served_model(crops_ws, server):
    ws = crops_ws
    ws.set_config("models", {"captioner": f"{server.url}#role-vlm"})
    from ultracurate.selection import Selection
    s = run(ws, "caption", Selection(where="width = 40"), backoff=0.01, progress=False)
    assert (s.rows_in, s.rows_done) == (1, 1)
    with ws.catalog(read_only=True) as cat:
        assert cat.query("SELECT source, model, caption FROM anchor_captions") == [
            {"source": "caption:role-vlm", "model": "role-vlm", "caption": GOOD}]
