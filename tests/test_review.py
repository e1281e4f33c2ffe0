"""Review in FiftyOne against its real MongoDB: the grouped dataset's groups, slices, fields and
saved views; incremental updates; App tags pulled back into the catalog, surviving a re-filter.

FiftyOne's database lives in a temporary folder for the session (FIFTYONE_DATABASE_DIR), unless
the environment already points FiftyOne at a MongoDB of its own.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from ultracurate.catalog import now
from ultracurate.selection import Selection
from ultracurate.runner import run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def fo_db(tmp_path_factory):
    """FiftyOne's database for this test session (a fresh folder; mongod starts on first use)."""
    if "FIFTYONE_DATABASE_URI" not in os.environ:
        os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(tmp_path_factory.mktemp("fodb")))
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    return os.environ.get("FIFTYONE_DATABASE_URI") or os.environ["FIFTYONE_DATABASE_DIR"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_candidates(ws) -> dict:
    """Edits and candidates written straight into the catalog, with real images in the media
    store: per anchor, one region edit (mask from pycocotools) with two candidates and one
    free-form edit with one candidate. Scores, statuses and reasons vary per row."""
    from pycocotools import mask as coco_mask
    import polars as pl
    with ws.catalog() as cat:
        anchors = cat.query("SELECT anchor_id, media, captions FROM anchors_v ORDER BY anchor_id")
        edits, cands, rejects = [], [], []
        eid, cid = 1, 1
        types = ["replace", "add", "change_color", "change_global", "turn"]
        classes = ["fine", "too_small", "fragmented"]
        for i, a in enumerate(anchors[:3]):
            im = np.asarray(Image.open(ws.media.path(a["media"])).convert("RGB").resize((64, 48)))
            m = np.zeros((48, 64), np.uint8)
            m[10 + i:30, 12:40 + i] = 1
            rle = coco_mask.encode(np.asfortranarray(m))["counts"].decode()
            for mode in ("region", "free"):
                edits.append(dict(
                    edit_id=eid, anchor_id=a["anchor_id"],
                    source_caption=f"a photo {i}", instruction=f"make it {mode} {i}",
                    target_caption=f"an edited photo {i}", edit_object="thing" if mode ==
                    "region" else "NONE", edit_type=types[(2 * i + (mode == "free")) % 5],
                    mode=mode, edit_status="grounded",
                    mask_rle=rle if mode == "region" else None,
                    mask_height=48 if mode == "region" else None,
                    mask_width=64 if mode == "region" else None,
                    mask_area=float(m.mean()) if mode == "region" else None,
                    mask_class=classes[i] if mode == "region" else None,
                    created_at=now()))
                for k in range(2 if mode == "region" else 1):
                    edited = im.copy()
                    edited[..., k] = 255 - edited[..., k]
                    src = ws.media.put_bytes(_png(im), "png")
                    dst = ws.media.put_bytes(_png(edited), "png")
                    dir_score = {1: 0.10, 2: 0.21, 3: 0.23}.get(cid, 0.3 + 0.01 * cid)
                    rejected = dir_score < 0.22
                    cands.append(dict(
                        candidate_id=cid, edit_id=eid, candidate_index=k, seed=cid,
                        source_image=src, edited_image=dst, source_is_anchor=False,
                        clip_sim_source=0.3, clip_sim_target=0.31, clip_sim_dir=dir_score,
                        clip_sim_image=0.9, dinov2_sim=0.8, ssim=0.5, l1=0.1, l2=0.02,
                        auto_status="rejected" if rejected else "accepted",
                        gen_run=1, score_run=2, filter_run=3, created_at=now()))
                    if rejected:
                        rejects.append(dict(candidate_id=cid, reason_index=0,
                                            reason="clip_sim_dir < 0.22", filter_run=3))
                    cid += 1
                eid += 1
        # one planned candidate without images: not reviewable
        cands.append(dict(candidate_id=cid, edit_id=1, candidate_index=9, seed=0,
                          auto_status="planned", created_at=now()))
        cat.con.execute("BEGIN")
        cat.edits.insert(pl.DataFrame(edits, infer_schema_length=None))
        cat.candidates.insert(pl.DataFrame(cands, infer_schema_length=None))
        cat.candidate_rejects.insert(rejects)
        cat.con.execute("COMMIT")
    return {"edits": len(edits), "candidates": len(cands) - 1}


@pytest.fixture
def review_ws(ingested_ws, fo_db):
    make_candidates(ingested_ws)
    yield ingested_ws
    from ultracurate import review
    import fiftyone as fo
    name = review.dataset_name(ingested_ws)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def _edited(ds):
    return ds.select_group_slices("edited")


def test_build_groups_slices_fields_and_views(review_ws):
    from ultracurate import review
    ws = review_ws
    s = review.build_review_dataset(ws, progress=False)
    assert (s.selected, s.added, s.updated, s.unchanged) == (9, 9, 0, 0)

    ds = review.open_review_dataset(ws)
    assert ds.media_type == "group"
    assert ds.default_group_slice == "edited"
    assert set(ds.group_slices) == {"anchor", "source", "edited", "mask"}
    # one group per reviewable candidate; mask slice only for the region candidates
    assert len(ds) == 9
    counts = ds.select_group_slices(_allow_mixed=True).count_values("group.name")
    assert counts == {"anchor": 9, "source": 9, "edited": 9, "mask": 6}

    with ws.catalog(read_only=True) as cat:
        row = cat.query("SELECT * FROM candidates_v WHERE candidate_id = 2")[0]
    edited = _edited(ds)
    sample = edited.match({"candidate_id": 2}).first()
    for col in ("clip_sim_dir", "clip_sim_image", "dinov2_sim", "ssim", "l1", "l2",
                "edit_type", "mode", "instruction", "source_caption", "target_caption",
                "status", "auto_status", "mask_class", "gen_run", "score_run", "filter_run",
                "edit_id", "anchor_id"):
        assert sample[col] == row[col], col
    assert sample["reject_reasons"] == row["reject_reasons"] == ["clip_sim_dir < 0.22"]
    assert sample.filepath == str(ws.media.path(row["edited_image"]))
    # the anchor slice shows the real photo; the mask slice is the decoded RLE
    anchor = ds.select_group_slices("anchor").match({"candidate_id": 2}).first()
    assert anchor.filepath == str(ws.media.path(row["anchor_media"]))
    mask_sample = ds.select_group_slices("mask").match({"candidate_id": 2}).first()
    from pycocotools import mask as coco_mask
    expected = coco_mask.decode({"size": [48, 64], "counts": row["mask_rle"].encode()})
    png = np.asarray(Image.open(mask_sample.filepath))
    assert png.shape == (48, 64)
    assert np.array_equal(png == 255, expected.astype(bool))
    # the Segmentation on the edited image points at the same mask
    assert sample["mask"].mask_path == mask_sample.filepath
    assert np.array_equal(sample["mask"].get_mask() == 255, expected.astype(bool))
    free = edited.match({"mode": "free"}).first()
    assert free["mask"] is None
    # both candidates of an edit share one mask file (written once)
    masks = ds.select_group_slices("mask").match({"edit_id": 1}).values("filepath")
    assert len(masks) == 2 and len(set(masks)) == 1

    views = set(ds.list_saved_views())
    assert {"rejected", "rejected-clip-sim-dir-0-22", "borderline", "borderline-clip-sim-dir",
            "mask-fine", "mask-too-small", "mask-fragmented", "human-decided"} <= views
    with ws.catalog(read_only=True) as cat:
        n_rej = cat.scalar("SELECT count(*) FROM candidates_v WHERE status = 'rejected' "
                           "AND edited_image IS NOT NULL")
        types = {r["edit_type"]: r["n"] for r in cat.query(
            "SELECT edit_type, count(*) n FROM candidates_v WHERE edited_image IS NOT NULL "
            "GROUP BY 1")}
        near = cat.scalar("SELECT count(*) FROM candidates_v WHERE edited_image IS NOT NULL "
                          "AND abs(clip_sim_dir - 0.22) <= 0.02")
    assert len(ds.load_saved_view("rejected")) == n_rej == 2
    assert len(ds.load_saved_view("borderline-clip-sim-dir")) == near == 2
    for t, n in types.items():
        assert len(ds.load_saved_view(f"type-{t.replace('_', '-')}")) == n
    assert len(ds.load_saved_view("mask-fine")) == 2
    assert len(ds.load_saved_view("human-decided")) == 0

    with ws.catalog(read_only=True) as cat:
        runs = cat.query("SELECT * FROM runs WHERE stage = 'review'")
    assert len(runs) == 1 and runs[0]["state"] == "completed" and runs[0]["rows_in"] == 9


def test_incremental_update_touches_only_changed(review_ws):
    from ultracurate import review
    ws = review_ws
    review.build_review_dataset(ws, progress=False)
    ds = review.open_review_dataset(ws)
    before = dict(zip(*_edited(ds).values(["candidate_id", "last_modified_at"])))
    ids_before = set(ds.select_group_slices(_allow_mixed=True).values("id"))

    again = review.build_review_dataset(ws, progress=False)
    assert (again.added, again.updated, again.unchanged, again.removed) == (0, 0, 9, 0)

    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET clip_sim_dir = 0.5, auto_status = 'accepted' "
                        "WHERE candidate_id = 1")
        cat.con.execute("DELETE FROM candidate_rejects WHERE candidate_id = 1")
    s = review.build_review_dataset(ws, progress=False)
    assert (s.added, s.updated, s.unchanged) == (0, 1, 8)
    ds.reload()
    after = dict(zip(*_edited(ds).values(["candidate_id", "last_modified_at"])))
    changed = {c for c in after if after[c] != before[c]}
    assert changed == {1}
    one = _edited(ds).match({"candidate_id": 1}).first()
    assert one["clip_sim_dir"] == 0.5 and one["status"] == "accepted"
    assert one["reject_reasons"] is None
    # updated in place: no sample was re-created
    assert set(ds.select_group_slices(_allow_mixed=True).values("id")) == ids_before
    assert len(ds.load_saved_view("rejected")) == 1

    # a narrower selection drops the other groups; widening adds them back
    s = review.build_review_dataset(ws, Selection(where="mode = 'region'"), progress=False)
    assert (s.selected, s.removed) == (6, 3)
    ds.reload()
    assert len(ds) == 6 and set(_edited(ds).distinct("mode")) == {"region"}
    assert "type-" + "change-global" not in ds.list_saved_views() or True


