"""Workspace, catalog schema and migrations, the media store, and models profiles."""

import json

import duckdb
import pytest

from ultracurate.catalog import SCHEMA_VERSION, Catalog, migrations
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


# -- the table API -------------------------------------------------------------------------------
def _edit(i, **kw):
    return {"edit_id": i, "anchor_id": 1, "source_caption": "a cat", "instruction": "x",
            "target_caption": "a dog", "edit_type": "replace", "mode": "free", **kw}


def test_writes_are_cast_to_the_declared_types(ws):
    """Whatever a writer's rows inferred (a list column None for its first hundred rows, an
    Int64 DataFrame column for an INTEGER, a dict for JSON), the values are stored as the
    types DuckDB declares, read from DuckDB's own description of the table."""
    import polars as pl
    rows = [_edit(i, edit_reasons=None, mask_height=None) for i in range(1, 150)]
    rows.append(_edit(150, edit_reasons=["too long"], mask_height=7, ground_boxes={"boxes": []}))
    with ws.catalog() as cat:
        assert cat.edits.types["exemplar_ids"] == "VARCHAR[]" and cat.edits.key == "edit_id"
        with cat.transaction():
            assert cat.edits.insert(rows) == 150
            cat.edits.update(pl.DataFrame({"edit_id": [1, 2], "exemplar_ids": [["a", "b"], None],
                                           "mask_width": [640, 480]}))
        got = cat.query("SELECT edit_id, edit_reasons, mask_height, exemplar_ids, mask_width, "
                        "ground_boxes, typeof(mask_width) AS t FROM edits "
                        "WHERE edit_id IN (1, 150) ORDER BY 1")
    assert got[0]["exemplar_ids"] == ["a", "b"] and got[0]["mask_width"] == 640
    assert got[0]["t"] == "INTEGER"
    assert got[1]["edit_reasons"] == ["too long"] and got[1]["mask_height"] == 7
    assert json.loads(got[1]["ground_boxes"]) == {"boxes": []}


@pytest.mark.parametrize("table, rows, allowed, error, match", [
    ("edits", [_edit(1, nonsense=1)], None, "UndeclaredWrite", "edits has no column 'nonsense'"),
    ("edits", [_edit(1, mask_class="fine")], {"mask_area"}, "UndeclaredWrite",
     r"undeclared columns \['anchor_id', 'edit_type', 'instruction', 'mask_class'"),
    ("edits", [_edit(1, mask_height=2**40)], None, "WriteError", "edits.mask_height as INTEGER"),
    ("edits", [_edit(1, mask_area="large")], None, "WriteError", "edits.mask_area as DOUBLE"),
    ("edits", [_edit("e1")], None, "WriteError", "edits.edit_id as BIGINT"),
    ("nowhere", [{"x": 1}], None, "UndeclaredWrite", "no table 'nowhere'"),
])
def test_a_write_the_schema_does_not_declare_is_refused(ws, table, rows, allowed, error,
                                                         match):
    """A column the table lacks, one the writer did not declare, a value that does not fit its
    column: refused with the table and column named, before anything is written."""
    from ultracurate import catalog
    with ws.catalog() as cat:
        with pytest.raises(getattr(catalog, error), match=match):
            with cat.transaction():
                cat.table(table).insert(rows, allowed=allowed)
        assert cat.scalar("SELECT count(*) FROM edits") == 0


def test_insert_missing_adds_only_new_rows(ws):
    row = {"source_path": "/a.jpg", "reason": "bad", "sha256": None}
    with ws.catalog() as cat:
        assert cat.ingest_rejects.insert_missing([row, row], on=("source_path", "sha256")) == 1
        assert cat.ingest_rejects.insert_missing([row, {**row, "sha256": "ab"}],
                                                 on=("source_path", "sha256")) == 1
        assert cat.ingest_rejects.count() == 2


