"""Dedup: near-duplicate anchors and edited images, by LanceDB vector search over CLIP image
embeddings.

- anchors: their CLIP image embeddings are computed here the first time (stored in LanceDB,
  table clip_image, row_table 'anchors', side 'anchor'), then every anchor is searched
  against the others;
- edited images: the score stage's stored embeddings of the selected candidates' edited images
  (row_table 'candidates', side 'edited').

Rows are visited in id order; a row whose cosine similarity to an earlier row reaches the
threshold is a duplicate of it (of the earlier row's own original, when that one is itself a
duplicate), so every duplicate points at a kept row and the lowest id of a cluster is kept.
`duplicate_of` (and `dedup_run`) is rewritten for every row considered: a rerun with another
threshold clears marks that no longer hold. Balance and export leave duplicates out, and the
candidates of a duplicate anchor too (`anchor_duplicate_of` in candidates_v); so dedup runs
before balance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..catalog import Catalog
from ..embeddings import EmbeddingStore
from ..errors import UltracurateError
from ..images import BadImage, load_rgb
from ..selection import Selection, selected_keys_sql

SEARCH_K = 10
QUERY_CHUNK = 1024


@dataclass
class DedupResult:
    run_id: int | None
    threshold: float
    anchors_checked: int = 0
    anchor_duplicates: dict[int, int] = field(default_factory=dict)     # id -> original
    edited_checked: int = 0
    edited_duplicates: dict[int, int] = field(default_factory=dict)
    anchors_embedded: int = 0

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["anchor_duplicates"] = {str(k): v for k, v in self.anchor_duplicates.items()}
        d["edited_duplicates"] = {str(k): v for k, v in self.edited_duplicates.items()}
        return d


def embed_anchors(ws, store: EmbeddingStore, cat: Catalog, device: str | None = None,
                  batch_size: int = 64) -> int:
    """CLIP image embeddings for anchors that have none in LanceDB; returns how many."""
    have = set(store.get("clip_image", "anchors", side="anchor")[0].tolist())
    rows = [r for r in cat.query("SELECT anchor_id, media FROM anchors ORDER BY anchor_id")
            if r["anchor_id"] not in have]
    if not rows:
        return 0
    from ..models import load
    from ..runner import default_device
    clip = load(ws, "clip", device or default_device())
    done = 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        pix, ok = [], []
        for r in batch:
            try:
                pix.append(clip.pixels(load_rgb(ws.media.path(r["media"]))))
                ok.append(r)
            except BadImage:
                continue  # ingest checked every anchor; a vanished file is skipped here
        if ok:
            store.upsert("clip_image", "anchors", [r["anchor_id"] for r in ok], "anchor",
                         [r["media"] for r in ok], clip.encode_pixels(pix), clip.ref)
            done += len(ok)
    return done


def find_duplicates(store: EmbeddingStore, row_table: str, side: str, ids: list[int],
                    threshold: float) -> dict[int, int]:
    """{row id: id of the earlier row it duplicates} among ids (vector search in LanceDB)."""
    if not ids:
        return {}
    got_ids, vecs, _ = store.get("clip_image", row_table, ids, side=side)
    order = np.argsort(got_ids, kind="stable")
    got_ids, vecs = got_ids[order], vecs[order]
    wanted = set(int(i) for i in got_ids)
    store.ensure_index("clip_image")
    neighbours: dict[int, list[tuple[float, int]]] = {}
    for start in range(0, len(got_ids), QUERY_CHUNK):
        q = vecs[start:start + QUERY_CHUNK]
        hits = store.search("clip_image", q, k=SEARCH_K, row_table=row_table, side=side)
        qi = hits["query_index"].to_numpy()
        rid = hits["row_id"].to_numpy()
        sim = 1.0 - hits["_distance"].to_numpy()
        for a, b, s in zip(qi, rid, sim):
            me = int(got_ids[start + int(a)])
            b = int(b)
            if b < me and b in wanted and s >= threshold - 1e-6:
                neighbours.setdefault(me, []).append((float(s), b))
    dup: dict[int, int] = {}
    for me in sorted(neighbours):
        s, other = max(neighbours[me], key=lambda t: (t[0], -t[1]))
        dup[me] = dup.get(other, other)
    return dup


def run_dedup(ws, threshold: float = 0.95, what: str = "both",
              selection: Selection | None = None, device: str | None = None,
              cat: Catalog | None = None) -> DedupResult:
    """Mark near-duplicate anchors (all anchors) and edited images (the selected candidates
    with stored embeddings); returns what was found."""
    if what not in ("anchors", "edited", "both"):
        raise UltracurateError(f"dedup: what must be anchors, edited or both (got '{what}')")
    if not -1.0 <= threshold <= 1.0:
        raise UltracurateError(f"dedup --threshold {threshold:g} is not a cosine in [-1, 1]")
    selection = selection or Selection()
    own = cat is None
    cat = cat or ws.catalog()
    try:
        if what in ("edited", "both"):  # a bad --where fails before anything is embedded
            selection.checked(cat.con, "candidates_v")
        store = EmbeddingStore(ws.lance_path)
        res = DedupResult(None, threshold)
        anchor_ids: list[int] = []
        cand_ids: list[int] = []
        if what in ("anchors", "both"):
            res.anchors_embedded = embed_anchors(ws, store, cat, device)
            anchor_ids = [r["anchor_id"] for r in cat.query(
                "SELECT anchor_id FROM anchors ORDER BY anchor_id")]
            res.anchor_duplicates = find_duplicates(store, "anchors", "anchor", anchor_ids,
                                                    threshold)
            res.anchors_checked = len(anchor_ids)
        if what in ("edited", "both"):
            sql, params = selected_keys_sql(cat.con, "candidates_v", "candidate_id", selection,
                                            "edited_image IS NOT NULL", "candidate_id")
            cand_ids = [r["candidate_id"] for r in cat.query(sql, params)]
            with_emb = store.get("clip_image", "candidates", cand_ids, side="edited")[0]
            cand_ids = sorted(int(i) for i in with_emb)
            if not cand_ids and what == "edited":
                raise UltracurateError("dedup: no selected candidate has a stored edited-image "
                                       "embedding; run `ultracurate score` first")
            res.edited_duplicates = find_duplicates(store, "candidates", "edited", cand_ids,
                                                    threshold)
            res.edited_checked = len(cand_ids)
        with cat.job("dedup", {"threshold": threshold, "what": what},
                     selection.to_json()) as run:
            run_id = run.run_id
            for table, key, ids, dups in (("anchors", "anchor_id", anchor_ids,
                                           res.anchor_duplicates),
                                          ("candidates", "candidate_id", cand_ids,
                                           res.edited_duplicates)):
                if not ids:
                    continue
                cat.update_rows(table, pl.DataFrame(
                    {key: ids, "duplicate_of": [dups.get(i) for i in ids],
                     "dedup_run": [run_id] * len(ids)},
                    schema={key: pl.Int64, "duplicate_of": pl.Int64, "dedup_run": pl.Int64}))
            run.rows_in = run.rows_done = len(anchor_ids) + len(cand_ids)
        res.run_id = run_id
        return res
    finally:
        if own:
            cat.close()


def format_dedup(res: DedupResult) -> str:
    lines = [f"dedup run {res.run_id} (cosine >= {res.threshold:g})"]
    if res.anchors_checked:
        lines.append(f"anchors: {len(res.anchor_duplicates)} near-duplicates of "
                     f"{res.anchors_checked} ({res.anchors_embedded} newly embedded)")
    if res.edited_checked:
        lines.append(f"edited images: {len(res.edited_duplicates)} near-duplicates of "
                     f"{res.edited_checked}")
    for kind, d in (("anchor", res.anchor_duplicates), ("candidate", res.edited_duplicates)):
        for k, v in list(d.items())[:10]:
            lines.append(f"  {kind} {k} duplicates {kind} {v}")
    return "\n".join(lines)
