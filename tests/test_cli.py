"""The CLI as a user meets it: complete help, one-line errors with a non-zero exit, --json that a
script can read, and a catalog left as it was after a refused command."""

import json
import os
import subprocess
import sys

import pytest
import typer

from ultracurate.cli import app, join_param_pairs


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, path + (name,))


def test_every_command_has_complete_help():
    root = typer.main.get_command(app)
    seen = 0
    for path, cmd in _walk(root):
        ctx = cmd.make_context("ultracurate " + " ".join(path), ["--help"],
                               resilient_parsing=True)
        text = cmd.get_help(ctx)
        assert "Usage:" in text
        if path:
            assert cmd.help or cmd.short_help, f"{' '.join(path)} has no help text"
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and p.name not in ("help",):
                assert p.help, f"option {p.opts} of '{' '.join(path)}' has no help"
        seen += 1
    names = {p[0] for p, _ in _walk(root) if p}
    assert {"init", "ingest", "stats", "sql", "show", "select", "models", "demo"} <= names
    assert seen > 8


def test_param_pairs_are_joined_for_the_parser():
    assert join_param_pairs(["select", "-p", "n", "5", "--where", "x > :n"]) == \
        ["select", "-p", "n=5", "--where", "x > :n"]
    assert join_param_pairs(["-p", "n=5"]) == ["-p", "n=5"]


def run(*args, cwd=None, env=None):
    e = dict(os.environ, ULTRACURATE_PROGRESS="0")
    e.pop("ULTRACURATE_WORKSPACE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ultracurate.cli", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(res, *fragments):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in lines[0]


def test_cli_end_to_end_and_errors(tmp_path, demo_photos):
    _one_line_error(run("stats", cwd=tmp_path), "no workspace here")
    res = run("init", str(tmp_path / "ws"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["workspace"].endswith("ws")
    _one_line_error(run("init", str(tmp_path / "ws")), "already a workspace")
    ws = str(tmp_path / "ws")
    res = run("ingest", str(demo_photos), "--json", env={"ULTRACURATE_WORKSPACE": ws})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rows_done"] == 9
    # the workspace is found from the current directory too
    stats = json.loads(run("stats", "--json", cwd=tmp_path / "ws" / "media").stdout)
    assert stats["anchors"]["anchors"] == 9
    # --where with -p NAME VALUE
    res = run("select", "--from", "anchors", "--where", "width > :w", "-p", "w", "600",
              "--json", "-w", ws)
    rows = json.loads(res.stdout)
    assert rows and all(r["width"] > 600 for r in rows)
    count = json.loads(run("select", "--from", "anchors", "--count", "--json", "-w", ws).stdout)
    assert count == {"count": 9}
    # refused commands: one line, non-zero, catalog unchanged
    _one_line_error(run("select", "--from", "anchors", "--where", "1=1; DROP TABLE anchors",
                        "-w", ws), "--where")
    _one_line_error(run("sql", "DROP TABLE anchors", "-w", ws), "read-only")
    _one_line_error(run("select", "--from", "nowhere", "-w", ws), "--from")
    _one_line_error(run("show", "a999", "-w", ws), "no row")
    _one_line_error(run("ingest", str(tmp_path / "missing-folder"), "-w", ws), "missing-folder")
    after = json.loads(run("stats", "--json", "-w", ws).stdout)
    assert after["anchors"]["anchors"] == 9
    shown = json.loads(run("show", "a1", "--json", "-w", ws).stdout)
    assert shown["anchor_id"] == 1 and shown["captions"]


@pytest.mark.slow
def test_catalog_busy_is_a_clear_error(tmp_path):
    from ultracurate.workspace import Workspace
    ws = Workspace.init(tmp_path / "ws")
    holder = ws.catalog()  # this process holds the write lock
    try:  # a reader waits ULTRACURATE_LOCK_WAIT seconds for it, then says so in one line
        _one_line_error(run("stats", "-w", str(ws.root), env={"ULTRACURATE_LOCK_WAIT": "0.3"}),
                        "in use by another", "waited 0.3 s")
    finally:
        holder.close()
