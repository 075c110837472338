"""Multi-tensor AdamW and gradient sum of squares on CUDA: one kernel launch for up to 64 parameters (issue 7).

A compiled ViT-B/32 train step on a GPU is bound by the host, not the device: building its graph and queueing its ~6,600
operations takes ~70 ms while the H200 finishes ~2 ms after the last one is queued (`python -m benchmarks.gpu_host`). A
third of those operations is the optimizer: per parameter a sum of squares for the gradient norm (a cuBLAS dot product
until change 17), the views around it and an update kernel, ~400 times. Here (as torch's foreach/fused AdamW) one launch
covers a chunk of parameters: the kernel's blocks walk a table of tiles (tensor, start, end), so each block works on one
tensor and the switch that picks its pointers costs nothing.

The arithmetic is `GroupedAdamW._adamw`'s, in fp32 for every dtype (the moments come out fp32, as they do there after
the first step); the gradient-clip factor, the non-finite guard (gradient 0, moment weights 1, LR 0 on a skipped step)
and each parameter's LR scale and weight decay are applied inside.

Opt-in (`MLXCLIP_MULTI_TENSOR=1`): on H200s, same process, the ViT-B/32 b256 step went 72.4 -> 68.3 ms on one machine
(slow host) and 55.0 -> 57.3 ms on another (device-bound: the kernels read row-contiguous arrays, so the transposed
weight gradients MLX's matmul backward returns are copied first), with ~1 GiB more peak memory in both
(benchmarks/perf-notes.md, change 14).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from mlx_clip.gpu_reduce import cuda_device
from mlx_clip.switches import env_switch

MAX_TENSORS = 64  # per launch: 7 pointers each (p, g, m, v in; p, m, v out) stay under the classic 4 KB of arguments
# the strided sum of squares: each tensor adds its pointer, Shape (40 B) and Strides (80 B) to the arguments
STRIDED_MAX_TENSORS = 24
THREADS = 256
TILE = THREADS * 16  # elements per thread block

ENABLED = env_switch("MLXCLIP_MULTI_TENSOR", False)

_HEADER = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mlxclip_mt {

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half(x); }

template <typename P, typename G, typename M, typename V, typename PO, typename MO, typename VO>
__device__ void adamw(const P* p, const G* g, const M* m, const V* v, PO* po, MO* mo, VO* vo, int start,
                      int end, float ok, float gscale, float keep_m, float keep_v, float c1, float c2, float eps,
                      float decay) {
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) {
    // A skipped step (ok == 0) must not read an inf/nan gradient into the moments: select, do not multiply.
    const float gj = ok != 0.0f ? to_float(g[j]) * gscale : 0.0f;
    // the moments in the state's dtypes (optim.moment_dtypes: m bf16 for bf16 weights), read back as stored, as
    // GroupedAdamW's per-parameter update does
    const MO mj = from_float<MO>(keep_m * to_float(m[j]) + (1.0f - keep_m) * gj);
    const VO vj = from_float<VO>(keep_v * to_float(v[j]) + (1.0f - keep_v) * gj * gj);
    po[j] = from_float<PO>(to_float(p[j]) * decay - c1 * to_float(mj) / (sqrtf(to_float(vj)) * c2 + eps));
    mo[j] = mj;
    vo[j] = vj;
  }
}

template <typename G>
__device__ float sum_squares(const G* g, int start, int end) {
  float acc = 0.0f;
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) {
    const float x = to_float(g[j]);
    acc += x * x;
  }
  return acc;
}

// Σ x² of one tensor whatever its layout, so nothing is copied first: a dense tensor (row- or column-major, as the
// transposed weight gradients autodiff hands back) is read in memory order, since a sum of squares does not depend on
// the order; anything else (a broadcast, a slice) element by element through its strides.
template <typename G, typename S, typename T>
__device__ float sum_squares_strided(const G* g, const S& shape, const T& strides, int ndim, int start, int end) {
  bool row = true, col = true;
  long long step_r = 1, step_c = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    row = row && (shape[d] == 1 || strides[d] == step_r);
    step_r *= shape[d];
  }
  for (int d = 0; d < ndim; ++d) {
    col = col && (shape[d] == 1 || strides[d] == step_c);
    step_c *= shape[d];
  }
  float acc = 0.0f;
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) {
    long long loc = j;
    if (!row && !col) {
      loc = 0;
      long long rest = j;
      for (int d = ndim - 1; d >= 0; --d) {
        loc += (rest % shape[d]) * strides[d];
        rest /= shape[d];
      }
    }
    const float x = to_float(g[loc]);
    acc += x * x;
  }
  return acc;
}

// The block's total lands in thread 0 (warp shuffles, then one value per warp through shared memory).
__device__ float block_sum(float x) {
  __shared__ float warps[32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffff, x, o);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = x;
  __syncthreads();
  x = threadIdx.x < (blockDim.x >> 5) ? warps[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffff, x, o);
  }
  return x;
}

}  // namespace mlxclip_mt
"""

