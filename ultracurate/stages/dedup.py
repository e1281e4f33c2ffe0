"""Dedup: near-duplicate anchors and edited images, by LanceDB vector search over CLIP image
embeddings.

- anchors: their CLIP image embeddings are computed by the `embed-anchors` row stage, which
  dedup requires (the runner runs it first; it resumes like any row stage), stored in LanceDB
  (table clip_image, row_table 'anchors', side 'anchor'); then every anchor is searched
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

from ..embeddings import EmbeddingStore
from ..errors import UltracurateError
from ..images import BadImage
from ..runner import BatchResult, Context, RowStage, SetStage

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
    anchors_embedded: int = 0   # by the embed-anchors run before it (run()'s summary.before)
    anchor_ids: list[int] = field(default_factory=list, repr=False)
    cand_ids: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("anchor_ids", "cand_ids")}
        d["anchor_duplicates"] = {str(k): v for k, v in self.anchor_duplicates.items()}
        d["edited_duplicates"] = {str(k): v for k, v in self.edited_duplicates.items()}
        return d


class EmbedAnchorsStage(RowStage):
    """CLIP image embeddings of anchors into LanceDB (clip_image, row_table 'anchors', side
    'anchor'): what dedup searches. A row stage like any other: batched, resumable, on Ray if
    asked; an anchor whose file cannot be read fails with the reason."""

    name = "embed-anchors"
    table = "anchors"
    columns = "anchor_id, media"
    batch_size = 64
    roles = ("clip",)

    def __init__(self):
        super().__init__()
        self.clip = None
        self._store: EmbeddingStore | None = None

    def __getstate__(self):  # shipped to Ray workers without the model or the LanceDB handle
        return {**self.__dict__, "clip": None, "_store": None}

    def setup(self, ctx: Context) -> None:
        from ..models import load
        self.clip = load(ctx.workspace, "clip", ctx.device)

    def prepare(self, rows: list[dict], ctx: Context) -> dict:
        out = {}
        for r in rows:
            try:
                out[r["anchor_id"]] = self.clip.pixels(ctx.workspace.media.load_rgb(
                    r["media"]))
            except (BadImage, UltracurateError) as e:
                out[r["anchor_id"]] = BadImage(f"anchor {r['anchor_id']}: {e}")
        return out

    def process(self, rows: list[dict], prepared: dict, ctx: Context) -> BatchResult:
        failed = {a: str(p) for a, p in prepared.items() if isinstance(p, Exception)}
        ok = [r for r in rows if r["anchor_id"] not in failed]
        vectors = self.clip.encode_pixels([prepared[r["anchor_id"]] for r in ok]) if ok \
            else None
        return BatchResult(failed=failed, extra={
            "ids": [r["anchor_id"] for r in ok], "media": [r["media"] for r in ok],
            "vectors": vectors, "ref": self.clip.ref})

    def write(self, w, result: BatchResult) -> None:
        e = result.extra
        if e.get("ids"):  # an upsert is idempotent: a failed commit is simply redone
            if self._store is None:
                self._store = EmbeddingStore(w.lance_path)
            self._store.upsert("clip_image", "anchors", e["ids"], "anchor", e["media"],
                               e["vectors"], e["ref"])


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


class DedupStage(SetStage):
    """Mark near-duplicate anchors (all anchors, embedded first by embed-anchors) and edited
    images (the selected candidates with stored embeddings)."""

    name = "dedup"
    table = "candidates"
    writes = {"anchors": {"duplicate_of", "dedup_run"},
              "candidates": {"duplicate_of", "dedup_run"}}

    def __init__(self, threshold: float = 0.95, what: str = "both"):
        if what not in ("anchors", "edited", "both"):
            raise UltracurateError(f"dedup: what must be anchors, edited or both (got "
                                   f"'{what}')")
        if not -1.0 <= threshold <= 1.0:
            raise UltracurateError(f"dedup --threshold {threshold:g} is not a cosine in "
                                   "[-1, 1]")
        self.threshold, self.what = threshold, what
        super().__init__(threshold=threshold, what=what)

    def requires(self) -> list:
        return [EmbedAnchorsStage()] if self.what in ("anchors", "both") else []

    def plan(self, r, selection) -> DedupResult:
        store = EmbeddingStore(r.lance_path)
        res = DedupResult(None, self.threshold)
        res.anchor_ids, res.cand_ids = [], []
        if self.what in ("anchors", "both"):
            res.anchor_ids = [row["anchor_id"] for row in r.query(
                "SELECT anchor_id FROM anchors ORDER BY anchor_id")]
            res.anchor_duplicates = find_duplicates(store, "anchors", "anchor", res.anchor_ids,
                                                    self.threshold)
            res.anchors_checked = len(res.anchor_ids)
        if self.what in ("edited", "both"):
            sql, params = r.selected(selection, "candidates", "candidate_id",
                                     "edited_image IS NOT NULL")
            cand_ids = [row["candidate_id"] for row in r.query(sql, params)]
            with_emb = store.get("clip_image", "candidates", cand_ids, side="edited")[0]
            res.cand_ids = sorted(int(i) for i in with_emb)
            if not res.cand_ids and self.what == "edited":
                raise UltracurateError("dedup: no selected candidate has a stored edited-image "
                                       "embedding; run `ultracurate score` first")
            res.edited_duplicates = find_duplicates(store, "candidates", "edited",
                                                    res.cand_ids, self.threshold)
            res.edited_checked = len(res.cand_ids)
        return res

    def apply(self, w, res: DedupResult, produced) -> DedupResult:
        for table, key, ids, dups in (("anchors", "anchor_id", res.anchor_ids,
                                       res.anchor_duplicates),
                                      ("candidates", "candidate_id", res.cand_ids,
                                       res.edited_duplicates)):
            if ids:
                w.table(table).update([{key: i, "duplicate_of": dups.get(i),
                                        "dedup_run": w.run_id} for i in ids])
        w.run.rows_in = w.run.rows_done = len(res.anchor_ids) + len(res.cand_ids)
        res.run_id = w.run_id
        res.anchors_embedded = sum(b.rows_done for b in self.before
                                   if b.stage == EmbedAnchorsStage.name)
        return res


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
