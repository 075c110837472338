"""The gradients' column sums on CUDA GPUs (issue 7, benchmarks/perf-notes.md change 30): bias gradients, and the
LayerNorm backward with its gain and bias gradients, as our own kernels.

A bias gradient is Σ over tokens of the layer's output gradient, a LayerNorm gain gradient Σ over tokens of g · x̂.
MLX makes each a column reduction (`col_reduce_looped`), which reads a (tokens, width) bf16 gradient of ViT-B/16 at
~1/5 of the card's bandwidth: 18.9 ms of a 118 ms train step's kernels on an H200 (results/gpu-s13-h200.md), where
the bytes alone take ~3 ms. Its LayerNorm backward also writes g · x̂ for every element before reducing it.

Here a warp takes whole rows (lane l holds columns 256 j + 8 l .. + 7, 16-byte loads), sums in fp32 registers over
its rows, and a block adds its warps' sums in a fixed order (no atomics: the result is the same on every run) into one
row of a (blocks, width) fp32 partial, which MLX sums. The LayerNorm kernel recomputes each row's mean and 1/std,
writes dx, and keeps g · x̂ and g in those registers: x and g are read once, and nothing of size (tokens, width) is
written but dx.

Scope: CUDA, float32 / bfloat16 / float16 arrays whose last axis is a multiple of 8 (LayerNorm: width ≤ 1024, the
same dtype for x, gain and gradient), at least MIN_ROWS rows. Anything else, and MLXCLIP_GPU_REDUCE=0, takes MLX's ops.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from mlx_clip.switches import env_switch

ENABLED = env_switch("MLXCLIP_GPU_REDUCE", True)  # read when a graph is traced
# The LayerNorm forward by our kernel too (opt-in: MLX's took 98 us a (50432, 768) bf16 launch on an H200, ~3x what
# its bytes take, but an H200's ViT-B/32 step measured 84.7 vs 82.0 ms with ours; results/gpu-s15-h200.md §2)
LN_FORWARD = env_switch("MLXCLIP_GPU_LAYER_NORM_FORWARD", False)
# The (blocks, width) partials summed and cast by our FINISH kernel, one launch, where MLX's column reduction and cast
# take two (three for the LayerNorm's two gradients): ~230 fewer launches a ViT-B/32 step, whose time is the host's
# (results/gpu-s15-h200.md §4). Opt-in until measured on a card.
FINISH_KERNEL = env_switch("MLXCLIP_GPU_REDUCE_FINISH", False)
MIN_ROWS = 1024  # below, left to MLX: the kernels' fixed cost (a partial sum and a cast) would dominate (not measured)
MAX_WIDTH = 4096  # the column sum's registers: 8 * ceil(width / 256) fp32 sums a lane
MAX_LN_WIDTH = 1024  # the LayerNorm kernel keeps x, g and two sums of a row in registers
MAX_BLOCKS = 512  # partial rows; ViT-B/16's batch (50,432 rows) gives each warp 12-25 rows
# Warps a block: the column sum (48 registers at width 768) keeps 5 blocks of 8 an SM; the LayerNorm backward (130)
# fits 15 warps an SM by registers, which blocks of 4 reach (3 blocks; one block of 8 would leave 8)
SUM_WARPS, LN_WARPS = 8, 4
_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

# 8-element vector loads and stores in fp32 registers, shared with mlx_clip.gpu_activation's kernels
VECTORS = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mlxclip_reduce {
// 8 consecutive values as fp32, and back (rows are 16-byte aligned: the width is a multiple of 8)
__device__ inline void load8(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
// the 16-bit types through their 2-element vector types
__device__ inline float2 widen(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ inline float2 widen(__half2 h) { return __half22float2(h); }
__device__ inline void narrow(float a, float b, __nv_bfloat162* h) { *h = __floats2bfloat162_rn(a, b); }
__device__ inline void narrow(float a, float b, __half2* h) { *h = __floats2half2_rn(a, b); }
template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> { typedef __nv_bfloat162 type; };
template <> struct Pair<__half> { typedef __half2 type; };

template <typename T>
__device__ inline void load8(const T* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const typename Pair<T>::type* h = reinterpret_cast<const typename Pair<T>::type*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = widen(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ inline void store8(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ inline void store8(T* p, const float* v) {
  uint4 raw;
  typename Pair<T>::type* h = reinterpret_cast<typename Pair<T>::type*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) narrow(v[2 * i], v[2 * i + 1], h + i);
  *reinterpret_cast<uint4*>(p) = raw;
}
}  // namespace mlxclip_reduce
"""

