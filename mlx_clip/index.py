"""Search indexes over `mlxclip embed --data` output: `mlxclip index` builds one, `mlxclip search` queries it.

An index is a dir:
- `vectors.npy`: every vector, (N, dims) float16 or float32 as embedded, opened memory-mapped;
- `items.parquet`: id, key, path, caption, label of row i of `vectors.npy`;
- `index.json`: kind, dims, dtype, count, the embedding column, the model, FAISS settings;
- `faiss.index`: FAISS kinds only.

Kinds: "exact" (default) ranks every vector by a chunked MLX matmul with a per-chunk argpartition: exact, and memory
bounded by one chunk whatever N is. With the optional `faiss-cpu` (`pip install 'mlx-clip[faiss]'`): "faiss-flat"
(IndexFlatIP, exact too), and for large collections the approximate "faiss-ivf" (IndexIVFFlat: k-means cells, a
fraction of them probed) and "faiss-hnsw" (IndexHNSWFlat: a neighbour graph). Vectors are L2-normalized, so every
score is an inner product = cosine similarity. Ranking: score descending, equal scores by lower row (copies of one
vector in different chunks can differ in the last bit, so which copy ranks first is not fixed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlx_clip.embed_batch import column_vectors, read_manifest
from mlx_clip.io import atomic_dir

KINDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
CHUNK_ROWS = 65536  # vectors scored per matmul: 128 MiB of float32 at 512 dims
ITEM_COLUMNS = ["id", "key", "path", "caption", "label"]


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("FAISS indexes need faiss-cpu: pip install 'mlx-clip[faiss]' (or faiss-cpu)") from exc
    return faiss


# ---- exact top-k ----------------------------------------------------------------------------------------------------

def _merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score descending, then lower id), in rank order."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def topk_exact(vectors, queries, k: int = 10, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids), each (Q, min(k, N)): the best rows of `vectors` (N, D; numpy or memmap) for each query."""
    q = mx.array(np.asarray(queries, np.float32))
    best_s = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(vectors), chunk_rows):
        block = mx.array(np.asarray(vectors[start:start + chunk_rows], np.float32))  # reads this part of the file
        scores = q @ block.T  # (Q, C)
        kk = min(k, block.shape[0])
        # argpartition, not a full sort: O(C) per query, and only k candidates per chunk leave MLX.
        top = mx.argpartition(-scores, kth=kk - 1, axis=-1)[:, :kk]
        top_s = np.array(mx.take_along_axis(scores, top, axis=-1))
        best_s, best_i = _merge(np.concatenate([best_s, top_s], 1),
                                np.concatenate([best_i, np.array(top).astype(np.int64) + start], 1), k)
    return best_s, best_i


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| (row ids, (Q, k) each)."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]))


# ---- building --------------------------------------------------------------------------------------------------------

def _pick_column(manifest: dict, column: str | None) -> str:
    columns = manifest["columns"]
    column = column or columns[0]  # image vectors when both were embedded
    if column not in columns:
        raise ValueError(f"no {column!r} in this embedding dir; it holds {', '.join(columns)}")
    return column


def _faiss_settings(kind: str, n: int) -> dict:
    if kind == "faiss-ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per cell
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 4))}
    if kind == "faiss-hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    return {}


def _faiss_index(kind: str, vectors: np.ndarray, settings: dict):
    faiss = _faiss()
    n, dims = vectors.shape
    if kind == "faiss-flat":
        index = faiss.IndexFlatIP(dims)
    elif kind == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dims, settings["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings["efConstruction"]
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, settings["nlist"], faiss.METRIC_INNER_PRODUCT)
        sample = np.linspace(0, n - 1, min(n, settings["nlist"] * 256)).astype(np.int64)  # evenly spread rows
        index.train(np.asarray(vectors[sample], np.float32))
    for start in range(0, n, CHUNK_ROWS):
        index.add(np.asarray(vectors[start:start + CHUNK_ROWS], np.float32))
    return index