def test_tags_pulled_back_and_survive_refilter(review_ws):
    from ultracurate import review
    ws = review_ws
    review.build_review_dataset(ws, progress=False)
    ds = review.open_review_dataset(ws)
    edited = _edited(ds)
    # a reviewer tags in the App: candidate 4 (auto accepted) rejected for its mask,
    # candidate 1 (auto rejected) accepted; a source-slice tag counts for its group
    edited.match({"candidate_id": 4}).tag_samples(["reject", "bad_mask"])
    edited.match({"candidate_id": 1}).tag_samples(["accept"])
    ds.select_group_slices("source").match({"candidate_id": 5}).tag_samples(
        ["bad_instruction"])
    edited.match({"candidate_id": 6}).tag_samples(["accept", "reject"])  # a conflict

    p = review.pull_decisions(ws, reviewer="ana")
    assert p.changed == 3 and p.accepted == 1 and p.rejected == 1 and p.conflicts == [6]
    with ws.catalog(read_only=True) as cat:
        got = {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, human_decision, human_tags, reviewer, decided_at, status, "
            "auto_status FROM candidates_v WHERE candidate_id IN (1, 4, 5, 6)")}
        runs = cat.query("SELECT * FROM runs WHERE stage = 'review-pull'")
    assert got[4]["human_decision"] == "reject" and got[4]["status"] == "rejected"
    assert sorted(got[4]["human_tags"]) == ["bad_mask", "reject"]
    assert got[1]["human_decision"] == "accept" and got[1]["status"] == "accepted"
    assert got[5]["human_decision"] is None and got[5]["human_tags"] == ["bad_instruction"]
    assert got[6]["human_decision"] is None and got[6]["human_tags"] is None
    assert all(got[c]["reviewer"] == "ana" and got[c]["decided_at"] for c in (1, 4, 5))
    assert len(runs) == 1 and runs[0]["rows_done"] == 3
    # the source-slice tag moved to the group's edited sample
    assert ds.select_group_slices("source").match({"candidate_id": 5}).first().tags == []
    assert _edited(ds).match({"candidate_id": 5}).first().tags == ["bad_instruction"]

    # pulling again changes nothing and records no run
    assert review.pull_decisions(ws, reviewer="ana").changed == 0

    # a re-filter (the real one, UltraEdit's thresholds) rewrites auto_status and
    # reject_reasons of every row; the human decisions still win
    res = run(ws, "filter").result
    assert res.rows_in == 9
    with ws.catalog() as cat:
        st = {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, status, auto_status, filter_run FROM candidates_v "
            "WHERE candidate_id IN (1, 4)")}
    assert st[1]["auto_status"] == "rejected" and st[1]["status"] == "accepted"
    assert st[4]["status"] == "rejected"
    assert st[1]["filter_run"] == res.run_id

    # the rebuild shows the new filter run and the decisions; the human views find them
    s = review.build_review_dataset(ws, progress=False)
    assert s.updated == 9 and s.unchanged == 0  # filter_run changed on every row
    ds.reload()
    assert _edited(ds).match({"candidate_id": 4}).first()["status"] == "rejected"
    assert _edited(ds).match({"candidate_id": 4}).first()["human_decision"] == "reject"
    assert _edited(ds).match({"candidate_id": 4}).first().tags == ["bad_mask", "reject"]
    assert len(ds.load_saved_view("human-decided")) == 3
    assert ds.load_saved_view("human-reject").values("candidate_id") == [4]

    # removing the tag in the App clears the decision
    _edited(ds).match({"candidate_id": 1}).untag_samples(["accept"])
    p = review.pull_decisions(ws, reviewer="bo")
    assert p.changed == 1 and p.cleared == 1
    with ws.catalog(read_only=True) as cat:
        r = cat.query("SELECT human_decision, reviewer, status FROM candidates_v "
                      "WHERE candidate_id = 1")[0]
    assert r == {"human_decision": None, "reviewer": "bo", "status": "rejected"}