HEADER = VECTORS + r"""
namespace mlxclip_reduce {
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// A row's NC chunks of 8 columns (lane l: columns 256 j + 8 l ..) into xv, and its mean and 1 / std (the variance
// around the mean, in fp32, as MLX's LayerNorm computes them)
template <int NC, int C, typename T>
__device__ inline void row_stats(const T* row, float (*xv)[8], int lane, float eps, float* mean, float* rstd) {
  float total = 0.0f;
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int col = 256 * j + 8 * lane;
    if (col < C) load8(row + col, xv[j]);
#pragma unroll
    for (int e = 0; e < 8; ++e) total += col < C ? xv[j][e] : 0.0f;
  }
  *mean = warp_sum(total) / C;
  float squares = 0.0f;
#pragma unroll
  for (int j = 0; j < NC; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float d = xv[j][e] - *mean;
      squares += 256 * j + 8 * lane < C ? d * d : 0.0f;
    }
  *rstd = rsqrtf(warp_sum(squares) / C + eps);
}

__device__ inline void store1(float* p, float v) { *p = v; }
__device__ inline void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ inline void store1(__half* p, float v) { *p = __float2half_rn(v); }

// The block's warps add their column sums into sums (256 NC floats), warp after warp (a fixed order), then the block
// writes columns [0, C) of its row of `partial` (fp32 partial sums, or a finished row in its own dtype: store1).
template <int NC, int C, typename O>
__device__ inline void block_sums(float (*acc)[8], float* sums, O* partial, int warp, int lane) {
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        float* s = sums + 256 * j + 8 * lane;
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = w == 0 ? acc[j][e] : s[e] + acc[j][e];
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) store1(partial + c, sums[c]);
}

}  // namespace mlxclip_reduce
"""

# Σ over the rows of a (rows, C) array: out `partial` (blocks, C) fp32. Template: T, C, NC = ceil(C / 256); the row
# count is read at run time (x_shape[0]), so one kernel serves every batch and caption length.
COLUMN_SUM = r"""
  using namespace mlxclip_reduce;
  const int N = x_shape[0];
  __shared__ __align__(16) float sums[256 * NC];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float acc[NC][8] = {};
#pragma unroll 2
  for (int row = blockIdx.x * warps + warp; row < N; row += gridDim.x * warps) {  // two rows' loads in flight
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int col = 256 * j + 8 * lane;
      if (col < C) {
        float v[8];
        load8(x + (size_t)row * C + col, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] += v[e];
      }
    }
  }
  block_sums<NC, C>(acc, sums, partial + (size_t)blockIdx.x * C, warp, lane);
"""

# LayerNorm backward over the last axis of (N, C) x with gain w, output gradient g: dx (N, C) and `partial`
# (blocks, 2, C) fp32, row 0 Σ g x̂ (the gain's gradient), row 1 Σ g (the bias's). x̂ = (x - mean) / sqrt(var + EPS)
# as MLX's forward computes it (fp32, variance around the mean); dx = rstd (g w - mean(g w) - x̂ mean(g w x̂)).
LAYER_NORM_BACKWARD = r"""
  using namespace mlxclip_reduce;
  const int N = x_shape[0];
  __shared__ __align__(16) float sums[256 * NC];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float dw_acc[NC][8] = {}, db_acc[NC][8] = {};
  for (int row = blockIdx.x * warps + warp; row < N; row += gridDim.x * warps) {
    float xv[NC][8], gv[NC][8], mean, rstd;
#pragma unroll
    for (int j = 0; j < NC; ++j)
      if (256 * j + 8 * lane < C) load8(g + (size_t)row * C + 256 * j + 8 * lane, gv[j]);
    row_stats<NC, C>(x + (size_t)row * C, xv, lane, EPS, &mean, &rstd);
    float s1 = 0.0f, s2 = 0.0f;  // Σ g w and Σ g w x̂ over the row
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int col = 256 * j + 8 * lane;
      if (col < C) {
        float wv[8];
        load8(w + col, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          xv[j][e] = (xv[j][e] - mean) * rstd;  // x̂ from here on
          dw_acc[j][e] += gv[j][e] * xv[j][e];
          db_acc[j][e] += gv[j][e];
          gv[j][e] *= wv[e];  // g w from here on
          s1 += gv[j][e];
          s2 += gv[j][e] * xv[j][e];
        }
      }
    }
    s1 = warp_sum(s1) / C;
    s2 = warp_sum(s2) / C;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int col = 256 * j + 8 * lane;
      if (col < C) {
        float out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = rstd * (gv[j][e] - s1 - xv[j][e] * s2);
        store8(dx + (size_t)row * C + col, out);
      }
    }
  }
  block_sums<NC, C>(dw_acc, sums, partial + (size_t)blockIdx.x * 2 * C, warp, lane);
  __syncthreads();
  block_sums<NC, C>(db_acc, sums, partial + ((size_t)blockIdx.x * 2 + 1) * C, warp, lane);
"""


