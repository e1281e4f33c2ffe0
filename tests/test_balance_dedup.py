"""Dedup: a planted near-duplicate anchor and a planted duplicate edited image are found by
LanceDB vector search and marked with the row they duplicate."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ultracurate.cli import main
from ultracurate.embeddings import EmbeddingStore
from ultracurate.errors import UltracurateError
from ultracurate.models import make_tiny
from ultracurate.runner import run_stage
from ultracurate.stages.dedup import run_dedup
from ultracurate.stages.ingest import IngestStage, discover
from ultracurate.stages.score import run_score

from _scoring import add_candidates

# Random-weight tiny CLIP maps all photos close together (cosines 0.93-0.996 between the
# demo's different photos); a re-encoded crop of one photo stays above 0.9995.
THRESHOLD = 0.9995


def test_dedup_finds_planted_duplicates(ingested_ws, tiny_dir, tmp_path, capsys):
    make_tiny(tiny_dir, ("clip", "dino"))
    ws = ingested_ws
    with ws.catalog() as cat:
        first = cat.query("SELECT anchor_id, media FROM anchors ORDER BY anchor_id LIMIT 1")[0]
        n_anchors = cat.scalar("SELECT count(*) FROM anchors")
    # plant: the first photo, cropped by 2 px and re-encoded (a different file, same picture)
    im = Image.open(ws.media.path(first["media"])).convert("RGB")
    w, h = im.size
    folder = tmp_path / "more"
    folder.mkdir()
    buf = io.BytesIO()
    im.crop((2, 2, w - 2, h - 2)).save(buf, "JPEG", quality=80)
    (folder / "copy.jpg").write_bytes(buf.getvalue())
    run_stage(ws, IngestStage(discover([folder])), progress=False)

    cands = add_candidates(ws, n_edits=3, per_edit=3)
    ids = cands["candidate_id"].to_list()
    # plant: candidate ids[5] gets exactly the edited image of ids[2]
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET edited_image = (SELECT edited_image FROM "
                        "candidates WHERE candidate_id = ?) WHERE candidate_id = ?",
                        [ids[2], ids[5]])
    run_score(ws, progress=False)

    res = run_dedup(ws, threshold=THRESHOLD)
    with ws.catalog() as cat:
        copy_id = cat.scalar("SELECT max(anchor_id) FROM anchors")
        anchors = {r["anchor_id"]: r for r in cat.query(
            "SELECT anchor_id, duplicate_of, dedup_run FROM anchors")}
        cand = {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, duplicate_of, dedup_run FROM candidates")}
    assert res.anchors_embedded == n_anchors + 1 and res.anchors_checked == n_anchors + 1
    assert res.anchor_duplicates == {copy_id: first["anchor_id"]}
    assert anchors[copy_id]["duplicate_of"] == first["anchor_id"]
    assert sum(a["duplicate_of"] is not None for a in anchors.values()) == 1
    assert all(a["dedup_run"] == res.run_id for a in anchors.values())
    assert res.edited_duplicates.get(ids[5]) == ids[2]
    assert cand[ids[5]]["duplicate_of"] == ids[2]
    assert all(v < k for k, v in res.edited_duplicates.items())
    assert EmbeddingStore(ws.lance_path).count("clip_image") == 2 * 9 + n_anchors + 1

    # rerun through the CLI with an impossible-to-meet threshold: marks are cleared, and the
    # anchors are not embedded again
    main(["dedup", "-w", str(ws.root), "--threshold", "1.0", "--what", "anchors", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["anchors_embedded"] == 0
    with ws.catalog() as cat:
        assert cat.scalar("SELECT count(duplicate_of) FROM anchors") <= 1
    main(["dedup", "-w", str(ws.root), "--threshold", "0.5", "--what", "anchors", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["anchor_duplicates"]) == n_anchors  # everything is "similar" at 0.5
    with pytest.raises(SystemExit):  # refused at the CLI boundary
        main(["dedup", "-w", str(ws.root), "--threshold", "2"])
    assert "--threshold': 2 is not between -1 and 1" in capsys.readouterr().err
    with pytest.raises(UltracurateError, match="not a cosine"):  # and by the library
        run_dedup(ws, threshold=2.0)
