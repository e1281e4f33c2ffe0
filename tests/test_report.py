"""Report: one self-contained HTML file with every section, parsed back."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from ultracurate.cli import main
from ultracurate.thresholds import Thresholds
from ultracurate.runner import run

from _scoring import add_candidates, set_scores


class _Doc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.h3, self.imgs, self.cells, self._tag = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in ("link", "script"):
            raise AssertionError(f"external resource <{tag}>")

    def handle_data(self, data):
        if self._tag in ("h2", "h3", "td") and data.strip():
            {"h2": self.h2, "h3": self.h3, "td": self.cells}[self._tag].append(data.strip())

    def handle_endtag(self, tag):
        self._tag = None


def test_report_renders_all_sections(ingested_ws, tmp_path, capsys):
    ws = ingested_ws
    c = add_candidates(ws, n_edits=4, per_edit=3, types=("add", "replace"))
    ids = c["candidate_id"].to_list()
    set_scores(ws, {cid: dict(clip_sim_source=0.3, clip_sim_target=0.3,
                              clip_sim_dir=0.1 + 0.05 * i, clip_sim_image=0.8, dinov2_sim=0.6,
                              ssim=0.8, l1=0.05, l2=0.01) for i, cid in enumerate(ids)})
    run(ws, "filter", thresholds=Thresholds.preset().override(top_k=2))
    run(ws, "balance", cap=1, plot=False)
    out = tmp_path / "r" / "report.html"
    main(["report", "-w", str(ws.root), str(out)])
    assert "wrote" in capsys.readouterr().out
    doc = _Doc()
    doc.feed(out.read_text())
    assert doc.h2 == ["Selection", "Acceptance funnel", "Score histograms per edit type",
                      "Mask-class distribution (edits)", "Balance before and after",
                      "Example pairs per edit type"]
    assert doc.h3 == ["add", "replace"]
    # 8 score figures + funnel + mask classes + balance + 2 example grids, all inline PNGs
    assert len(doc.imgs) == 13
    for src in doc.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    # the funnel uses the last filter run's thresholds (top 2), and balance counts show
    assert "top-k by clip_sim_dir" in doc.cells
    assert "clip_sim_dir >= 0.22" in doc.cells
    # add: edit 0's clip_sim_dir are all < 0.22, edit 2 keeps its top 2; balance cap 1
    i = doc.cells.index("add")
    assert doc.cells[i:i + 3] == ["add", "2", "1"]
    i = doc.cells.index("replace")
    assert doc.cells[i:i + 3] == ["replace", "4", "1"]

    # a --where narrows it
    main(["report", "-w", str(ws.root), str(out), "--where", "edit_type = 'replace'"])
    doc = _Doc()
    doc.feed(out.read_text())
    assert doc.h3 == ["replace"]