# LayerNorm forward: y = (x - mean) / sqrt(var + EPS) w + b over the last axis of (N, C) x, a warp a row.
LAYER_NORM_FORWARD = r"""
  using namespace mlxclip_reduce;
  const int N = x_shape[0];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int row = blockIdx.x * warps + warp; row < N; row += gridDim.x * warps) {
    float xv[NC][8], mean, rstd;
    row_stats<NC, C>(x + (size_t)row * C, xv, lane, EPS, &mean, &rstd);
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int col = 256 * j + 8 * lane;
      if (col < C) {
        float wv[8], bv[8];
        load8(w + col, wv);
        load8(b + col, bv);
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[j][e] = (xv[j][e] - mean) * rstd * wv[e] + bv[e];
        store8(y + (size_t)row * C + col, xv[j]);
      }
    }
  }
"""


# Σ over the rows of a (R, W) fp32 partial, out (W) in T: a block takes 32 columns (a lane each) and its 8 warps every
# 8th row, then the first warp adds the 8 warps' sums in warp order (no atomics: the same result every run).
FINISH = r"""
  using namespace mlxclip_reduce;
  const int R = partial_shape[0], W = partial_shape[1];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, col = blockIdx.x * 32 + lane;
  __shared__ float sums[8][33];
  float s = 0.0f;
  if (col < W)
    for (int r = warp; r < R; r += 8) s += partial[(size_t)r * W + col];
  sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && col < W) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += sums[w][lane];
    store1(out + col, total);
  }
"""


