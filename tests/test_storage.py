"""The media store in an S3-compatible bucket (moto's server on 127.0.0.1, through s3fs): the
pipeline's stages read and write media there and nothing lands in the workspace's folder; a
bucket the driver cannot reach is refused in one line before anything changes."""

from __future__ import annotations

import hashlib

import pytest

from _clirun import one_line_error, run_many
from _s3 import CREDENTIALS, endpoint, objects, use_bucket  # noqa: F401 (a fixture)
from test_generate_stage import add_edits
from ultracurate.models import make_tiny
from ultracurate.runner import run
from ultracurate.selection import Selection
from ultracurate.stages.ingest import IngestStage, discover
from ultracurate.workspace import MediaStore

pytest.importorskip("s3fs")


@pytest.fixture
def creds(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def test_the_pipeline_runs_with_its_media_in_a_bucket(ws, demo_photos, endpoint, creds,
                                                      tmp_path):
    import datasets
    url = use_bucket(ws, endpoint, "pipeline")
    assert not ws.media.local and ws.media.url == url
    from ultracurate.commands.doctor import CHECKS, run_checks
    [check] = run_checks(ws, skip=tuple(c for c in CHECKS if c != "media"))
    assert check["status"] == "OK" and check["detail"] == f"{url} (object store, reachable)"
    run(ws, IngestStage(items=discover([demo_photos])), progress=False)
    ids = add_edits(ws)
    make_tiny(ws.section("models")["tiny_dir"], ("clip", "dino"))
    free = Selection(where="mode = 'free'")
    gen = run(ws, "generate", free, candidates=2, size=64, progress=False)
    score = run(ws, "score", free, progress=False)
    assert gen.rows_done == 4 and score.rows_done == 4 and score.rows_failed == 0
    with ws.catalog() as cat:
        rows = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
        anchors = cat.query("SELECT media FROM anchors")
        cat.con.execute("UPDATE candidates SET auto_status = 'accepted'")
    assert all(r["clip_sim_dir"] is not None and r["ssim"] is not None for r in rows)
    # every media file is an object of the bucket, named by the sha256 of its bytes
    keys = set(objects(endpoint, "pipeline"))
    names = {a["media"] for a in anchors} | {r[c] for r in rows
                                             for c in ("source_image", "edited_image")}
    assert keys == {f"media/{n[:2]}/{n}" for n in names}
    for n in names:
        assert hashlib.sha256(ws.media.read_bytes(n)).hexdigest() == n.split(".")[0]
    assert not [p for p in (ws.root / "media").rglob("*") if p.is_file()]
    # an export reads the bytes back from the bucket
    out = tmp_path / "export"
    s = run(ws, "export", Selection(), out=out, format="hf", progress=False).result
    assert s.rows == 4
    ds = datasets.load_dataset(str(out))["train"].cast_column(
        "edited_image", datasets.Image(decode=False))
    assert {hashlib.sha256(r["edited_image"]["bytes"]).hexdigest() for r in ds} == {
        r["edited_image"].split(".")[0] for r in rows}
    assert ids  # the edits the candidates came from


def test_writes_to_a_bucket_are_single_puts_and_idempotent(tmp_path, endpoint, creds):
    from _s3 import make_bucket
    make_bucket(endpoint, "puts")
    store = MediaStore("s3://puts/m", {"client_kwargs": {"endpoint_url": endpoint}})
    a = store.put_bytes(b"abc", "bin")
    assert store.put_bytes(b"abc", "bin") == a   # the same bytes, the same object
    assert objects(endpoint, "puts") == [f"m/{a[:2]}/{a}"]
    assert store.read_bytes(a) == b"abc" and store.exists(a) and store.size(a) == 3
    assert list(store.names()) == [a]
    # tools that open files (the FiftyOne App) get a local copy, fetched once
    local = store.local_path(a, tmp_path / "cache")
    assert local == tmp_path / "cache" / a[:2] / a and local.read_bytes() == b"abc"
    assert not list((tmp_path / "cache").rglob("*.part"))
    store.remove(a)
    assert not store.exists(a) and list(store.names()) == []


@pytest.mark.parametrize("media, fragment", [
    ({"url": "s3://no-such-bucket/media"}, "media store s3://no-such-bucket/media is not "
                                           "reachable"),
    ({"url": "s3://pipeline-x/media", "region": "x"}, "[media] region: unknown setting"),
])
def test_an_unreachable_media_store_is_one_line_before_anything_changes(
        ingested_ws, endpoint, creds, media, fragment):
    ws = ingested_ws
    add_edits(ws)
    ws.set_config("media", {**media, "endpoint_url": endpoint})
    res = run_many([["generate", "-w", str(ws.root), "--size", "64", "--candidates", "1"]],
                   env=CREDENTIALS)[0]
    one_line_error(res, fragment, code=1)
    from ultracurate.commands.doctor import CHECKS, run_checks
    [check] = run_checks(ws, skip=tuple(c for c in CHECKS if c != "media"))
    assert check["status"] == "FAIL" and fragment in check["detail"]
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'generate'") == 0
        assert cat.scalar("SELECT count(*) FROM candidates") == 0
