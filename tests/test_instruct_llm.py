"""The transformers back-end with a tiny random causal LM saved to disk and loaded back by
path through models.llm.load: its answers are gibberish, so they must be recorded as invalid
with reasons, and nothing may crash."""

import pytest

from ultracurate.errors import UltracurateError
from ultracurate.models import make_tiny
from ultracurate.selection import Selection
from ultracurate.runner import run


def test_tiny_llm_answers_are_recorded_invalid(ingested_ws, tiny_dir):
    ref = make_tiny(tiny_dir, ("llm",))["llm"]
    ws = ingested_ws  # profile 'tiny': the llm role resolves to tiny_dir/llm
    s = run(ws, "instruct", Selection(limit=3), backend="transformers", per_anchor=2,
                     types="add,turn", seed=1, n_instruction_examples=4, n_full_examples=2,
                     max_attempts=2, max_new_tokens=12, llm_batch_size=8, device="cpu",
                     progress=False)
    assert (s.rows_in, s.rows_done, s.rows_failed, s.state) == (3, 3, 0, "completed")
    with ws.catalog(read_only=True) as cat:
        rows = cat.query("SELECT * FROM edits ORDER BY edit_id")
        models = cat.scalar("SELECT models FROM runs WHERE run_id = ?", [s.run_id])
    assert len(rows) == 6
    for r in rows:
        assert r["edit_status"] == "invalid" and r["mode"] == "free"
        assert len(r["edit_reasons"]) >= 2  # one reason per try at least
        assert r["edit_reasons"][0].startswith("try 1: ") and \
            r["edit_reasons"][-1].startswith("try 2: ")
        assert r["instruct_backend"] == "transformers" and r["instruct_model"] == ref
        assert r["prompt_version"] == "instruct-v1" and len(r["exemplar_ids"]) == 6
    assert sorted(r["edit_type"] for r in rows) == ["add"] * 3 + ["turn"] * 3
    assert ref in models


def test_tiny_llm_generation_is_seeded_and_batched(tiny_dir):
    ref = make_tiny(tiny_dir, ("llm",))["llm"]
    from ultracurate.instruct.backends import Request
    from ultracurate.instruct.local import TransformersBackend
    b = TransformersBackend(ref, max_new_tokens=8, batch_size=2)
    reqs = [Request("a cat on a mat", "add", 3), Request("a red car on a long road", "turn", 4),
            Request("a dog", "replace", 5)]
    first, again = b.complete(reqs), b.complete(reqs)
    assert [a.content for a in first] == [a.content for a in again]
    assert len(first) == 3 and all(isinstance(a.content, str) for a in first)
    # the prompt goes through the tokenizer's chat template
    assert b.text(reqs[0]).endswith("<|assistant|>\n")


def test_llm_load_error_is_one_line(tmp_path):
    from ultracurate.models import llm
    with pytest.raises(UltracurateError, match="cannot load llm"):
        llm.load(str(tmp_path / "nowhere"))
