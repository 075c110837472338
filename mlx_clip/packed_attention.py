"""Attention over packed caption rows (tokenizer.pack_rows) by key windows instead of a (T, T) mask.

A packed group lays its rows one after another, T tokens in all, and a token attends to its own row's tokens up to
itself. With every row at most s + 1 tokens long, those tokens lie in the token's own block of s and the block before
it, so each block of s queries needs only a window of 2s keys: T · 2s scores where the whole mask needs T · T, and
the attention's work grows with T instead of T². At `small`'s b32 (two groups of 320 tokens, blocks of 32) that is a
fifth of the scores; a group may also grow past the 512 tokens where a T × T attention stopped paying for packing.

The window mask comes with the packed rows, made on the host (tokenizer.pack_rows, "window": 0 where a query may look,
-inf elsewhere); the outputs are those of the (T, T) mask, summed over fewer zero terms."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_clip import fastmath


@dataclass(frozen=True)
class RowWindows:
    """One packed group's attention structure, passed down the text encoder where a (T, T) mask would be."""

    window: mx.array  # (1, nb, s, 2s) additive: block i's queries against blocks i - 1 and i's keys
    segments: mx.array  # (1, T) each token's row slot in the group, -1 on padding

    def pooled_rows(self, positions: mx.array) -> mx.array:
        """Additive (1, 1, n, T) mask for the queries at `positions` (1, n) (a tower's last block, which runs its
        pooled tokens only)."""
        return row_mask(self.segments, positions)


def row_mask(segments: mx.array, positions: mx.array) -> mx.array:
    """Additive (1, 1, n, T) mask of packed rows `segments` (1, T) for the queries at `positions` (1, n): each sees
    its own row's tokens up to itself (all T positions: the group's whole (T, T) mask)."""
    own = mx.take_along_axis(segments, positions, axis=1)  # (1, n)
    order = mx.arange(segments.shape[-1])
    seen = (own[..., None] == segments[:, None, :]) & (order <= positions[..., None])
    return mx.where(seen, 0.0, -mx.inf)[:, None]


def attend(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float, rows: RowWindows) -> mx.array:
    """Attention of one group's (1, T, heads · Dh) projections under `rows`, returned as (1, T, heads · Dh)."""
    _, blocks, size, _ = rows.window.shape
    length = q.shape[1]

    def split(t: mx.array) -> mx.array:  # (1, T, heads · Dh) -> (heads, nb, s, Dh)
        return t.reshape(blocks, size, heads, -1).transpose(2, 0, 1, 3)

    def windows(t: mx.array) -> mx.array:  # (heads, nb, s, Dh) -> (heads, nb, 2s, Dh): the block before, then its own
        before = mx.concatenate([mx.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
        return mx.concatenate([before, t], axis=2)

    out = fastmath.attention(split(q), windows(split(k)), windows(split(v)), scale=scale,
                             mask=rows.window.astype(q.dtype))
    return out.transpose(1, 2, 0, 3).reshape(1, length, -1)