def build_index(embeddings, out, kind: str = "exact", column: str | None = None) -> Path:
    """Index the vectors of an `mlxclip embed --data` dir into `out`, shard by shard (memory: one shard)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "exact":
        _faiss()  # fail before any work when the extra is missing
    embeddings = Path(embeddings)
    manifest = read_manifest(embeddings)
    if not manifest.get("complete"):
        raise ValueError(f"{embeddings}: the embedding run has not finished; run `mlxclip embed` again to complete it")
    column = _pick_column(manifest, column)
    n, dims = manifest["rows"], manifest["dims"]
    with atomic_dir(out) as tmp:
        vectors = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=manifest["dtype"], shape=(n, dims))
        row = 0
        with pq.ParquetWriter(tmp / "items.parquet", _items_schema()) as items:
            for shard in manifest["shards"]:
                table = pq.read_table(embeddings / shard["file"])
                vectors[row:row + table.num_rows] = column_vectors(table, column)
                items.write_table(table.select(ITEM_COLUMNS).cast(_items_schema()))
                row += table.num_rows
        vectors.flush()
        settings = _faiss_settings(kind, n)
        if kind != "exact":
            _faiss().write_index(_faiss_index(kind, vectors, settings), str(tmp / "faiss.index"))
        info = {"kind": kind, "count": n, "dims": dims, "dtype": manifest["dtype"], "column": column,
                "model": manifest["model"], "embeddings": str(embeddings.resolve()), "faiss": settings}
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def _items_schema() -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("key", pa.string()), ("path", pa.string()), ("caption", pa.string()),
                      ("label", pa.int64())])


# ---- searching -------------------------------------------------------------------------------------------------------

class Index:
    """An index dir opened for search: `search(queries, k)` and `items(rows)`."""

    def __init__(self, path):
        self.path = Path(path)
        info_file = self.path / "index.json"
        if not info_file.is_file():
            raise FileNotFoundError(f"{self.path}: no index.json; build one with `mlxclip index`")
        self.info = json.loads(info_file.read_text())
        self.vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
        self._faiss_index = None
        self._items = None  # items.parquet, read on first use (serve --index answers many queries from one Index)

    @property
    def dims(self) -> int:
        return self.info["dims"]

    def search(self, queries, k: int = 10, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), (Q, k) each, best first. `exact=True` ignores a FAISS index (the reference for recall)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[-1] != self.dims:
            raise ValueError(f"queries have {queries.shape[-1]} dims, the index {self.dims}: a different model?")
        if exact or self.info["kind"] == "exact":
            return topk_exact(self.vectors, queries, k)
        scores, rows = self._faiss().search(queries, min(k, self.info["count"]))
        return scores, rows.astype(np.int64)

    def _faiss(self):
        if self._faiss_index is None:
            index = _faiss().read_index(str(self.path / "faiss.index"))
            settings = self.info["faiss"]
            if "nprobe" in settings:
                index.nprobe = settings["nprobe"]
            if "efSearch" in settings:
                index.hnsw.efSearch = settings["efSearch"]
            self._faiss_index = index
        return self._faiss_index

    def items(self, rows) -> list[dict]:
        if self._items is None:
            self._items = pq.read_table(self.path / "items.parquet")
        return self._items.take(pa.array(np.asarray(rows, np.int64))).to_pylist()

    def results(self, scores, rows) -> list[dict]:
        """Ranked hits of one query: rank, score, and the item's id, key, path, caption, label."""
        keep = rows >= 0  # FAISS pads with -1 when it finds fewer than k
        return [{"rank": r + 1, "score": float(s), **item}
                for r, (s, item) in enumerate(zip(scores[keep], self.items(rows[keep])))]


def query_vector(model, tokenizer, preprocess, text: str | None = None, image=None) -> np.ndarray:
    """The normalized embedding of a text or an image file (the same preprocessing as `mlxclip embed`)."""
    from mlx_clip.eval import encode_images, encode_texts

    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text or an image query")
    if text is not None:
        return encode_texts(model, tokenizer, [text])[0]
    return encode_images(model, preprocess, [str(image)])[0]


def search(index, model, text: str | None = None, image=None, k: int = 10) -> list[dict]:
    """`mlxclip search`: embed the query with `model` (dir, hub id or "builtin") and rank the index's items."""
    from mlx_clip.io import load

    index = index if isinstance(index, Index) else Index(index)
    query = query_vector(*load(model), text=text, image=image)
    scores, rows = index.search(query[None], k)
    return index.results(scores[0], rows[0])


def format_results(results: list[dict]) -> str:
    return "\n".join(f"{r['rank']:>4}  {r['score']:.4f}  {r['path']}" for r in results)