def test_migration_011_moves_reject_reasons_and_boxes_out_of_list_columns(tmp_path):
    """A catalog from before 011 keeps every reject reason (one row each, in order) and every
    mask box (four scalar columns); the views list them as before."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    before = [(v, sql) for v, _, sql in migrations() if v < 11]
    for _, sql in before:
        con.execute(sql)
    con.execute("INSERT INTO schema_meta VALUES ('schema_version', ?)", [str(before[-1][0])])
    con.execute("""INSERT INTO anchors (anchor_id, sha256, media, width, height)
                   VALUES (1, 'a', 'a.jpg', 8, 8)""")
    con.execute("""INSERT INTO edits (edit_id, anchor_id, source_caption, instruction,
                   target_caption, edit_type, mode, mask_bbox) VALUES
        (1, 1, 's', 'i', 't', 'add', 'region', [1, 2, 3, 4]),
        (2, 1, 's', 'i', 't', 'add', 'free', NULL)""")
    con.execute("""INSERT INTO candidates (candidate_id, edit_id, candidate_index, seed,
                   auto_status, reject_reasons, filter_run) VALUES
        (1, 1, 0, 0, 'rejected', ['clip_sim_image < 0.75', 'clip_sim_dir < 0.22'], 7),
        (2, 1, 1, 0, 'accepted', NULL, 7),
        (3, 2, 0, 0, 'rejected', ['not in top 4 by clip_sim_dir'], 8)""")
    con.close()
    with Catalog(path) as cat:
        assert "reject_reasons" not in cat.columns("candidates")
        assert "mask_bbox" not in cat.columns("edits")
        reasons = cat.query("SELECT candidate_id, reject_reasons FROM candidates_v "
                            "ORDER BY candidate_id")
        rows = cat.query("SELECT * FROM candidate_rejects ORDER BY candidate_id, reason_index")
        boxes = cat.query("SELECT edit_id, mask_bbox, mask_bbox_x, mask_bbox_h FROM edits_v "
                          "ORDER BY edit_id")
    assert reasons == [
        {"candidate_id": 1, "reject_reasons": ["clip_sim_image < 0.75", "clip_sim_dir < 0.22"]},
        {"candidate_id": 2, "reject_reasons": None},
        {"candidate_id": 3, "reject_reasons": ["not in top 4 by clip_sim_dir"]}]
    assert [(r["candidate_id"], r["reason_index"], r["filter_run"]) for r in rows] == [
        (1, 0, 7), (1, 1, 7), (3, 0, 8)]
    assert boxes == [{"edit_id": 1, "mask_bbox": [1, 2, 3, 4], "mask_bbox_x": 1, "mask_bbox_h": 4},
                     {"edit_id": 2, "mask_bbox": None, "mask_bbox_x": None, "mask_bbox_h": None}]


@pytest.mark.parametrize("scope", ["materialized", "registered", "both"])
def test_a_statement_that_fails_in_a_transaction_raises_its_own_error(ws, scope):
    """A failed statement aborts its transaction; the temp tables and registrations the
    block made are cleaned up quietly, so the error raised is the statement's (not DuckDB's
    refusal of the cleanup in an aborted transaction), the rollback leaves no temp table,
    and the catalog takes the next transaction."""
    import contextlib

    import pyarrow as pa
    with ws.catalog() as cat:
        with pytest.raises(duckdb.ConversionException):
            with cat.transaction(), contextlib.ExitStack() as blocks:
                if scope in ("materialized", "both"):
                    blocks.enter_context(cat.materialized("SELECT 1 AS x"))
                if scope in ("registered", "both"):
                    blocks.enter_context(cat.registered(pa.table({"a": [1]})))
                cat.con.execute("SELECT 'x'::INTEGER")
        assert cat.scalar("SELECT count(*) FROM duckdb_tables() WHERE temporary") == 0
        with cat.transaction(), cat.materialized("SELECT 2 AS x") as t:
            assert cat.scalar(f"SELECT x FROM {t}") == 2
