"""mlx_clip.gpu_embedding (the token table's gradient summed in a fixed order on CUDA) against float64 numpy: the
gradient of a lookup with ids repeated as captions repeat them, the same bits on every evaluation, and a model's loss
gradients through it (the table's against float64 of what its lookup received, every other parameter's bit-equal to
MLX's scatter-add run). The kernel's tests need a CUDA device (`-m gpu`); the custom function's plumbing (which
gradient reaches the kernel, and none reaches the ids) and the keys' order are tested here on any device."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks.batches import caption_rows
from mlx_clip import gpu_embedding
from mlx_clip.config import get_config
from mlx_clip.model import CLIP

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="the table gradient is a CUDA kernel")


def _caption_ids(rng, rows: int, length: int, vocab: int) -> np.ndarray:
    """Rows as captions are (SOT, words from a 30-word vocabulary, EOT, zero padding): ids repeat within the batch,
    the padding id most of all."""
    return caption_rows(rng, rows, length, vocab, words=30, shortest=2, longest=length - 3)


def _table_gradient64(ids: np.ndarray, g: np.ndarray, vocab: int) -> np.ndarray:
    out = np.zeros((vocab, g.shape[-1]))
    np.add.at(out, ids.reshape(-1), g.reshape(-1, g.shape[-1]).astype(np.float64))
    return out


def test_the_lookup_hands_its_output_gradient_to_the_table_gradient(monkeypatch):
    """The custom function's backward gives table_gradient the lookup's output gradient, the ids and the table's
    shape and dtype, and the ids no gradient: with a float64 numpy table gradient in place of the kernel, the
    gradient of a weighted sum of looked-up rows equals MLX's own autodiff of weight[ids]."""
    seen = {}

    def numpy_table_gradient(g, ids, vocab, dtype):
        seen.update(shape=g.shape, vocab=vocab, dtype=dtype)
        return mx.array(_table_gradient64(np.array(ids), np.array(g), vocab).astype(np.float32)).astype(dtype)

    monkeypatch.setattr(gpu_embedding, "table_gradient", numpy_table_gradient)
    rng = np.random.default_rng(0)
    weight = mx.array(rng.standard_normal((40, 24)).astype(np.float32))
    ids = mx.array(_caption_ids(rng, 5, 9, 40))
    scale = mx.array(rng.standard_normal((5, 9, 24)).astype(np.float32))

    def loss(w, lookup):
        return (lookup(w, ids) * scale).sum()

    got = mx.grad(loss)(weight, gpu_embedding._lookup)
    want = mx.grad(loss)(weight, lambda w, i: w[i])
    assert seen == {"shape": (5, 9, 24), "vocab": 40, "dtype": mx.float32}
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    ids_grad = mx.grad(lambda w, i: (gpu_embedding._lookup(w, i) * scale).sum(), argnums=1)(weight, ids)
    assert not np.array(ids_grad).any()


def test_sorted_keys_put_each_ids_tokens_together_in_position_order():
    """The order the kernel sums in: decoded, the sorted keys list every token once, ids ascending, and within an id
    its positions ascending (this runs MLX's sort on any device; the kernel reads the keys this way on CUDA)."""
    ids = _caption_ids(np.random.default_rng(3), 12, 32, 49408)
    keys = np.array(gpu_embedding.sorted_keys(mx.array(ids))).astype(np.int64)
    n = ids.size
    order_ids, positions = keys // n, keys % n
    assert sorted(positions.tolist()) == list(range(n))
    assert np.array_equal(order_ids, ids.reshape(-1)[positions])
    assert np.array_equal(keys, np.sort(ids.reshape(-1).astype(np.int64) * n + np.arange(n)))


def test_off_cuda_the_lookup_is_mlx_own():
    weight, ids = mx.zeros((10, 8)), mx.array([[1, 2, 2]])
    with mx.stream(mx.cpu):
        assert not gpu_embedding.applies(weight, ids)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("width", [512, 520])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_table_gradient_matches_float64_and_repeats(width, dtype):
    """256 caption rows of 77 tokens (the padding id ~75% of them, each word hundreds of times): every table row is
    the float64 sum of its tokens' gradient rows (fp32 sums, rounded once to the table's dtype), the rows of ids not
    in the batch exactly zero, and three evaluations agree bit for bit."""
    rng = np.random.default_rng(1)
    vocab = 49408
    ids = _caption_ids(rng, 256, 77, vocab)
    g = mx.array(rng.standard_normal((256, 77, width)).astype(np.float32)).astype(dtype)
    weight = mx.zeros((vocab, width), dtype)
    assert gpu_embedding.applies(weight, mx.array(ids))
    want = _table_gradient64(ids, np.array(g.astype(mx.float32)), vocab)
    runs = [np.array(gpu_embedding.table_gradient(g, mx.array(ids), vocab, dtype).astype(mx.float32))
            for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    used = np.zeros(vocab, bool)
    used[ids.reshape(-1)] = True
    assert not runs[0][~used].any()
    rel = np.abs(runs[0][used] - want[used]).max(axis=1) / np.abs(want[used]).max(axis=1)
    assert rel.max() <= (1e-6 if dtype == mx.float32 else 4e-3)  # bf16: one rounding (2^-9 relative)


@cuda
@pytest.mark.gpu
def test_the_text_towers_gradients_through_it(monkeypatch):
    """The tiny model's loss gradients (fp32): the token table's is the float64 sum of the gradient rows its lookup
    received (each table row to 1e-6 of its largest entry) and the same bits on a second evaluation; every other
    parameter's gradient equals, bit for bit, the one made with MLX's scatter-add (the table's gradient feeds no
    other)."""
    mx.random.seed(0)
    cfg = get_config("tiny")
    model = CLIP(cfg)
    rng = np.random.default_rng(2)
    size, vocab = cfg.vision_config.image_size, cfg.text_config.vocab_size
    images = mx.array(rng.standard_normal((16, size, size, 3)).astype(np.float32))
    ids = mx.array(_caption_ids(rng, 16, cfg.text_config.max_position_embeddings, vocab))
    received = []
    kernel = gpu_embedding.table_gradient

    def recorded(g, ids, vocab, dtype):
        received.append((g, ids))
        return kernel(g, ids, vocab, dtype)

    monkeypatch.setattr(gpu_embedding, "table_gradient", recorded)

    def loss(params):
        model.update(params)
        image, text = model(images, ids)
        return (image @ text.T).sum()

    grad = mx.grad(loss)
    ours = [dict(tree_flatten(grad(model.trainable_parameters()))) for _ in range(2)]
    table = "text_model.embeddings.token_embedding.weight"
    g, looked_up = received[0]
    want = _table_gradient64(np.array(looked_up), np.array(g), vocab)
    got = np.array(ours[0][table])
    rows = np.abs(want).max(axis=1) > 0
    assert rows.sum() > 10 and not got[~rows].any()
    assert (np.abs(got - want)[rows].max(axis=1) / np.abs(want[rows]).max(axis=1)).max() <= 1e-6
    monkeypatch.setattr(gpu_embedding, "ENABLED", False)
    theirs = dict(tree_flatten(grad(model.trainable_parameters())))
    for name, value in ours[0].items():
        assert np.array_equal(np.array(value), np.array(ours[1][name])), name
        if name != table:
            assert np.array_equal(np.array(value), np.array(theirs[name])), name
