"""The caption stage with the tiny random-weight captioner (a LLaVA built from a config, saved as
a real checkpoint folder and loaded through the same loader as a real one), on the demo's real
photos ingested without captions: validation of what random weights say, the grammar that makes
them say English words, batching, resume, --force, the CLI and the Ray engine."""

import json

import pytest

from ultracurate.captioners import validate_caption
from ultracurate.models import make_tiny, resolve
from ultracurate.models.vlm import Grammar
from ultracurate.runner import RayEngine, run
from ultracurate.stages.ingest import IngestStage, discover
from ultracurate.workspace import Workspace


@pytest.fixture
def bare_ws(ws, tiny_dir, demo_photos):
    """The demo's nine photos ingested as a folder: no captions."""
    make_tiny(tiny_dir, ("captioner",))
    s = run(ws, IngestStage(items=discover([demo_photos.parent])), progress=False)
    assert s.extra["anchors_without_caption"] == 9
    return ws


def _captions(ws, valid=True):
    with ws.catalog(read_only=True) as cat:
        return cat.query("SELECT * FROM anchor_captions WHERE (invalid_reason IS NULL) = ? "
                         "ORDER BY anchor_id, caption_index", [valid])


@pytest.mark.parametrize("answer, caption, reason", [
    ("a ginger cat on a wooden floor", "a ginger cat on a wooden floor", None),
    ('  "A cat   on a mat."\n', "A cat on a mat.", None),
    ("", None, "empty answer"),
    ("cat", None, "too short (1 word"),
    (" ".join(["word"] * 70), None, "too long (70 words"),
    ("a cat\x00 on a mat", None, "control, private or undecodable"),
    ("a cat \ufffd\ufffd on a mat", None, "undecodable"),
    ("## 12 34 ## !!", None, "mostly not words"),
    ("a red cat on a red cat on a red", None, "repeats itself ('a red cat' 2 times)"),
    (["a", "list"], None, "answer is a list, not text"),
])
def test_validate_caption(answer, caption, reason):
    got, reasons = validate_caption(answer)
    assert got == caption
    if reason is None:
        assert reasons == []
    else:
        assert any(reason in r for r in reasons), reasons


def test_tiny_captioner_invalid_then_grammar_then_instruct(bare_ws, tmp_path, demo_photos):
    ws = bare_ws
    # one new token: one-word answers, invalid; kept with their reason, anchors failed
    s = run(ws, "caption", max_new_tokens=1, progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 0, 9)
    bad = _captions(ws, valid=False)
    assert {r["anchor_id"] for r in bad} == set(range(1, 10))
    assert all(r["invalid_reason"].startswith("too short (1 word") for r in bad)
    assert all(r["source"] == "caption:captioner" and r["prompt"] == "caption-v1" for r in bad)
    with ws.catalog(read_only=True) as cat:
        errs = [r[0] for r in cat.con.execute(
            "SELECT error FROM stage_state WHERE stage = 'caption'").fetchall()]
    assert all("no usable caption after 1 try (too short" in e for e in errs)

    # under the tiny grammar every answer is one word per slot: valid English captions
    s = run(ws, "caption", grammar="tiny-caption", batch_size=4, progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed) == (9, 9, 0)
    assert s.extra == {"captions_added": 9, "invalid_answers": 0,
                       "anchors_without_caption": 0, "notes": [
                           "new captions (caption:captioner): 9, invalid answers kept with "
                           "their reasons: 0"]}
    good = _captions(ws)
    slots = Grammar.load("tiny-caption").slots
    for r in good:
        words = r["caption"].split()
        assert len(words) == len(slots) and all(w in slot for w, slot in zip(words, slots))
        assert r["prompt"] == "caption-v1+grammar:tiny-caption" and r["run_id"] == s.run_id
        assert r["model"] == resolve(ws, "captioner")
        assert r["caption_index"] == 1  # after the anchor's invalid answer
    # a rerun has nothing left to do
    assert run(ws, "caption", grammar="tiny-caption", progress=False).rows_in == 0

    # batching does not change greedy captions: one photo per batch gives the same
    ws2 = Workspace.init(tmp_path / "ws2", ws.config)
    run(ws2, IngestStage(items=discover([demo_photos.parent])), progress=False)
    run(ws2, "caption", grammar="tiny-caption", batch_size=1, progress=False)
    assert [r["caption"] for r in _captions(ws2)] == [r["caption"] for r in good]

    # instruct writes edits from the model's captions
    si = run(ws, "instruct", caption_source="caption:*", progress=False)
    assert (si.rows_done, si.rows_failed) == (9, 0)
    with ws.catalog(read_only=True) as cat:
        used = {r[0] for r in cat.con.execute("SELECT source_caption FROM edits").fetchall()}
    assert used == {r["caption"] for r in good}


