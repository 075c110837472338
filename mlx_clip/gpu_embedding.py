"""The token embedding's gradient on CUDA GPUs, summed in a fixed order so that a training run repeats bit for bit.

MLX differentiates a lookup `weight[ids]` into a scatter-add, which on CUDA adds each token's gradient row into the
table with atomics (mlx/backend/cuda/device/scatter_ops.cuh, ScatterSum). Captions repeat ids within a batch (SOT,
EOT, padding, "a photo of"), and the rows of a repeated id are then added in the order the atomics land, which changes
from run to run (and, for a bf16 table, each add rounds to bf16). So two identical runs end with different weights: on
an H200 tests/test_finetune.py::test_a_nonfinite_step_is_as_if_it_never_happened failed (sessions 17-18,
benchmarks/results/gpu-s18-h200.md §1), where torch's embedding backward (a sort and segment sums) repeats.

Here the gradient is made the same way torch makes it: every token's key id * N + position (N tokens), sorted (the keys
are unique, so whatever sort MLX runs, the order is the same), then one block per sorted position; the block at the
first position of an id's run sums that id's rows in position order (its warps every 8th row, fp32 registers, the
warps' sums added in warp order, as gpu_reduce's column sum) and writes the table's row once, rounded to the table's
dtype. Rows of ids not in the batch stay zero (the output's init value). Every gradient row is read once.

Scope: CUDA, a float32 / bfloat16 / float16 table whose width is a multiple of 8 (≤ gpu_reduce.MAX_WIDTH), vocab ×
tokens < 2^32 (the 32-bit keys). Anything else, and MLXCLIP_GPU_EMBEDDING=0, takes MLX's lookup and its scatter-add.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import gpu_reduce
from mlx_clip.switches import env_switch

ENABLED = env_switch("MLXCLIP_GPU_EMBEDDING", True)  # read when a graph is traced
WARPS = 8  # a block's warps, each taking every 8th row of its id's run

# The table's gradient from sorted keys (N,) uint32 (id * N + position) and the tokens' gradient rows g (N, C): out
# (V, C), zero where no token has the id. Template: T (g's dtype), C, NC = ceil(C / 256), V (the table's rows).
TABLE_GRADIENT = r"""
  using namespace mlxclip_reduce;
  const unsigned int N = keys_shape[0];
  const unsigned int first = blockIdx.x, id = keys[first] / N;
  if (id >= V) return;  // an id outside the table (its lookup read nothing valid either): never write past the table
  if (first > 0 && keys[first - 1] / N == id) return;  // not where its id's run starts: that block sums the run
  __shared__ __align__(16) float sums[256 * NC];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float acc[NC][8] = {};
  for (unsigned int i = first + warp; i < N && keys[i] / N == id; i += warps) {
    const size_t row = keys[i] % N;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int col = 256 * j + 8 * lane;
      if (col < C) {
        float v[8];
        load8(g + row * C + col, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] += v[e];
      }
    }
  }
  block_sums<NC, C>(acc, sums, out + (size_t)id * C, warp, lane);
"""

_DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def applies(weight: mx.array, ids: mx.array) -> bool:
    """Whether the lookup's gradient is made by our kernel (decided when a graph is traced)."""
    vocab, width = weight.shape
    return (ENABLED and gpu_reduce.cuda_device() and weight.dtype in _DTYPES and width % 8 == 0
            and width <= gpu_reduce.MAX_WIDTH and vocab * max(ids.size, 1) < 2 ** 32
            and ids.size * 32 * WARPS < 2 ** 31)  # a block a token: the launch's thread count fits a 32-bit int


@lru_cache(maxsize=None)
def _kernel():
    return mx.fast.cuda_kernel(name="mlxclip_embedding_gradient", input_names=["keys", "g"], output_names=["out"],
                               source=TABLE_GRADIENT, header=gpu_reduce.HEADER)


def sorted_keys(ids: mx.array) -> mx.array:
    """id * N + position for each of the N tokens, sorted: each id's tokens together, in position order."""
    n = ids.size
    return mx.sort(ids.reshape(-1).astype(mx.uint32) * n + mx.arange(n, dtype=mx.uint32))


def table_gradient(g: mx.array, ids: mx.array, vocab: int, dtype: mx.Dtype) -> mx.array:
    """Σ of g's rows per id as a (vocab, width) array of `dtype`: the gradient of weight[ids] given g (ids' shape +
    (width,)), by our kernel (applies() true)."""
    n, width = ids.size, g.shape[-1]
    (out,) = _kernel()(inputs=[sorted_keys(ids), g.reshape(n, width)],
                       template=[("T", g.dtype), ("C", width), ("NC", -(-width // 256)), ("V", vocab)],
                       grid=(n * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
                       output_shapes=[(vocab, width)], output_dtypes=[dtype], init_value=0)
    return out


@mx.custom_function
def _lookup(weight: mx.array, ids: mx.array) -> mx.array:
    return weight[ids]


@_lookup.vjp
def _lookup_vjp(primals, cotangent, output):
    weight, ids = primals
    return table_gradient(cotangent, ids, weight.shape[0], weight.dtype), mx.zeros_like(ids)


def lookup(weight: mx.array, ids: mx.array) -> mx.array:
    """weight[ids], differentiated by our fixed-order kernel where it applies, else by MLX's scatter-add."""
    return _lookup(weight, ids) if applies(weight, ids) else weight[ids]


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter, same quantization) whose lookup's gradient repeats run to run on CUDA."""

    def __call__(self, x: mx.array) -> mx.array:
        return lookup(self.weight, x)
