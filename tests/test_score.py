"""Scores: metric functions on hand-computed cases, the clip/dino loaders with tiny checkpoints
on disk, the score stage over real catalog rows, and the LanceDB embedding store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultracurate import metrics
from ultracurate.models import make_tiny
from ultracurate.runner import run

from _scoring import add_candidates, noise_image


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return make_tiny(tiny_dir, ("clip", "dino"))


# -- metric functions ----------------------------------------------------------------------
def test_cosine_and_direction_hand_cases():
    a = np.array([[1.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [6.0, 8.0]])
    assert np.allclose(metrics.cosine(a, b), [0.0, 1.0])
    # image moved from x to y, caption moved from x to y: direction 1
    src_i, edt_i = np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]])
    src_t, tgt_t = np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]])
    assert metrics.direction_similarity(src_i, edt_i, src_t, tgt_t) == pytest.approx(1.0)
    # the swapped pair (source and edited exchanged) flips the sign
    rng = np.random.default_rng(0)
    s, e, ts, tt = (rng.normal(size=(5, 8)) for _ in range(4))
    d = metrics.direction_similarity(s, e, ts, tt)
    assert np.allclose(metrics.direction_similarity(e, s, ts, tt), -d)
    assert np.all(np.abs(d) > 0)
    # normalisation: scaling an embedding does not change any score
    assert np.allclose(metrics.direction_similarity(3 * s, e, ts, 7 * tt), d)


def test_pixel_metrics_hand_cases():
    im = noise_image(1)
    assert metrics.ssim(im, im) == pytest.approx(1.0)
    assert metrics.l1(im, im) == 0.0 and metrics.l2(im, im) == 0.0
    black = np.zeros((8, 8, 3), np.uint8)
    white = np.full((8, 8, 3), 255, np.uint8)
    assert metrics.l1(black, white) == pytest.approx(1.0)
    assert metrics.l2(black, white) == pytest.approx(1.0)
    half = np.full((8, 8, 3), 0.5)
    assert metrics.l1(black, half) == pytest.approx(0.5)
    assert metrics.l2(black, half) == pytest.approx(0.25)
    other = noise_image(2)
    assert metrics.ssim(im, other) < 0.2
    with pytest.raises(ValueError):
        metrics.ssim(im, noise_image(1, size=32))


def test_batched_device_pixel_scores_match_scikit_image():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 40, 52, 3)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    got = metrics.pixel_scores_torch(torch.from_numpy(a).permute(0, 3, 1, 2),
                                     torch.from_numpy(b).permute(0, 3, 1, 2))
    for i in range(3):
        ref = metrics.pixel_scores(a[i], b[i])
        for k in ("ssim", "l1", "l2"):
            assert got[k][i] == pytest.approx(ref[k], abs=1e-5)


# -- models --------------------------------------------------------------------------------
def test_tiny_clip_round_trips_through_load(tiny):
    import open_clip
    from safetensors.torch import load_file
    from ultracurate.models import clip
    m = clip.load(tiny["clip"], "cpu")
    saved = load_file(f"{tiny['clip']}/{clip.WEIGHTS_NAME}")
    state = m.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert m.image_size == 64
    # the real tokenizer, 77 tokens, long captions truncated
    toks = m.tokenize(["a cat", "word " * 200])
    assert toks.shape == (2, 77)
    assert toks[0].tolist()[:4] == open_clip.get_tokenizer("ViT-B-32")(["a cat"])[0].tolist()[:4]
    im = noise_image(4, size=100)
    e = m.encode_images([im, im])
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=1), torch.ones(2))
    assert torch.allclose(e[0], e[1])
    # preprocess = open_clip's own eval transform
    _, _, ref_tf = open_clip.create_model_and_transforms(f"local-dir:{tiny['clip']}")
    assert torch.allclose(m.preprocess(im), ref_tf(im), atol=1e-5)


def test_tiny_dino_loads_dinov2_and_vit(tiny, tiny_dir):
    from ultracurate.models import dino
    m = dino.load(tiny["dino"], "cpu")
    assert m.model.config.model_type == "dinov2_with_registers"
    assert (m.resize, m.crop) == (70, 70)  # native resolution, like 518 for the real one
    im = noise_image(5, size=90)
    e = m.encode_images([im, im.rotate(90)])
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=1), torch.ones(2))
    v1 = dino.make_tiny(tiny_dir / "dino_v1", family="vit")
    mv = dino.load(v1, "cpu", resize=256, crop=224)
    assert mv.model.config.model_type == "vit"
    assert mv.pixels(im).shape == (3, 224, 224)
    assert mv.encode_images([im]).shape == (1, 32)
    with pytest.raises(Exception, match="cannot load dino checkpoint"):
        dino.load(str(tiny_dir / "nowhere"), "cpu")


# -- the score stage -----------------------------------------------------------------------
def test_score_stage_writes_scores_and_embeddings(ingested_ws, tiny):
    from ultracurate.embeddings import EmbeddingStore
    from ultracurate.stages.score import ScoreStage
    ws = ingested_ws
    cands = add_candidates(ws, n_edits=4, per_edit=3)
    summary = run(ws, "score", progress=False, batch_size=5)
    assert (summary.rows_in, summary.rows_done, summary.rows_failed) == (12, 12, 0)
    with ws.catalog() as cat:
        rows = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
    assert all(r["auto_status"] == "scored" and r["score_run"] == summary.run_id for r in rows)
    ident = [r for r in rows if r["candidate_index"] == 0]
    for r in ident:  # identical source and edited image
        assert r["clip_sim_image"] == pytest.approx(1.0, abs=1e-5)
        assert r["dinov2_sim"] == pytest.approx(1.0, abs=1e-5)
        assert r["ssim"] == pytest.approx(1.0) and r["l1"] == 0.0 and r["l2"] == 0.0
    changed = [r for r in rows if r["candidate_index"] == 2]
    assert all(r["l1"] > 0.01 and r["ssim"] < 1.0 for r in changed)

    # recompute one row by hand with the same models
    from ultracurate.models import load
    from ultracurate.images import load_rgb
    clip_m, dino_m = load(ws, "clip"), load(ws, "dino")
    r = changed[0]
    with ws.catalog() as cat:
        e = cat.query("SELECT source_caption, target_caption FROM edits WHERE edit_id = ?",
                      [r["edit_id"]])[0]
    src, edt = (load_rgb(ws.media.path(r[k])) for k in ("source_image", "edited_image"))
    ci = clip_m.encode_images([src, edt])
    ct = clip_m.encode_texts([e["source_caption"], e["target_caption"]])
    assert r["clip_sim_source"] == pytest.approx(float(ci[0] @ ct[0]), abs=1e-5)
    assert r["clip_sim_target"] == pytest.approx(float(ci[1] @ ct[1]), abs=1e-5)
    assert r["clip_sim_dir"] == pytest.approx(
        float(metrics.direction_similarity(ci[:1], ci[1:], ct[:1], ct[1:])[0]), abs=1e-5)
    di = dino_m.encode_images([src, edt])
    assert r["dinov2_sim"] == pytest.approx(float(di[0] @ di[1]), abs=1e-5)

    # embeddings in LanceDB, keyed by row id, read back equal to a fresh encoding
    store = EmbeddingStore(ws.lance_path)
    ids, vecs, sides = store.get("clip_image", "candidates", [r["candidate_id"]])
    assert list(ids) == [r["candidate_id"]] * 2 and sides == ["edited", "source"]
    assert np.allclose(vecs[0], ci[1].numpy(), atol=1e-5)
    assert store.count("clip_image") == 24 and store.count("dino_image") == 24
    assert store.count("clip_text") == 8  # 4 edits x 2 captions, embedded once each
    tid, tvec, _ = store.get("clip_text", "edits", [r["edit_id"]], side="target_caption")
    assert np.allclose(tvec[0], ct[1].numpy(), atol=1e-5)

    # rerun: nothing pending; --force rescoring (with the GPU's batched pixel-score path,
    # here on the CPU) gives the same scores and replaces the embeddings (no duplicates)
    assert run(ws, "score", progress=False).rows_in == 0
    assert run(ws, "score", progress=False, force=True, pixel_scores_on_device=True,
                     batch_size=7).rows_done == 12
    with ws.catalog() as cat:
        again = cat.query("SELECT * FROM candidates ORDER BY candidate_id")
    for r0, r1 in zip(rows, again):
        for k in ("ssim", "l1", "l2", "clip_sim_dir", "dinov2_sim"):
            assert r1[k] == pytest.approx(r0[k], abs=1e-5)
    assert EmbeddingStore(ws.lance_path).count("clip_image") == 24
    assert ScoreStage.writes["candidates"] >= {"clip_sim_dir", "auto_status"}
    assert len(cands) == 12


def test_a_batch_moves_the_bar_per_model_call(ingested_ws, tiny, monkeypatch):
    """A score batch embeds its images in calls of images_per_call and reports each to the
    runner's bar (forward only, before the batch commits, ending at the batch's rows); the
    scores are those of one call for the whole batch."""
    from ultracurate.progress import JobBar
    from ultracurate.runner import run
    from ultracurate.stages.score import SCORE_COLUMNS, ScoreStage
    ws = ingested_ws
    cands = add_candidates(ws, n_edits=2, per_edit=3)
    run(ws, "score", progress=False, batch_size=6)
    with ws.catalog() as cat:
        whole = cat.query(f"SELECT candidate_id, {', '.join(SCORE_COLUMNS)} FROM candidates")
    images = len(set(cands["source_image"]) | set(cands["edited_image"]))
    seen = []
    original = JobBar.__call__

    def spy(self, rows_in_batch):
        seen.append((self.committed, rows_in_batch))
        original(self, rows_in_batch)
    monkeypatch.setattr(JobBar, "__call__", spy)
    monkeypatch.setattr(ScoreStage, "images_per_call", 2)
    summary = run(ws, "score", force=True, batch_size=6, progress=True)
    assert summary.rows_done == 6
    assert len(seen) == -(-images // 2) > 1
    assert {c for c, _ in seen} == {0}
    done = [x for _, x in seen]
    assert done == sorted(done) and done[-1] == 6
    with ws.catalog() as cat:
        split = cat.query(f"SELECT candidate_id, {', '.join(SCORE_COLUMNS)} FROM candidates")
    for a, b in zip(sorted(whole, key=lambda r: r["candidate_id"]),
                    sorted(split, key=lambda r: r["candidate_id"])):
        for k in SCORE_COLUMNS:
            assert b[k] == pytest.approx(a[k], abs=1e-5), k


def test_score_records_a_missing_image_as_failed(ingested_ws, tiny, capsys):
    import json
    from ultracurate.cli import main
    ws = ingested_ws
    cands = add_candidates(ws, n_edits=1, per_edit=2)
    bad = int(cands["candidate_id"][1])
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET edited_image = ? WHERE candidate_id = ?",
                        ["f" * 64 + ".png", bad])  # a media name with no file
    main(["score", "-w", str(ws.root), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert (s["rows_done"], s["rows_failed"]) == (1, 1)
    with ws.catalog() as cat:
        err = cat.scalar("SELECT error FROM stage_state WHERE stage = 'score' AND key = ?",
                         [bad])
        st = cat.scalar("SELECT auto_status FROM candidates WHERE candidate_id = ?", [bad])
    assert f"candidate {bad}" in err and "not found" in err
    assert st == "generated"


def test_embedding_store_round_trip_and_search(tmp_path):
    from ultracurate.embeddings import EmbeddingStore
    from ultracurate.errors import UltracurateError
    store = EmbeddingStore(tmp_path / "lance")
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store.upsert("clip_image", "anchors", [10, 11, 12, 13, 14], "anchor",
                 [f"m{i}" for i in range(5)], v, "tiny")
    ids, back, _ = store.get("clip_image", "anchors")
    assert list(ids) == [10, 11, 12, 13, 14] and np.allclose(back, v)
    # upsert replaces by key
    store.upsert("clip_image", "anchors", [12], "anchor", ["m2b"], -v[2:3], "tiny")
    ids, back, _ = store.get("clip_image", "anchors", [12])
    assert store.count("clip_image") == 5 and np.allclose(back[0], -v[2])
    hits = store.search("clip_image", v[[0, 3]], k=1, row_table="anchors")
    assert sorted(zip(hits["query_index"].to_pylist(), hits["row_id"].to_pylist())) == [
        (0, 10), (1, 13)]
    with pytest.raises(UltracurateError, match="16-d"):
        store.upsert("clip_image", "anchors", [1], "anchor", ["x"], np.ones((1, 8)), "other")
