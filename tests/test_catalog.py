"""Workspace, catalog schema and migrations, the media store, and models profiles."""

import duckdb
import pytest

from ultracurate.catalog import SCHEMA_VERSION, Catalog
from ultracurate.errors import UltracurateError
from ultracurate.models import resolve
from ultracurate.workspace import Workspace


def test_init_creates_every_part_and_find_locates_it(tmp_path, monkeypatch):
    ws = Workspace.init(tmp_path / "ws")
    for part in ("catalog.duckdb", "lance", "media", "ultracurate.toml"):
        assert (ws.root / part).exists()
    with ws.catalog(read_only=True) as cat:
        assert cat.schema_version() == SCHEMA_VERSION
        views = {r[0] for r in cat.con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert {"anchors_v", "edits_v", "candidates_v"} <= views
    monkeypatch.chdir(ws.root / "media")
    assert Workspace.find().root == ws.root
    monkeypatch.setenv("ULTRACURATE_WORKSPACE", str(ws.root))
    monkeypatch.chdir(tmp_path)
    assert Workspace.find().root == ws.root
    with pytest.raises(UltracurateError, match="not an ultracurate workspace"):
        Workspace.find(tmp_path)


def test_migrations_apply_once_and_a_newer_catalog_is_refused(tmp_path):
    path = tmp_path / "c.duckdb"
    Catalog(path).close()
    Catalog(path).close()  # reopening applies nothing twice
    con = duckdb.connect(str(path))
    assert con.execute("SELECT value FROM schema_meta WHERE key = 'schema_version'"
                       ).fetchall() == [(str(SCHEMA_VERSION),)]
    con.execute("UPDATE schema_meta SET value = ? WHERE key = 'schema_version'",
                [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(UltracurateError, match="newer than this ultracurate"):
        Catalog(path)
    with pytest.raises(UltracurateError, match="newer than this ultracurate"):
        Catalog(path, read_only=True)  # read commands refuse it too


def test_edit_type_must_be_one_of_the_nine(ingested_ws):
    with ingested_ws.catalog() as cat:
        with pytest.raises(duckdb.ConstraintException):
            cat.con.execute("INSERT INTO edits (edit_id, anchor_id, source_caption, "
                            "instruction, target_caption, edit_type, mode) VALUES "
                            "(1, 1, 'a', 'b', 'c', 'recolour', 'free')")


def test_media_store_is_content_addressed_and_atomic(ws):
    name = ws.media.put_bytes(b"hello", "txt")
    assert name.endswith(".txt") and ws.media.path(name).read_bytes() == b"hello"
    assert ws.media.put_bytes(b"hello", "txt") == name  # same bytes, same file
    assert ws.media.path(name).parent.name == name[:2]
    # a partial file left by a killed job is cleaned, never visible under a final name
    ws.media.tmp.mkdir(exist_ok=True)
    (ws.media.tmp / "dead.part").write_bytes(b"half")
    assert ws.media.clean_tmp() == 1 and not list(ws.media.tmp.iterdir())


def test_models_profiles(tmp_path):
    real = Workspace.init(tmp_path / "real")
    assert resolve(real, "editor") == "stabilityai/sdxl-turbo"
    assert resolve(real, "clip") == "ViT-L-14:openai"
    real.set_config("models", {"clip": "/models/my-clip"})
    assert resolve(Workspace(real.root), "clip") == "/models/my-clip"
    tiny = Workspace.init(tmp_path / "tiny", {"models": {"profile": "tiny"}})
    with pytest.raises(UltracurateError, match="make-tiny"):
        resolve(tiny, "sam")


def test_a_one_transaction_job_commits_its_run_with_its_writes_or_nothing(ingested_ws):
    with ingested_ws.catalog() as cat:
        with cat.job("relabel", {"to": "x"}) as run:
            cat.con.execute("UPDATE anchors SET dataset = 'x' WHERE anchor_id <= 2")
            run.rows_in, run.rows_done, run.message = 9, 2, "two"
        row = cat.query("SELECT * FROM runs WHERE stage = 'relabel'")[0]
        assert (row["state"], row["rows_in"], row["rows_done"], row["message"]) == \
            ("completed", 9, 2, "two")
        with pytest.raises(ZeroDivisionError):
            with cat.job("relabel-again", {}) as run:
                cat.con.execute("UPDATE anchors SET dataset = 'y'")
                1 / 0
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'relabel-again'") == 0
        assert cat.scalar("SELECT count(*) FROM anchors WHERE dataset = 'y'") == 0
        assert cat.scalar("SELECT count(*) FROM anchors WHERE dataset = 'x'") == 2


def test_gc_removes_only_unreferenced_media(ingested_ws):
    import json

    from ultracurate.cli import main
    ws = ingested_ws
    orphan = ws.media.put_bytes(b"made by a killed job's first try", "jpg")
    (ws.media.tmp).mkdir(exist_ok=True)
    (ws.media.tmp / "x.part").write_bytes(b"half")
    with ws.catalog(read_only=True) as cat:
        used = [r[0] for r in cat.con.execute("SELECT media FROM anchors").fetchall()]

    def gc(*args):
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(["gc", "-w", str(ws.root), "--json", *args])
        return json.loads(buf.getvalue())
    assert gc("--dry-run")["files"] == [orphan] and ws.media.exists(orphan)
    out = gc()
    assert out["files"] == [orphan] and out["partial"] == 1
    assert not ws.media.exists(orphan)
    assert all(ws.media.exists(n) for n in used) and len(used) == 9
    assert gc()["files"] == []
