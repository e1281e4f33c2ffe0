"""Embeddings in LanceDB (the workspace's `lance/` folder), keyed by catalog row id.

Three tables, one per embedding kind:

    clip_image   CLIP image embeddings: candidates (side 'source' / 'edited') and anchors
                 (side 'anchor')
    clip_text    CLIP text embeddings of captions: edits (side 'source_caption' /
                 'target_caption'), since every candidate of an edit shares its captions
    dino_image   DINOv2 image embeddings: candidates (side 'source' / 'edited')

Each row: `key` ("<row_table>:<row_id>:<side>", the upsert key), `row_table`, `row_id`,
`side`, `item` (the media name or caption text that was embedded), `model` (the checkpoint
reference) and `vector` (float32, unit norm). Writing the same key again replaces the row, so
a rescore never leaves two versions of an embedding.

    store = EmbeddingStore(ws.lance_path)
    store.upsert("clip_image", "candidates", ids, "edited", media_names, vectors, model_ref)
    ids, vecs = store.get("clip_image", "candidates", side="edited")
    hits = store.search("clip_image", vecs, k=5, row_table="candidates", side="edited")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .errors import UltracurateError

KINDS = ("clip_image", "clip_text", "dino_image")


def _key(row_table: str, row_id: int, side: str) -> str:
    return f"{row_table}:{int(row_id)}:{side}"


class EmbeddingStore:
    def __init__(self, path: str | Path):
        import lancedb
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(str(self.path))
        self._tables: dict[str, Any] = {}

    # -- tables ---------------------------------------------------------------------------
    def _names(self) -> set[str]:
        res = self.db.list_tables()
        names = getattr(res, "tables", res)
        return set(names)

    def table(self, kind: str, dim: int | None = None):
        """The LanceDB table for kind; created (with dim) on first write. None when absent."""
        if kind not in KINDS:
            raise UltracurateError(f"unknown embedding kind '{kind}' ({', '.join(KINDS)})")
        if kind in self._tables:
            return self._tables[kind]
        if kind in self._names():
            tbl = self.db.open_table(kind)
        elif dim is None:
            return None
        else:
            tbl = self.db.create_table(kind, schema=_schema(dim))
        self._tables[kind] = tbl
        return tbl

    def dim(self, kind: str) -> int | None:
        tbl = self.table(kind)
        if tbl is None:
            return None
        return tbl.schema.field("vector").type.list_size

    def count(self, kind: str) -> int:
        tbl = self.table(kind)
        return 0 if tbl is None else tbl.count_rows()

    # -- writing --------------------------------------------------------------------------
    def upsert(self, kind: str, row_table: str, row_ids: Sequence[int],
               sides: str | Sequence[str], items: Sequence[str], vectors: Any,
               model: str = "") -> int:
        """Insert or replace one embedding per row id (and side)."""
        vecs = _as_f32(vectors)
        n = len(row_ids)
        if n == 0:
            return 0
        if vecs.shape[0] != n:
            raise ValueError(f"{n} row ids but {vecs.shape[0]} vectors")
        sides = [sides] * n if isinstance(sides, str) else list(sides)
        tbl = self.table(kind, vecs.shape[1])
        have = tbl.schema.field("vector").type.list_size
        if have != vecs.shape[1]:
            raise UltracurateError(
                f"LanceDB table {kind} holds {have}-d embeddings but this model gives "
                f"{vecs.shape[1]}-d; remove {self.path / (kind + '.lance')} to rescore with "
                "another model")
        data = pa.table({
            "key": pa.array([_key(row_table, r, s) for r, s in zip(row_ids, sides)]),
            "row_table": pa.array([row_table] * n),
            "row_id": pa.array(np.asarray(row_ids, dtype=np.int64)),
            "side": pa.array(sides),
            "item": pa.array([str(i) for i in items]),
            "model": pa.array([model] * n),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)),
                                                        vecs.shape[1]),
        })
        (tbl.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
         .execute(data))
        return n

    def optimize(self) -> None:
        """Compact the small fragments that per-batch upserts leave."""
        for kind in KINDS:
            tbl = self.table(kind)
            if tbl is not None:
                try:
                    tbl.optimize()
                except Exception:  # compaction is an optimisation; never fail a job on it
                    pass

    # -- reading --------------------------------------------------------------------------
    def get(self, kind: str, row_table: str, row_ids: Sequence[int] | None = None,
            side: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(row_ids, vectors (N, D) float32, sides) for row_table's rows (all, or row_ids),
        ordered by row id then side."""
        tbl = self.table(kind)
        if tbl is None:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), []
        flt = f"row_table = '{_lit(row_table)}'"
        if side is not None:
            flt += f" AND side = '{_lit(side)}'"
        arrow = tbl.to_lance().to_table(columns=["row_id", "side", "vector"], filter=flt)
        if row_ids is not None:
            import pyarrow.compute as pc
            arrow = arrow.filter(pc.is_in(arrow["row_id"],
                                          pa.array(np.asarray(row_ids, dtype=np.int64))))
        arrow = arrow.sort_by([("row_id", "ascending"), ("side", "ascending")])
        ids = arrow["row_id"].to_numpy()
        dim = tbl.schema.field("vector").type.list_size
        flat = arrow["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return ids, flat.reshape(-1, dim).astype(np.float32), arrow["side"].to_pylist()

    def search(self, kind: str, vectors: Any, k: int = 10, row_table: str | None = None,
               side: str | None = None) -> pa.Table:
        """Nearest neighbours by cosine distance for each query vector: a table with
        query_index, row_id, side, item and _distance (1 - cosine)."""
        tbl = self.table(kind)
        q = _as_f32(vectors)
        if tbl is None or len(q) == 0:
            return pa.table({"query_index": pa.array([], pa.int32()),
                             "row_id": pa.array([], pa.int64()),
                             "_distance": pa.array([], pa.float32())})
        conds = []
        if row_table is not None:
            conds.append(f"row_table = '{_lit(row_table)}'")
        if side is not None:
            conds.append(f"side = '{_lit(side)}'")
        query = tbl.search(q if len(q) > 1 else q[0]).metric("cosine").limit(k)
        if conds:
            query = query.where(" AND ".join(conds), prefilter=True)
        out = query.select(["row_id", "side", "item"]).to_arrow()
        if "query_index" not in out.column_names:
            out = out.append_column("query_index", pa.array(np.zeros(len(out), np.int32)))
        return out

    def ensure_index(self, kind: str, min_rows: int = 100_000) -> bool:
        """Build an approximate (IVF-PQ, cosine) index once a table is large enough for a
        brute-force scan to be slow; smaller tables are searched exactly."""
        tbl = self.table(kind)
        if tbl is None or tbl.count_rows() < min_rows:
            return False
        if not tbl.list_indices():
            tbl.create_index(metric="cosine", vector_column_name="vector")
        return True


def _lit(s: str) -> str:
    return str(s).replace("'", "''")


def _as_f32(vectors: Any) -> np.ndarray:
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().float().cpu().numpy()
    a = np.asarray(vectors, dtype=np.float32)
    return a[None, :] if a.ndim == 1 else a


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("row_table", pa.string()), ("row_id", pa.int64()),
        ("side", pa.string()), ("item", pa.string()), ("model", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),
    ])
