"""Packed caption rows attended by key windows (mlx_clip.packed_attention, tokenizer.pack_rows' "window"): the window
mask allows exactly what the (T, T) rule allows, attention values and gradients equal float64 torch under the full
mask, and the text tower's gradients equal those of the (T, T) packing (itself checked against open_clip in
tests/test_parity.py)."""

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_clip.config import get_config
from mlx_clip.model import CLIP
from mlx_clip.packed_attention import RowWindows, attend
from mlx_clip.tokenizer import pack_rows
from token_rows import ragged_rows  # noqa: E402  (tests/ is on sys.path under pytest)


def _dense_rule(segments: np.ndarray) -> np.ndarray:
    """(T,) slots -> (T, T) bool: a query sees its own slot's tokens at or before it."""
    order = np.arange(len(segments))
    return (segments[:, None] == segments[None, :]) & (order[None, :] <= order[:, None])


LENGTHS = [33, 7, 29, 12, 33, 3, 30, 18, 25, 9, 31, 14]  # up to s + 1 = 33 tokens, rows crossing blocks of 32


@pytest.mark.parametrize("parts", [1, 2])
def test_window_mask_allows_what_the_full_mask_allows(parts):
    ids, eot = ragged_rows(LENGTHS, 40)
    packed = pack_rows(ids, eot, parts)
    window = packed["window"]
    _, blocks, size, keys = window.shape
    assert size == 32 and keys == 64 and blocks * size == packed["ids"].shape[1] and blocks >= 3
    for g in range(parts):
        segments = packed["segments"][g]
        dense = _dense_rule(segments)
        for i in range(blocks):
            for r in range(size):
                query = i * size + r
                seen = window[g, i, r] == 0
                places = np.concatenate([np.arange(i * size - size, i * size), np.arange(i * size, i * size + size)])
                allowed = {int(p) for p, s in zip(places, seen) if s}
                want = set(np.flatnonzero(dense[query]).tolist())
                if segments[query] >= 0:
                    assert allowed == want, (g, query)  # a real token: exactly its row up to itself
                else:
                    assert query in allowed and allowed <= want  # padding: itself at least, never a real token


def test_no_window_for_long_rows_or_short_groups():
    ids, eot = ragged_rows([40, 5, 6, 7, 8, 9], 48)  # a 40-token row needs blocks of 64; 96 tokens are under 3 of them
    assert "window" not in pack_rows(ids, eot, 1)
    ids, eot = ragged_rows([20, 20], 32)  # 40 tokens, two blocks of 32 at most
    packed = pack_rows(ids, eot, 1, multiple=16)
    assert packed is not None and "window" not in packed


def _torch_attention(q, k, v, heads, scale, allowed):
    """float64 torch attention of (T, heads · Dh) projections under a (T, T) bool mask, heads split as the model's."""
    t = lambda x: x.reshape(x.shape[0], heads, -1).transpose(0, 1)  # noqa: E731
    scores = (t(q) * scale) @ t(k).transpose(-1, -2)
    scores = scores.masked_fill(~torch.from_numpy(allowed), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ t(v)
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def test_attend_equals_full_mask_attention_in_float64_torch():
    heads, width = 2, 32
    ids, eot = ragged_rows(LENGTHS, 40)
    packed = pack_rows(ids, eot, 1)
    segments, total = packed["segments"][0], packed["ids"].shape[1]
    rng = np.random.default_rng(1)
    q, k, v, probe = (rng.standard_normal((total, width)).astype(np.float32) for _ in range(4))
    real = segments >= 0
    probe[~real] = 0.0  # padding tokens' outputs are never read (the pooled token ends each row)
    rows = RowWindows(mx.array(packed["window"]), mx.array(packed["segments"]))
    scale = (width // heads) ** -0.5

    def loss(q, k, v):
        out = attend(q[None], k[None], v[None], heads, scale, rows)[0]
        return (out * mx.array(probe)).sum(), out

    (value, out), grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(mx.array(q), mx.array(k), mx.array(v))
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    ref = _torch_attention(tq, tk, tv, heads, scale, _dense_rule(segments))
    (ref * torch.from_numpy(probe).double()).sum().backward()
    np.testing.assert_allclose(np.array(out)[real], ref.detach().numpy()[real], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-4, atol=1e-5)


def test_text_tower_gradients_equal_the_full_mask_packing():
    model = CLIP(get_config("tiny"))
    ids, eot = ragged_rows(LENGTHS, 77)
    probe = mx.array(np.random.default_rng(2).standard_normal((len(LENGTHS), model.config.projection_dim)),
                     dtype=mx.float32)
    results = []
    for windowed in (True, False):
        packed = pack_rows(ids, eot, 1, windowed=windowed)
        assert ("window" in packed) == windowed
        rows = {k: mx.array(v) for k, v in packed.items()}
        loss = lambda m: (m.encode_text(rows) * probe).sum()  # noqa: B023,E731
        value, grads = nn.value_and_grad(model, loss)(model)
        results.append((value.item(), dict(tree_flatten(grads))))
    (v_win, g_win), (v_full, g_full) = results
    assert v_win == pytest.approx(v_full, rel=1e-5)
    text = [k for k in g_full if k.startswith("text_model.") or k.startswith("text_projection")]
    assert len(text) > 20
    for key in text:
        a, b = np.array(g_win[key]), np.array(g_full[key])
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), key


def test_windows_take_precedence_over_sliced_attention():
    """A model with --attention-chunk set still encodes windowed packed rows (the windows are already T x 2s): the
    same features as without the chunk setting."""
    from mlx_clip.memory import configure

    model = CLIP(get_config("tiny"))
    ids, eot = ragged_rows(LENGTHS, 77)
    rows = {k: mx.array(v) for k, v in pack_rows(ids, eot, 1).items()}
    plain = np.array(model.encode_text(rows))
    configure(model, attention_chunk=16)
    np.testing.assert_array_equal(np.array(model.encode_text(rows)), plain)