# Inputs after the tensors: tiles (int32 [n, 3]: tensor, start, end), hp (fp32 [K, 2]: LR scale, weight decay),
# lr, step, gscale (clip factor), finite. B1, B2, EPS are written into the source as float literals.
_ADAMW_HEAD = r"""
  const int t = tiles[3 * blockIdx.x], start = tiles[3 * blockIdx.x + 1], end = tiles[3 * blockIdx.x + 2];
  const float ok = finite[0] ? 1.0f : 0.0f;
  const float s = static_cast<float>(step[0]);
  const float lr_t = lr[0] * hp[2 * t] * ok;
  const float c1 = lr_t / (1.0f - powf(B1, s)), c2 = rsqrtf(1.0f - powf(B2, s));
  const float keep_m = 1.0f - (1.0f - B1) * ok, keep_v = 1.0f - (1.0f - B2) * ok;
  const float decay = 1.0f - lr_t * hp[2 * t + 1];
  switch (t) {
"""
_ADAMW_CASE = ("    case {i}: mlxclip_mt::adamw(p{i}, g{i}, m{i}, v{i}, po{i}, mo{i}, vo{i}, start, end, ok, gscale[0], "
               "keep_m, keep_v, c1, c2, EPS, decay); break;\n")
_SUMSQ_HEAD = r"""
  const int t = tiles[3 * blockIdx.x], start = tiles[3 * blockIdx.x + 1], end = tiles[3 * blockIdx.x + 2];
  float acc = 0.0f;
  switch (t) {
"""
_SUMSQ_CASE = "    case {i}: acc = mlxclip_mt::sum_squares(g{i}, start, end); break;\n"
_SUMSQ_STRIDED_CASE = ("    case {i}: acc = mlxclip_mt::sum_squares_strided(g{i}, g{i}_shape, g{i}_strides, g{i}_ndim, "
                       "start, end); break;\n")
_SUMSQ_TAIL = r"""
  acc = mlxclip_mt::block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
"""


def applies(arrays: list[mx.array], switched_on: bool | None = None) -> bool:
    """Whether the multi-tensor kernels take these arrays: switched on (ENABLED unless given), a CUDA device, float
    arrays."""
    on = ENABLED if switched_on is None else switched_on
    return on and cuda_device() and len(arrays) > 0 and all(mx.issubdtype(a.dtype, mx.floating) for a in arrays)


def _literal(x: float) -> str:
    return f"{float(x)!r}f"


def adamw_source(count: int, b1: float, b2: float, eps: float) -> str:
    return "".join([f"  constexpr float B1 = {_literal(b1)}, B2 = {_literal(b2)}, EPS = {_literal(eps)};\n",
                    _ADAMW_HEAD, *(_ADAMW_CASE.format(i=i) for i in range(count)), "  }\n"])


@lru_cache(maxsize=None)
def _adamw_kernel(count: int, b1: float, b2: float, eps: float):
    names = [f"{k}{i}" for k in "pgmv" for i in range(count)]
    return mx.fast.cuda_kernel(name=f"mlxclip_multi_adamw_{count}", header=_HEADER,
                               source=adamw_source(count, b1, b2, eps),
                               input_names=names + ["tiles", "hp", "lr", "step", "gscale", "finite"],
                               output_names=[f"{k}{i}" for k in ("po", "mo", "vo") for i in range(count)])


def sumsq_source(count: int) -> str:
    return "".join([_SUMSQ_HEAD, *(_SUMSQ_CASE.format(i=i) for i in range(count)), "  }\n", _SUMSQ_TAIL])


@lru_cache(maxsize=None)
def _sumsq_kernel(count: int):
    return mx.fast.cuda_kernel(name=f"mlxclip_multi_sumsq_{count}", header=_HEADER, source=sumsq_source(count),
                               input_names=[f"g{i}" for i in range(count)] + ["tiles"], output_names=["partial"])


def sumsq_strided_source(count: int) -> str:
    return "".join([_SUMSQ_HEAD, *(_SUMSQ_STRIDED_CASE.format(i=i) for i in range(count)), "  }\n", _SUMSQ_TAIL])