def cuda_device() -> bool:
    """Whether the default device is a CUDA GPU (where our kernels run; gpu_activation asks too)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def _on_cuda() -> bool:
    return ENABLED and cuda_device()


def _rows_and_width(x: mx.array) -> tuple[int, int]:
    width = x.shape[-1] if x.ndim else 1
    return x.size // max(width, 1), width


def column_sum_fits(rows: int, width: int, dtype: mx.Dtype) -> bool:
    """Whether column_sum takes a (rows, width) array of `dtype` with our kernel (decided when a graph is traced)."""
    return _on_cuda() and dtype in _DTYPES and width % 8 == 0 and width <= MAX_WIDTH and rows >= MIN_ROWS


def layer_norm_applies(x: mx.array, w: mx.array) -> bool:
    rows, width = _rows_and_width(x)
    return (_on_cuda() and x.ndim >= 2 and x.dtype in _DTYPES and w.dtype == x.dtype and w.shape == (width,)
            and width % 8 == 0 and width <= MAX_LN_WIDTH and rows >= MIN_ROWS)


@lru_cache(maxsize=None)
def _kernel(name: str, source: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=list(outputs), source=source,
                               header=HEADER)


def _blocks(rows: int, warps: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-rows // (4 * warps))))  # at least 4 rows a warp


def _template(x: mx.array, width: int) -> list:
    return [("T", x.dtype), ("C", width), ("NC", -(-width // 256))]


def finish(partial: mx.array, dtype: mx.Dtype) -> mx.array:
    """Σ over the first axis of a (blocks, W) fp32 partial, as `dtype`: one launch of FINISH with FINISH_KERNEL on,
    else MLX's column reduction and cast."""
    if not FINISH_KERNEL:
        return partial.sum(axis=0).astype(dtype)
    width = partial.shape[1]
    (out,) = _kernel("mlxclip_reduce_finish", FINISH, ("partial",), ("out",))(
        inputs=[partial], template=[("T", dtype)], grid=(-(-width // 32) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(width,)], output_dtypes=[dtype])
    return out


def column_sum(x: mx.array) -> mx.array:
    """Σ over every axis but the last, (..., C) -> (C,) in x's dtype: our kernel where it applies, else MLX's sum."""
    rows, width = _rows_and_width(x)
    if x.ndim < 2:
        return x.reshape(-1, width).sum(axis=0)
    # an explicit shape: a matrix comes back as it is, no graph node (reshape(-1, width) would make one; the dense and
    # MLP backward hand in rows)
    matrix = x.reshape(rows, width)
    if not column_sum_fits(rows, width, x.dtype):
        return matrix.sum(axis=0)
    blocks = _blocks(rows, SUM_WARPS)
    kernel = _kernel("mlxclip_column_sum", COLUMN_SUM, ("x",), ("partial",))
    (partial,) = kernel(inputs=[matrix], template=_template(x, width),
                        grid=(blocks * 32 * SUM_WARPS, 1, 1), threadgroup=(32 * SUM_WARPS, 1, 1),
                        output_shapes=[(blocks, width)], output_dtypes=[mx.float32])
    return finish(partial, x.dtype)


def layer_norm_source(eps: float, forward: bool = False) -> str:
    """The LayerNorm backward's (or forward's) source with its epsilon (a float cannot be a template argument)."""
    return f"  constexpr float EPS = {float(eps)!r}f;\n" + (LAYER_NORM_FORWARD if forward else LAYER_NORM_BACKWARD)


def layer_norm_kernel_name(eps: float, forward: bool = False) -> str:
    return (f"mlxclip_layer_norm_{'forward' if forward else 'backward'}_"
            + f"{float(eps):.3e}".replace("-", "m").replace("+", "p").replace(".", "_"))


def layer_norm_forward(x: mx.array, w: mx.array, b: mx.array, eps: float) -> mx.array:
    """LayerNorm(x) w + b over the last axis by our kernel (layer_norm_applies(x, w), b typed as w)."""
    rows, width = _rows_and_width(x)
    blocks = -(-rows // (4 * LN_WARPS))  # 4 rows a warp; no partial sums, so no cap on the blocks
    kernel = _kernel(layer_norm_kernel_name(eps, True), layer_norm_source(eps, True), ("x", "w", "b"), ("y",))
    (y,) = kernel(inputs=[x.reshape(rows, width), w, b], template=_template(x, width),
                  grid=(blocks * 32 * LN_WARPS, 1, 1), threadgroup=(32 * LN_WARPS, 1, 1),
                  output_shapes=[(rows, width)], output_dtypes=[x.dtype])
    return y.reshape(x.shape)


def layer_norm_grads(x: mx.array, w: mx.array, g: mx.array, eps: float) -> tuple[mx.array, mx.array, mx.array]:
    """(dx, dw, db) of <g, LayerNorm(x) w + b> over the last axis, by our kernel (layer_norm_applies(x, w) and g
    shaped and typed as x)."""
    rows, width = _rows_and_width(x)
    blocks = _blocks(rows, LN_WARPS)
    kernel = _kernel(layer_norm_kernel_name(eps), layer_norm_source(eps), ("x", "w", "g"), ("dx", "partial"))
    dx, partial = kernel(inputs=[x.reshape(rows, width), w, g.astype(x.dtype).reshape(rows, width)],
                         template=_template(x, width),
                         grid=(blocks * 32 * LN_WARPS, 1, 1), threadgroup=(32 * LN_WARPS, 1, 1),
                         output_shapes=[(rows, width), (blocks, 2, width)], output_dtypes=[x.dtype, mx.float32])
    if FINISH_KERNEL:  # both gradients in one launch: (blocks, 2 width) -> (2 width) in w's dtype
        sums = finish(partial.reshape(blocks, 2 * width), w.dtype).reshape(2, width)
        return dx.reshape(x.shape), sums[0], sums[1]
    sums = partial.sum(axis=0)  # the measured default: MLX's reduction, then a cast for each
    return dx.reshape(x.shape), sums[0].astype(w.dtype), sums[1].astype(w.dtype)
