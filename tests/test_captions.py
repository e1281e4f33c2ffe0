"""Every caption kept: captions of the same content merge across table rows, files and later
ingests (COCO's several per image, CSV rows per path, a captions file for anchors already in
the catalog, a byte-identical copy), de-duplicated and in order of arrival, each with its
source; ingest says how many it added and how many anchors have none; `--where` on captions
keeps working; a catalog of schema 1 migrates with its captions."""

import json
import shutil

import duckdb
import pytest

from ultracurate.catalog import Catalog, migrations
from ultracurate.runner import run
from ultracurate.selection import Selection, selected_keys_sql
from ultracurate.stages.ingest import IngestStage, discover


def _ingest(ws, paths, **kw):
    return run(ws, IngestStage(items=discover(paths, **kw)), progress=False)


def _captions(ws) -> dict[str, list[tuple[str, str]]]:
    """file name -> [(caption, source)] in the catalog's order."""
    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT source_path, captions, caption_sources FROM anchors_v")
    return {r["source_path"].rsplit("/", 1)[-1]: list(zip(r["captions"], r["caption_sources"]))
            for r in rows}


@pytest.fixture
def photos(tmp_path, demo_photos):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(demo_photos.parent / name, d / name)
    return d


def test_captions_merge_across_rows_files_and_ingests(ws, photos, tmp_path, capsys):
    from ultracurate.cli import main
    # a folder with a CSV of captions: two rows for one path, a duplicate in other spacing
    csv = tmp_path / "caps.csv"
    csv.write_text("path,caption\nchelsea.jpg,a cat\ncoffee.jpg,a cup of coffee\n"
                   "chelsea.jpg,a ginger cat\nchelsea.jpg,  a   cat \n")
    main(["ingest", str(photos), "--captions", str(csv), "-w", str(ws.root)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("3 done, 0 failed of 3 rows")
    assert out[1:] == ["  new anchors: 3, new captions: 3",
                       "  anchors without a caption: 1; write theirs with `ultracurate "
                       "caption` (or ingest a captions table for them)"]
    assert _captions(ws) == {"chelsea.jpg": [("a cat", "ingest"), ("a ginger cat", "ingest")],
                             "coffee.jpg": [("a cup of coffee", "ingest")], "rocket.jpg": []}

    # COCO: several captions per image; its chelsea is a byte-identical copy elsewhere
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    shutil.copy(photos / "chelsea.jpg", coco / "images" / "cat.jpg")
    (coco / "captions.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "cat.jpg"}],
        "annotations": [{"image_id": 7, "caption": "an orange cat"},
                        {"image_id": 7, "caption": "a cat"},
                        {"image_id": 7, "caption": "a cat lying on the floor"}]}))
    s = _ingest(ws, [coco / "captions.json"])
    assert (s.rows_in, s.rows_failed) == (1, 1)  # the copy is recorded as a duplicate ...
    assert s.extra["captions_added"] == 2          # ... and its new captions merged
    assert _captions(ws)["chelsea.jpg"] == [
        ("a cat", "ingest"), ("a ginger cat", "ingest"), ("an orange cat", "coco"),
        ("a cat lying on the floor", "coco")]
    with ws.catalog(read_only=True) as cat:
        dup = cat.query("SELECT * FROM ingest_rejects")[0]
        chelsea = cat.scalar("SELECT anchor_id FROM anchors WHERE source_path LIKE "
                             "'%chelsea.jpg'")
    assert dup["source_path"].endswith("cat.jpg") and dup["duplicate_of"] == chelsea
    assert dup["reason"].endswith(f"duplicate of anchor {chelsea} (same bytes)")

    # a later captions file for anchors already in the catalog (jsonl, lists): only the
    # items that bring something new are done, and the summary says how many captions
    table = tmp_path / "more.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in [
        {"path": str(photos / "rocket.jpg"), "captions": ["a white rocket", "a rocket"]},
        {"path": str(photos / "coffee.jpg"), "captions": ["a cup of coffee"]},
        {"path": str(coco / "images" / "cat.jpg"), "captions": ["a sleepy cat"]}]))
    s = _ingest(ws, [table])
    assert (s.rows_in, s.rows_done, s.extra["captions_added"]) == (2, 2, 3)
    assert s.extra["anchors_without_caption"] == 0
    caps = _captions(ws)
    assert caps["rocket.jpg"] == [("a white rocket", "ingest"), ("a rocket", "ingest")]
    assert caps["chelsea.jpg"][-1] == ("a sleepy cat", "ingest")  # through its copy
    assert caps["coffee.jpg"] == [("a cup of coffee", "ingest")]
    # the same again: nothing to do; the copy is not recorded twice
    s = _ingest(ws, [table, coco / "captions.json"])
    assert (s.rows_in, s.extra["captions_added"]) == (0, 0)
    # --force reads every file again: same anchors, same captions, the copy still a
    # duplicate but not recorded twice
    s = run(ws, IngestStage(items=discover([photos, coco / "captions.json"])), force=True,
                  progress=False)
    assert (s.rows_in, s.rows_failed, s.extra["anchors_added"], s.extra["captions_added"]) \
        == (4, 1, 0, 0)
    assert _captions(ws) == caps
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM ingest_rejects") == 1
        assert cat.scalar("SELECT count(*) FROM anchors") == 3

    # --where predicates on captions keep working
    with ws.catalog(read_only=True) as cat:
        def pick(where, **params):
            sql, p = selected_keys_sql(cat.con, "anchors_v", "anchor_id",
                                       Selection(where=where, params=params),
                                       columns="source_path")
            return sorted(r[0].rsplit("/", 1)[-1] for r in cat.con.execute(sql, p).fetchall())
        assert pick("list_contains(captions, :c)", c="a rocket") == ["rocket.jpg"]
        assert pick("len(captions) >= 5") == ["chelsea.jpg"]
        assert pick("list_contains(caption_sources, 'coco')") == ["chelsea.jpg"]
        assert pick("captions[1] LIKE 'a cup%'") == ["coffee.jpg"]