@lru_cache(maxsize=None)
def _sumsq_strided_kernel(count: int):
    # ensure_row_contiguous=False: MLX would otherwise copy every transposed gradient before the launch
    return mx.fast.cuda_kernel(name=f"mlxclip_multi_sumsq_strided_{count}", header=_HEADER,
                               source=sumsq_strided_source(count), output_names=["partial"],
                               input_names=[f"g{i}" for i in range(count)] + ["tiles"], ensure_row_contiguous=False)


@lru_cache(maxsize=None)
def _tiles(sizes: tuple[int, ...]) -> mx.array:
    """(tensor, start, end) for every TILE-element piece of the chunk's tensors, as int32 [n, 3]."""
    rows = [(t, start, min(start + TILE, size)) for t, size in enumerate(sizes) for start in range(0, size, TILE)]
    return mx.array(rows, dtype=mx.int32)


@lru_cache(maxsize=None)
def _hp(hparams: tuple[tuple[float, float], ...]) -> mx.array:
    return mx.array(hparams, dtype=mx.float32)


def _chunks(n: int, size: int = MAX_TENSORS) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def sum_of_squares(grads: list[mx.array]) -> mx.array:
    """Σ g² over all `grads` (fp32 scalar), one launch per 64 arrays."""
    totals = []
    for chunk in _chunks(len(grads)):
        gs = [grads[i] for i in chunk]
        tiles = _tiles(tuple(g.size for g in gs))
        (partial,) = _sumsq_kernel(len(gs))(inputs=[*gs, tiles], grid=(tiles.shape[0] * THREADS, 1, 1),
                                            threadgroup=(THREADS, 1, 1), output_shapes=[(tiles.shape[0],)],
                                            output_dtypes=[mx.float32])
        totals.append(partial.sum())
    return sum(totals[1:], totals[0])


def sum_of_squares_strided(grads: list[mx.array]) -> mx.array:
    """Σ g² over all `grads` (fp32 scalar), each read where it lies: no copies (transposed gradients included), one
    launch per STRIDED_MAX_TENSORS arrays, and one sum of all the launches' partials: ~20 graph nodes for a ViT-B/32
    step's ~400 gradients, where the per-gradient way makes 2 each (`train.step.NORM_SQUARES = "kernel"`)."""
    partials = []
    for chunk in _chunks(len(grads), STRIDED_MAX_TENSORS):
        gs = [grads[i] if grads[i].ndim else grads[i].reshape(1) for i in chunk]  # MLX passes no shape for 0-d inputs
        tiles = _tiles(tuple(g.size for g in gs))
        (partial,) = _sumsq_strided_kernel(len(gs))(inputs=[*gs, tiles], grid=(tiles.shape[0] * THREADS, 1, 1),
                                                    threadgroup=(THREADS, 1, 1), output_shapes=[(tiles.shape[0],)],
                                                    output_dtypes=[mx.float32])
        partials.append(partial)
    return (mx.concatenate(partials) if len(partials) > 1 else partials[0]).sum()


def adamw(params: list[mx.array], grads: list[mx.array], ms: list[mx.array], vs: list[mx.array],
          hparams: list[tuple[float, float]], lr: mx.array, step: mx.array, gradient_scale: mx.array,
          finite: mx.array, betas: tuple[float, float], eps: float):
    """AdamW over parallel lists (see GroupedAdamW._adamw); `hparams` is each parameter's (LR scale, weight decay).
    Returns the new parameters and moments, each in its input's dtype (optim.moment_dtypes)."""
    new_p, new_m, new_v = [], [], []
    scalars = [lr.astype(mx.float32), step, gradient_scale.astype(mx.float32), finite]
    for chunk in _chunks(len(params)):
        p, g, m, v = ([xs[i] for i in chunk] for xs in (params, grads, ms, vs))
        tiles = _tiles(tuple(x.size for x in p))
        hp = _hp(tuple(hparams[i] for i in chunk))
        count = len(p)
        out = _adamw_kernel(count, *betas, eps)(
            inputs=[*p, *g, *m, *v, tiles, hp, *scalars], grid=(tiles.shape[0] * THREADS, 1, 1),
            threadgroup=(THREADS, 1, 1), output_shapes=[x.shape for x in p] * 3,
            output_dtypes=[x.dtype for x in (*p, *m, *v)])
        new_p += out[:count]
        new_m += out[count : 2 * count]
        new_v += out[2 * count :]
    return new_p, new_m, new_v
