"""`mlxclip index` / `search`: the exact index's top-k equals a numpy brute-force ranking; FAISS indexes' recall@10
against it is measured (and must be ~1 for the exact-equivalent IndexFlatIP); search through the CLI."""

import json

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlx_clip import embed_batch as eb
from mlx_clip.index import Index, build_index, recall_at_k, topk_exact
from mlx_clip.io import load

faiss = pytest.importorskip("faiss")
from cli_util import invoke  # noqa: E402


def _numpy_topk(vectors, queries, k):
    """Brute force: every score, a full stable sort (ties to the lower row)."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def _clustered(rng, n, dims, clusters=40):
    """Unit vectors around random centres, like embeddings of a collection with themes."""
    centres = rng.normal(size=(clusters, dims))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dims))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fake_embeddings(out, vectors, shard_size, dtype="float32"):
    """An embedding dir in the documented format, written here with pyarrow (not by mlx_clip's writer)."""
    out.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(vectors), shard_size)):
        v = vectors[start:start + shard_size]
        ids = list(range(start, start + len(v)))
        table = pa.table({
            "id": pa.array(ids, pa.int64()), "key": [f"k{j}" for j in ids], "path": [f"/x/{j}.png" for j in ids],
            "caption": [f"c{j}" for j in ids], "label": pa.array([j % 5 for j in ids], pa.int64()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.astype(dtype).ravel()), v.shape[1]),
        })
        pq.write_table(table, out / f"shard-{i:05d}.parquet")
        shards.append({"file": f"shard-{i:05d}.parquet", "rows": len(v)})
    manifest = {"model": "none", "dims": vectors.shape[1], "dtype": dtype, "columns": ["image_embedding"],
                "shards": shards, "rows": len(vectors), "complete": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = _clustered(rng, 3000, 48)
    queries = _clustered(rng, 50, 48)
    return _fake_embeddings(tmp_path_factory.mktemp("e") / "emb", vectors, 700), vectors, queries


def test_topk_exact_equals_numpy_across_chunks():
    rng = np.random.default_rng(1)
    vectors, queries = _clustered(rng, 1000, 32), _clustered(rng, 17, 32)
    for chunk in (64, 333, 5000):  # merging across many chunks, uneven chunks, one chunk
        scores, rows = topk_exact(vectors, queries, k=10, chunk_rows=chunk)
        ref_scores, ref_rows = _numpy_topk(vectors, queries, 10)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # Duplicate vectors: both copies are found, next to each other (which copy comes first is not fixed: a copy in
    # another chunk may score differently in the last bit).
    dup = np.concatenate([vectors[:50], vectors[:50]])
    np.testing.assert_array_equal(topk_exact(dup, queries, 10, chunk_rows=30)[1] % 50,
                                  _numpy_topk(dup, queries, 10)[1] % 50)
    assert topk_exact(vectors[:4], queries, k=10)[1].shape == (17, 4)  # k above N: all of them


def test_exact_index_top10_equals_numpy(collection, tmp_path):
    emb, vectors, queries = collection
    index = Index(build_index(emb, tmp_path / "idx"))
    assert index.info["count"] == 3000 and index.vectors.shape == (3000, 48)
    assert isinstance(index.vectors, np.memmap)
    scores, rows = index.search(queries, k=10)
    ref_scores, ref_rows = _numpy_topk(vectors, queries, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    hits = index.results(scores[0], rows[0])
    assert [h["path"] for h in hits] == [f"/x/{j}.png" for j in ref_rows[0]]
    assert [h["rank"] for h in hits] == list(range(1, 11)) and hits[0]["label"] == ref_rows[0][0] % 5


@pytest.mark.parametrize("kind,floor", [("faiss-flat", 0.999), ("faiss-ivf", 0.9), ("faiss-hnsw", 0.95)])
def test_faiss_recall_at_10(collection, tmp_path, kind, floor, capsys):
    emb, vectors, queries = collection
    index = Index(build_index(emb, tmp_path / kind, kind=kind))
    _, exact = _numpy_topk(vectors, queries, 10)
    _, found = index.search(queries, k=10)
    recall = recall_at_k(found, exact)
    with capsys.disabled():
        print(f"\n{kind}: recall@10 vs exact = {recall:.3f} ({index.info['faiss']})")
    assert recall >= floor


def test_float16_index_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    vectors = _clustered(rng, 500, 16)
    emb = _fake_embeddings(tmp_path / "emb", vectors, 200, dtype="float16")
    index = Index(build_index(emb, tmp_path / "idx"))
    assert index.vectors.dtype == np.float16
    stored = vectors.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(index.search(stored[:5], 10)[1], _numpy_topk(stored, stored[:5], 10)[1])
    with pytest.raises(ValueError, match="queries have 8 dims, the index 16"):
        index.search(np.ones((1, 8)), 3)
    with pytest.raises(ValueError, match="no 'text_embedding'"):
        build_index(emb, tmp_path / "t", column="text_embedding")


def test_cli_index_and_search_end_to_end(tmp_path):
    invoke("init", "--arch", "tiny", "--seed", 5, "--out", tmp_path / "tiny")
    rng = np.random.default_rng(4)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    invoke("embed", "--model", tmp_path / "tiny", "--data", tmp_path / "imgs", "--out", tmp_path / "emb",
            "--dtype", "float32", "--shard-size", 5)
    invoke("index", "--embeddings", tmp_path / "emb", "--out", tmp_path / "idx")
    out = invoke("search", "--index", tmp_path / "idx", "--model", tmp_path / "tiny", "--text", "a photo of a",
                  "--k", 4, "--json").output
    hits = json.loads(out)
    model, tok, _ = load(tmp_path / "tiny")
    vectors, table = eb.read_vectors(tmp_path / "emb")
    query = np.array(model.encode_text(tok(["a photo of a"]), normalize=True))
    _, ref = _numpy_topk(vectors, query, 4)
    assert [h["path"] for h in hits] == [table.column("path")[int(j)].as_py() for j in ref[0]]
    image = tmp_path / "imgs" / "a" / "7.png"
    text = invoke("search", "--index", tmp_path / "idx", "--model", tmp_path / "tiny", "--image", image,
                   "--k", 3).output.splitlines()
    assert len(text) == 3 and text[0].split()[0] == "1" and text[0].split()[2] == str(image)  # itself first
    assert float(text[0].split()[1]) == pytest.approx(1.0, abs=1e-5)