def test_catalog_of_schema_1_migrates_with_its_captions(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    version, _, sql = migrations()[0]
    assert version == 1
    con.execute(sql)
    con.execute("INSERT INTO schema_meta VALUES ('schema_version', '1')")
    con.execute("""INSERT INTO anchors (anchor_id, sha256, media, source_path, dataset, width,
                   height, captions, ingest_run) VALUES
        (1, 'a', 'a.jpg', '/p/a.jpg', 'coco', 8, 8, ['a cat', ' a  cat', 'a dog', ''], 1),
        (2, 'b', 'b.jpg', '/p/b.jpg', 'photos', 8, 8, [], 1),
        (3, 'c', 'c.jpg', '/p/c.jpg', 'ultraedit:free', 8, 8, NULL, 2),
        (4, 'd', 'd.jpg', '/p/d.jpg', 'import-magicbrush', 8, 8, ['a bus'], 3)""")
    con.close()
    with Catalog(path) as cat:
        assert cat.schema_version() >= 2
        assert "captions" not in cat.columns("anchors")
        got = cat.query("SELECT anchor_id, captions, caption_sources FROM anchors_v "
                        "ORDER BY anchor_id")
        runs = cat.query("SELECT DISTINCT anchor_id, run_id FROM anchor_captions "
                         "ORDER BY anchor_id")
    assert got == [
        {"anchor_id": 1, "captions": ["a cat", "a dog"], "caption_sources": ["coco", "coco"]},
        {"anchor_id": 2, "captions": [], "caption_sources": []},
        {"anchor_id": 3, "captions": [], "caption_sources": []},
        {"anchor_id": 4, "captions": ["a bus"], "caption_sources": ["import:magicbrush"]}]
    assert runs == [{"anchor_id": 1, "run_id": 1}, {"anchor_id": 4, "run_id": 3}]


def test_add_captions_orders_and_dedups_in_one_batch(ws):
    with ws.catalog() as cat:
        cat.con.execute("INSERT INTO anchors (anchor_id, sha256, media, width, height) VALUES "
                        "(1, 'a', 'a.jpg', 8, 8), (2, 'b', 'b.jpg', 8, 8)")
        rows = [{"anchor_id": 2, "caption": "b one", "source": "coco"},
                {"anchor_id": 1, "caption": "a one", "source": "ingest"},
                {"anchor_id": 1, "caption": " a  one ", "source": "coco"},
                {"anchor_id": 1, "caption": "a two", "source": "coco"},
                {"anchor_id": 1, "caption": "   ", "source": "coco"}]
        assert cat.anchor_captions.merge(rows, 5) == 3
        assert cat.anchor_captions.merge(rows, 6) == 0
        assert cat.anchor_captions.merge([{"anchor_id": 1, "caption": "a three", "source": "x"}], 7) == 1
        got = cat.query("SELECT anchor_id, caption_index, caption, source, run_id "
                        "FROM anchor_captions ORDER BY anchor_id, caption_index")
    assert got == [
        {"anchor_id": 1, "caption_index": 0, "caption": "a one", "source": "ingest", "run_id": 5},
        {"anchor_id": 1, "caption_index": 1, "caption": "a two", "source": "coco", "run_id": 5},
        {"anchor_id": 1, "caption_index": 2, "caption": "a three", "source": "x", "run_id": 7},
        {"anchor_id": 2, "caption_index": 0, "caption": "b one", "source": "coco", "run_id": 5}]