def test_force_replaces_only_this_captioners_captions(bare_ws, demo_photos, tmp_path):
    ws = bare_ws
    table = tmp_path / "caps.jsonl"
    table.write_text(json.dumps({"path": str(demo_photos.parent / "chelsea.jpg"),
                                 "caption": "an orange cat"}) + "\n")
    run(ws, IngestStage(items=discover([table])), progress=False)
    run(ws, "caption", grammar="tiny-caption", all_anchors=True, progress=False)
    before = _captions(ws)
    s = run(ws, "caption", grammar="tiny-caption", all_anchors=True, temperature=1.0, seed=7,
                    force=True, progress=False)
    assert s.rows_done == 9
    after = _captions(ws)
    by_source = {}
    for r in after:
        by_source.setdefault(r["source"], []).append(r)
    assert [r["caption"] for r in by_source["ingest"]] == ["an orange cat"]  # untouched
    assert len(by_source["caption:captioner"]) == 9  # one per anchor, replaced
    assert {r["run_id"] for r in by_source["caption:captioner"]} == {s.run_id}
    assert [r["caption"] for r in after] != [r["caption"] for r in before]
    # instruct can be told which captions to write from
    with ws.catalog(read_only=True) as cat:
        aid = cat.scalar("SELECT anchor_id FROM anchors WHERE source_path LIKE '%chelsea.jpg'")
    si = run(ws, "instruct", caption_source="ingest", progress=False)
    assert (si.rows_done, si.rows_failed) == (1, 8)
    with ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT source_caption FROM edits") == "an orange cat"
        err = cat.scalar("SELECT error FROM stage_state WHERE stage = 'instruct' AND "
                         "state = 'failed' AND key <> ? LIMIT 1", [aid])
    assert "no caption from source ingest (it has caption:captioner)" in err


def test_cli_caption(bare_ws, capsys):
    from ultracurate.cli import main
    main(["caption", "-w", str(bare_ws.root), "--grammar", "tiny-caption", "--limit", "2",
          "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["rows_done"], out["captions_added"], out["anchors_without_caption"]) == \
        (2, 2, 7)
    with pytest.raises(SystemExit) as e:
        main(["caption", "-w", str(bare_ws.root), "--grammar", "no-such-grammar"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: no grammar 'no-such-grammar' (a "
                                               "packaged name such as tiny-caption, or a "
                                               ".json file)")
    with bare_ws.catalog(read_only=True) as cat:  # refused before any run was recorded
        assert cat.scalar("SELECT count(*) FROM runs WHERE stage = 'caption'") == 1


def _tiny_blip(folder, words):
    """A tiny random-weight BLIP captioner (no chat template) saved as a checkpoint folder."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(words))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, encoder_hidden_size=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                         sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return str(folder)


def test_a_captioner_without_chat_template_continues_its_prefix(bare_ws, tmp_path):
    """BLIP-style image-to-text models load through the same loader; they get the photo and
    the --prefix (no chat prompt), and their answers are validated like any other."""
    ref = _tiny_blip(tmp_path / "blip", ["a", "photo", "of"] + Grammar.load("tiny-caption").words)
    s = run(bare_ws, "caption", model=ref, prefix="a photo of", max_new_tokens=6, batch_size=4,
                    progress=False)
    assert s.rows_in == 9 and s.rows_done + s.rows_failed == 9
    rows = _captions(bare_ws) + _captions(bare_ws, valid=False)
    assert len(rows) == 9
    for r in rows:
        assert r["caption"].startswith("a photo of")  # the caption continues the prefix
        assert (r["source"], r["model"], r["prompt"]) == ("caption:blip", ref,
                                                          "prefix:a photo of")


@pytest.mark.slow
def test_caption_on_the_ray_engine(bare_ws, tmp_path, demo_photos):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run(bare_ws, "caption", grammar="tiny-caption", engine=RayEngine(num_workers=2),
                        batch_size=3, progress=False)
    finally:
        ray.shutdown()
    assert (s.rows_done, s.rows_failed) == (9, 0)
    ws2 = Workspace.init(tmp_path / "local", bare_ws.config)
    run(ws2, IngestStage(items=discover([demo_photos.parent])), progress=False)
    run(ws2, "caption", grammar="tiny-caption", batch_size=3, progress=False)
    assert [r["caption"] for r in _captions(bare_ws)] == [r["caption"] for r in _captions(ws2)]
    with bare_ws.catalog(read_only=True) as cat:
        assert cat.scalar("SELECT engine FROM runs WHERE stage = 'caption'") == "ray"