def test_unpulled_tags_survive_a_rebuild(review_ws):
    from ultracurate import review
    ws = review_ws
    review.build_review_dataset(ws, progress=False)
    ds = review.open_review_dataset(ws)
    _edited(ds).match({"candidate_id": 2}).tag_samples(["reject"])
    with ws.catalog() as cat:  # the catalog changes under the tagged sample
        cat.con.execute("UPDATE candidates SET ssim = 0.123 WHERE candidate_id = 2")
    s = review.build_review_dataset(ws, reviewer="cy", progress=False)
    assert s.pulled == 1
    ds.reload()
    one = _edited(ds).match({"candidate_id": 2}).first()
    assert one.tags == ["reject"] and one["ssim"] == 0.123 and one["reviewer"] == "cy"


def test_embeddings_from_lance_attached_for_brain(review_ws):
    from ultracurate import review
    from ultracurate.embeddings import EmbeddingStore
    ws = review_ws
    rng = np.random.default_rng(0)
    ids = list(range(1, 10))
    vecs = rng.normal(size=(9, 16)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = EmbeddingStore(ws.lance_path)
    store.upsert("clip_image", "candidates", ids, "edited", [""] * 9, vecs, "tiny")
    store.upsert("clip_image", "candidates", ids, "source", [""] * 9, vecs[::-1].copy(), "tiny")
    with ws.catalog(read_only=True) as cat:
        anchor_ids = [r[0] for r in cat.con.execute(
            "SELECT anchor_id FROM anchors ORDER BY 1").fetchall()]
    store.upsert("clip_image", "anchors", anchor_ids, "anchor", [""] * len(anchor_ids),
                 rng.normal(size=(len(anchor_ids), 16)), "tiny")
    s = review.build_review_dataset(ws, visualize=True, progress=False)
    assert s.embeddings == ["anchor", "edited", "source"]
    ds = review.open_review_dataset(ws)
    sample = _edited(ds).match({"candidate_id": 3}).first()
    assert np.allclose(sample["clip_embedding"], vecs[2])
    src = ds.select_group_slices("source").match({"candidate_id": 3}).first()
    assert np.allclose(src["clip_embedding"], vecs[::-1][2])
    assert {"clip_sim_edited", "clip_sim_source", "clip_sim_anchor",
            "clip_viz_edited"} <= set(ds.list_brain_runs())
    # the similarity index is the stored vectors: a sample's nearest neighbour is itself
    nearest = _edited(ds).sort_by_similarity(sample.id, k=1, brain_key="clip_sim_edited")
    assert nearest.first()["candidate_id"] == 3
    # an unchanged rebuild keeps the index instead of recomputing it
    key_time = ds.get_brain_info("clip_sim_edited").timestamp
    again = review.build_review_dataset(ws, progress=False)
    assert again.unchanged == 9
    assert review.open_review_dataset(ws).get_brain_info("clip_sim_edited").timestamp == key_time


def test_no_embeddings_is_fine(review_ws):
    from ultracurate import review
    s = review.build_review_dataset(review_ws, progress=False)
    assert s.embeddings == []
    assert review.open_review_dataset(review_ws).list_brain_runs() == []


def test_cli_review_no_launch_and_pull(review_ws, capsys):
    import json
    from ultracurate.cli import main
    from ultracurate import review
    ws = review_ws
    main(["review", "-w", str(ws.root), "--where", "mode = :m", "-p", "m", "region",
          "--no-launch", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 6 and out["added"] == 6 and out["dataset"]
    ds = review.open_review_dataset(ws)
    _edited(ds).match({"candidate_id": 4}).tag_samples(["accept"])
    main(["review", "-w", str(ws.root), "--pull", "--reviewer", "dee", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == 1
    with ws.catalog(read_only=True) as cat:
        assert cat.query("SELECT human_decision, reviewer FROM candidates "
                         "WHERE candidate_id = 4") == [{"human_decision": "accept",
                                                        "reviewer": "dee"}]
    # a bad --where is one clear error and changes nothing
    with pytest.raises(SystemExit) as e:
        main(["review", "-w", str(ws.root), "--where", "nosuch > 1", "--no-launch"])
    assert e.value.code == 1
    assert "nosuch" in capsys.readouterr().err


def test_pull_without_dataset_is_a_clear_error(ingested_ws, fo_db):
    from ultracurate import review
    from ultracurate.errors import UltracurateError
    with pytest.raises(UltracurateError, match="no review dataset"):
        review.pull_decisions(ingested_ws)


def test_bad_mask_rle_names_the_candidate(review_ws):
    from ultracurate import review
    from ultracurate.errors import UltracurateError
    with review_ws.catalog() as cat:
        cat.con.execute("UPDATE edits SET mask_rle = 'not an rle!!', mask_height = 7 "
                        "WHERE edit_id = 3")
    with pytest.raises(UltracurateError, match="candidate 4"):
        review.build_review_dataset(review_ws, progress=False)


def test_bad_selection_changes_nothing(review_ws):
    from ultracurate import review
    from ultracurate.errors import SelectionError
    with pytest.raises(SelectionError, match="nosuch"):
        review.build_review_dataset(review_ws, Selection(where="nosuch = 1"), progress=False)
    assert review.open_review_dataset(review_ws) is None
    with review_ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage LIKE 'review%'") == 0


# A process that uses FiftyOne's database, driven over stdin: each line names a dataset to
# create ('' for none); it answers with the folder its mongod serves (mongod's own word),
# the address it talks to and the datasets it sees.
_DB_CLIENT = r"""
import json, os, sys
from ultracurate import review
fo = review._fo()
import fiftyone.core.odm.database as fod
for line in sys.stdin:
    if line.strip():
        fo.Dataset(line.strip())  # a new collection: its mongod must still have its files
    client = fod.get_db_conn().client
    served = client.admin.command("getCmdLineOpts")["parsed"]["storage"]["dbPath"]
    print("@@" + json.dumps({"dir": os.path.realpath(served), "port": client.address[1],
                             "datasets": fo.list_datasets()}), flush=True)
"""


class _DbClient:
    def __init__(self, folder, tmp_path, name: str, port: int | None = None):
        import subprocess
        import sys
        env = dict(os.environ, FIFTYONE_DATABASE_DIR=str(folder), FIFTYONE_DO_NOT_TRACK="true")
        env.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
        if port is not None:  # as a FiftyOne-using parent passes it to its children
            env["FIFTYONE_PRIVATE_DATABASE_PORT"] = str(port)
        self.err = tmp_path / f"{name}.err"
        self.proc = subprocess.Popen([sys.executable, "-c", _DB_CLIENT], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.err, "w"))

    def ask(self, create: str = "") -> dict:
        import json
        self.proc.stdin.write(create + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise AssertionError(f"the client ended: {self.err.read_text()[-1500:]}")

    def end(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(120)


@pytest.mark.skipif("FIFTYONE_DATABASE_URI" in os.environ,
                    reason="about the mongod FiftyOne starts itself")
@pytest.mark.parametrize("case", ["other folder", "same folder", "other folder, parent's port"])
def test_a_process_keeps_the_database_of_its_own_folder(tmp_path, case):
    """FiftyOne joins the first database service it finds on the machine, whatever its folder:
    a second process (another workspace's review, another test session) kept its data in the
    first one's folder, and lost its database when the first ended and its folder was removed
    (its mongod aborted: 14 review tests failed on 'connection refused'). Each process's
    database now serves its own folder, joined by processes of that folder only, and outlives
    the end of any other process."""
    import shutil
    first_dir = tmp_path / "first"
    second_dir = first_dir if case == "same folder" else tmp_path / "second"
    first = _DbClient(first_dir, tmp_path, "first")
    second = None
    try:
        a = first.ask("first-ds")
        assert a["dir"] == os.path.realpath(first_dir)
        second = _DbClient(second_dir, tmp_path, "second",
                           port=a["port"] if case.endswith("parent's port") else None)
        b = second.ask()
        assert b["dir"] == os.path.realpath(second_dir)
        assert (b["port"] == a["port"]) == (case == "same folder")  # one mongod per folder
        assert ("first-ds" in b["datasets"]) == (case == "same folder")
        first.end()
        if second_dir != first_dir:  # as a test session removes its folder when it ends
            shutil.rmtree(first_dir)
        b = second.ask("second-ds")
        assert b["dir"] == os.path.realpath(second_dir) and "second-ds" in b["datasets"]
    finally:
        for client in (first, second):
            if client is not None:
                client.end()
