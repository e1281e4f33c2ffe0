"""The README's "Working with it" flow, run top to bottom on a tiny workspace, yields the
balanced, de-duplicated set: what `balance` printed, what `export` wrote (its default
selection) and the report's balance table agree, and no duplicate is exported.

The steps before `score` are replaced by candidates inserted with real images (generation is
tested elsewhere); `review` needs the App and is left out. Every other step runs in the
README's order, through the CLI, with its options adapted to tiny random-weight models where
they need it (thresholds), so reordering the README changes what this test runs."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from ultracurate.cli import main
from ultracurate.models import make_tiny
from ultracurate.runner import run
from ultracurate.stages.ingest import IngestStage, discover

from _anchors import set_captions
from _exports import by_idx, read_export
from _scoring import add_candidates

README = Path(__file__).resolve().parents[1] / "README.md"
# Tiny random CLIP scores mean nothing: loose thresholds, top 2 per edit (as the demo does);
# it maps all photos close together, so only near-identical images are duplicates.
TINY = {
    "filter": ["--clip-min", "-1", "--clip-dir-min", "-1", "--clip-image-min", "-1",
               "--dino-min", "-1", "--top-k", "2", "--no-region-rule"],
    "dedup": ["--threshold", "0.9995"],
    "judge": ["--grammar", "tiny-judge"],  # the tiny local judge instead of a served one
    "balance": ["--by", "edit_type", "--cap", "2", "--seed", "0"],
}
NOT_HERE = {"init", "ingest", "instruct", "ground", "classify-masks", "generate",  # fixture
            "review",                                                            # the App
            "chain",                                     # generation again (test_chain.py)
            "stats", "gc", "select"}                                             # read-only


def readme_flow() -> list[list[str]]:
    text = README.read_text()
    block = text[text.index("## Working with it"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    steps = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("ultracurate "):
            steps.append(shlex.split(line)[1:])
    return steps


def test_readme_orders_the_flow():
    names = [s[0] for s in readme_flow()]
    order = [names.index(n) for n in ("filter", "review", "dedup", "balance", "export")]
    assert order == sorted(order), names
    export = next(s for s in readme_flow() if s[0] == "export")
    assert "--where" not in export  # the default selection is what balance chose


@pytest.fixture
def flow_ws(ingested_ws, tiny_dir, tmp_path):
    """Scored-to-be candidates on the demo photos plus a near-duplicate anchor (a re-encoded
    crop of the first photo, with edits of its own) and one planted duplicate edited image."""
    ws = ingested_ws
    make_tiny(tiny_dir, ("clip", "dino", "judge"))
    with ws.catalog() as cat:
        first = cat.query("SELECT media FROM anchors ORDER BY anchor_id LIMIT 1")[0]["media"]
    im = Image.open(ws.media.path(first)).convert("RGB")
    folder = tmp_path / "more"
    folder.mkdir()
    buf = io.BytesIO()
    im.crop((2, 2, im.width - 2, im.height - 2)).save(buf, "JPEG", quality=80)
    (folder / "copy.jpg").write_bytes(buf.getvalue())
    run(ws, IngestStage(items=discover([folder])), progress=False)
    with ws.catalog() as cat:
        bare = [r[0] for r in cat.con.execute(
            "SELECT anchor_id FROM anchors_v WHERE len(captions) = 0").fetchall()]
        set_captions(cat, {aid: ["a copy of the first photo"] for aid in bare})
    c = add_candidates(ws, n_edits=12, per_edit=3)
    ids = c["candidate_id"].to_list()
    with ws.catalog() as cat:
        cat.con.execute("UPDATE candidates SET edited_image = (SELECT edited_image FROM "
                        "candidates WHERE candidate_id = ?) WHERE candidate_id = ?",
                        [ids[4], ids[5]])
    return ws


def _balance_printed(text: str) -> dict[str, int]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["edit_type", "before", "after"]
    out = {}
    for line in lines[1:-1]:
        group, _before, after = line.rsplit(None, 2)
        out[group.strip()] = int(after)
    assert lines[-1].startswith(f"selected {sum(out.values())} of ")
    return out


def test_readme_flow_yields_the_balanced_deduplicated_set(flow_ws, monkeypatch, capsys):
    ws = flow_ws
    monkeypatch.chdir(ws.root)  # the README runs in the workspace (`cd ws`)
    printed = exported = out = report = None
    start = [s[0] for s in readme_flow()].index("score")
    for step in readme_flow()[start:]:
        name = step[0]
        if name in NOT_HERE:
            continue
        args = step
        if name in TINY:  # the README's own flags, thresholds made tiny-friendly
            args = [name] + TINY[name] + (["--dry-run"] if "--dry-run" in step else [])
        capsys.readouterr()
        main(args)
        printed_now, err = capsys.readouterr()
        if name == "export":
            assert "warning:" not in err  # nothing changed the pool after balance
        if name == "balance":
            printed = _balance_printed(printed_now)
        elif name == "export":
            out = ws.root / args[-1]
            exported = by_idx(read_export(out, "hf"))
        elif name == "report":
            report = (ws.root / args[-1]).read_text()
    assert printed and exported is not None and report is not None

    # export took exactly what balance printed ...
    with ws.catalog(read_only=True) as cat:
        facts = {r["candidate_id"]: r for r in cat.query(
            "SELECT candidate_id, edit_type, selected, duplicate_of, anchor_duplicate_of, "
            "status FROM candidates_v")}
        n_dup_anchor = cat.scalar("SELECT count(*) FROM anchors WHERE duplicate_of IS NOT NULL")
    got: dict[str, int] = {}
    for idx in exported:
        got[facts[idx]["edit_type"]] = got.get(facts[idx]["edit_type"], 0) + 1
    assert got == {g: n for g, n in printed.items() if n}
    # ... none of it a duplicate (the planted ones were found) ...
    assert n_dup_anchor == 1 and any(f["duplicate_of"] for f in facts.values())
    for idx in exported:
        f = facts[idx]
        assert f["status"] == "accepted" and f["selected"]
        assert f["duplicate_of"] is None and f["anchor_duplicate_of"] is None
    # ... and the report's balance table says the same
    table = report[report.index("Balance before and after"):]
    rows = re.findall(r"<tr><td>([a-z_]+)</td><td>(\d+)</td><td>(\d+)</td></tr>", table)
    assert {t: int(sel) for t, _, sel in rows} == printed
