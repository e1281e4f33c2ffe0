"""The review App for real: `ultracurate review` serves FiftyOne's App on loopback, headless
Chromium (Debian's chromium + chromium-driver, installed by scripts/setup-test-deps.sh) opens
it through the WebDriver protocol, and the page shows the workspace's dataset and its sample
count. Tags set while the App runs are pulled into the catalog when the session is stopped
(Ctrl-C). The screenshot is kept as tests/artifacts/review_app.png.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_review import fo_db, make_candidates, review_ws  # noqa: F401  (fixtures)

ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, fn, timeout: float, every: float = 0.5):
    """Poll fn until it returns something truthy; fail naming what was awaited."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            got = fn()
            if got:
                return got
        except Exception as e:  # not up yet
            last = e
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


class WebDriver:
    """The few W3C WebDriver calls the test needs, spoken to chromedriver over plain HTTP."""

    def __init__(self, user_data_dir: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(["chromedriver", f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until("chromedriver", lambda: self._call("GET", "/status")["ready"], 30, 0.2)
        args = ["--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,900",
                f"--user-data-dir={user_data_dir}"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": shutil.which("chromium"), "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body=None):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str):
        return self._call("POST", f"/session/{self.session}/execute/sync",
                          {"script": script, "args": []})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(
            self._call("GET", f"/session/{self.session}/screenshot")))

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


def _listening_address(port: int) -> str | None:
    import psutil
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            return c.laddr.ip
    return None


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver: run "
                           "scripts/setup-test-deps.sh")
def test_app_on_loopback_shows_dataset_and_pulls_tags_on_exit(review_ws, tmp_path):
    from ultracurate import review
    ws = review_ws
    built = review.build_review_dataset(ws, progress=False)
    ds = review.open_review_dataset(ws)
    n_groups = len(ds)
    n_samples = len(ds.select_group_slices(_allow_mixed=True))

    port = _free_port()
    env = dict(os.environ, ULTRACURATE_PROGRESS="0", PYTHONUNBUFFERED="1")
    log_path, out_path = tmp_path / "review.log", tmp_path / "review.json"
    log, out = open(log_path, "w"), open(out_path, "w")
    # --json: the URL goes to stderr, stdout is one JSON document when the session ends
    proc = subprocess.Popen([sys.executable, "-m", "ultracurate.cli", "review", "-w",
                             str(ws.root), "--port", str(port), "--reviewer", "app-user",
                             "--json"], stdout=out, stderr=log, env=env,
                            start_new_session=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _until("the App's page", lambda: urllib.request.urlopen(url, timeout=5).status == 200,
               120)
        assert _listening_address(port) == "127.0.0.1"  # loopback only, by default

        def printed():  # read through a path of its own: the child shares log's offset
            return url in log_path.read_text()
        _until("the command to print its URL", printed, 60)

        driver = WebDriver(tmp_path / "chromium-profile")
        driver.get(url)

        def page():
            name = driver.js("const e = document.querySelector("
                             "'[data-cy=selector-dataset]'); return e ? e.value : null")
            text = driver.js("return document.body ? document.body.innerText : ''")
            m = re.search(r"([\d,]+) (samples|groups)", text or "")
            return (name, int(m.group(1).replace(",", "")), text) if name and m else None

        name, count, text = _until("the dataset and its count in the page", page, 90, 1)
        # for a useful screenshot: close the App's promotion, let the grid draw its images
        driver.js("for (const b of document.querySelectorAll('button, div[role=button]')) "
                  "{ if (b.innerText && b.innerText.trim() === 'Dismiss') b.click(); }")
        # one thumbnail (a canvas) per group: the edited slice of each candidate
        _until("the grid's thumbnails", lambda: driver.js(
            "return document.querySelectorAll('canvas').length") >= n_groups, 30, 0.5)
        time.sleep(1.5)  # let them paint before the screenshot
        ARTIFACTS.mkdir(exist_ok=True)
        driver.screenshot(ARTIFACTS / "review_app.png")
        (ARTIFACTS / "review_app.txt").write_text(text)
        assert name == built.dataset
        assert count == n_samples == 33 and n_groups == 9  # every slice of the 9 groups
        assert (ARTIFACTS / "review_app.png").stat().st_size > 10_000

        # a reviewer tags while the App runs; stopping the session pulls the tags
        ds.select_group_slices("edited").match({"candidate_id": 7}).tag_samples(
            ["reject", "bad_instruction"])
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
        out.close()
        output = log_path.read_text()
    assert proc.returncode == 0, output[-2000:]
    result = json.loads(out_path.read_text())
    assert result["dataset"] == built.dataset and result["pull"]["changed"] == 1
    with ws.catalog(read_only=True) as cat:
        row = cat.query("SELECT human_decision, human_tags, reviewer, status FROM candidates_v "
                        "WHERE candidate_id = 7")[0]
    assert row == {"human_decision": "reject", "human_tags": ["bad_instruction", "reject"],
                   "reviewer": "app-user", "status": "rejected"}
