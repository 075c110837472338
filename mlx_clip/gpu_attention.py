"""Fused attention for CLIP's short sequences on CUDA GPUs (issue 7, benchmarks/perf-notes.md).

MLX's CUDA SDPA differentiates through cuDNN only when the sequence length is a multiple of 128; at CLIP's lengths
(50 image tokens for ViT-B/32, ≤ 64 trimmed text tokens) its backward is an unfused chain of kernels that keeps the
(B, H, L, L) probabilities: ≈ 16 ms of a 64 ms ViT-B/32 train step at batch 256 for ~2% of its FLOPs. Here one thread
block owns one (batch, head): the whole ≤ 64 × 64 problem sits in shared memory, the products run on tensor cores
(WMMA, bf16 in, fp32 accumulate) and the backward recomputes the probabilities instead of storing them. The kernels
also read and write the (B, L, heads · 64) layout of the projections directly, so the head split/merge transposes
(a copy each, forward and backward) disappear.

Longer sequences (ViT-B/16's 197 image tokens, 77 untrimmed text tokens) take the tiled kernels, flash-attention
style: a block owns 64 rows (128 in the forward), holds the other side of its head in shared memory and walks it
16 rows at a time, with scores and probabilities in registers (mma.sync fragments).
The forward keeps each row's log-sum-exp (fp32, (B, L, H)); the backward recomputes the probabilities from it, in
two kernels (dq over query rows; dk and dv over key rows) so no gradient needs atomics. MLX's unfused backward
there kept the (B, H, L, L) probabilities, ran its batched products in cuBLAS's align-1 kernels (a 197-wide bf16 row
is not 16-byte aligned) and took ~40 ms of a 160 ms ViT-B/16 step on an H100 (benchmarks/perf-notes.md).

Scope: bf16, head width 64, L ≤ 256, no mask or causal, scale 1/8, compute capability ≥ 8. Anything else goes to
mx.fast's SDPA.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

HEAD_DIM = 64
MAX_TOKENS = 64  # the one-block kernels
MAX_LONG_TOKENS = 256  # the tiled kernels
# The tiled kernels' transposed operand loads: ldmatrix.trans (1), or four 16-bit shared-memory loads (0)
LDMATRIX = os.environ.get("MLXCLIP_GPU_LDMATRIX", "1").strip() != "0"
# Query rows per warp in the tiled dq kernel: 16, or 32 (each k and v fragment feeding two products, as the forward
# does; 0.72 -> 0.39 ms there on an H200). 32 is compiled and tested here through NVRTC but not yet measured on a card.
DQ_ROWS = {"16": 16, "32": 32}.get(os.environ.get("MLXCLIP_GPU_DQ_ROWS", "16").strip() or "16", 0)
if not DQ_ROWS:
    warnings.warn(f"MLXCLIP_GPU_DQ_ROWS={os.environ['MLXCLIP_GPU_DQ_ROWS']!r}: expected 16 or 32; using 16",
                  stacklevel=2)
    DQ_ROWS = 16
# shared-memory row strides (bf16, fp32): 32-byte aligned WMMA tiles, rows staggered over banks
_LDH, _LDF = 72, 68
_TILE_H = MAX_TOKENS * _LDH * 2  # one bf16 64 x 64 tile, bytes
_TILE_F = MAX_TOKENS * _LDF * 4  # one fp32 64 x 64 tile, bytes
_FORWARD_SMEM = 3 * _TILE_H + _TILE_F  # q (then p), k, v; scores then output
_BACKWARD_SMEM = 6 * _TILE_H + 2 * _TILE_F  # q, k, v, dout, p, ds; p and dp in fp32 (then output staging)

_HEADER = r"""
#include <cuda_bf16.h>
#include <mma.h>

namespace mlxclip_attention {
using namespace nvcuda;
typedef __nv_bfloat16 bf16;
constexpr int LDH = 72;
constexpr int LDF = 68;
constexpr float SCALE = 0.125f;  // 1 / sqrt(64)
constexpr float LOG2E = 1.4426950408889634f;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> FragAT;  // a transposed row-major tile
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBT;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

__device__ inline size_t row_offset(int b, int row, int h, int L, int H) {
  return ((size_t)(b * L + row) * H + h) * 64;
}

// Rows [0, L) of head h from a (B, L, H * 64) array into a (rows, LDH) tile; rows [L, rows) zero.
__device__ inline void load_tile(const bf16* src, bf16* dst, int b, int h, int L, int H, int rows) {
  for (int c = threadIdx.x; c < rows * 8; c += blockDim.x) {
    const int row = c >> 3, part = c & 7;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (row < L) value = reinterpret_cast<const uint4*>(src + row_offset(b, row, h, L, H))[part];
    reinterpret_cast<uint4*>(dst + row * LDH)[part] = value;
  }
}

// 16 rows x 64 columns of fp32 staging (from row r0) times `factor`, rows < L only, into the (B, L, H * 64) output.
__device__ inline void store_rows(const float* f, bf16* dst, int b, int h, int L, int H, int r0, float factor,
                                  int lane) {
  for (int r = 0; r < 16 && r0 + r < L; ++r) {
    const float2 x = reinterpret_cast<const float2*>(f + (r0 + r) * LDF)[lane];
    reinterpret_cast<__nv_bfloat162*>(dst + row_offset(b, r0 + r, h, L, H))[lane] =
        __floats2bfloat162_rn(x.x * factor, x.y * factor);
  }
}

__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Scores -> probabilities for the 16 query rows from r0: s (fp32, scaled by SCALE here) is overwritten with p when
// keep_fp32, and p is written as bf16 to `p`. Keys >= L, and keys after the query when causal, get 0.
__device__ inline void softmax_rows(float* s, bf16* p, int r0, int L, int cols, bool causal, bool keep_fp32,
                                    int lane) {
  const float neg_inf = __int_as_float(0xff800000);
  for (int r = 0; r < 16; ++r) {
    const int row = r0 + r;
    float x[2];
    for (int t = 0; t < 2; ++t) {
      const int c = lane + 32 * t;
      x[t] = (c < L && !(causal && c > row)) ? s[row * LDF + c] * (SCALE * LOG2E) : neg_inf;
    }
    const float m = warp_max(fmaxf(x[0], x[1]));
    const float e0 = exp2f(x[0] - m), e1 = exp2f(x[1] - m);
    const float inv = 1.0f / warp_sum(e0 + e1);
    const float e[2] = {e0 * inv, e1 * inv};
    for (int t = 0; t < 2; ++t) {
      const int c = lane + 32 * t;
      if (c < cols) {
        p[row * LDH + c] = __float2bfloat16(e[t]);
        if (keep_fp32) s[row * LDF + c] = e[t];
      }
    }
  }
}

// The three warp-level products, each writing a 16-row stripe (rows r0..r0+15) of fp32 staging (LDF stride);
// `nt` 16-wide tiles span the sequence. a, b are bf16 tiles with LDH stride.
// out[r0.., 0:16nt] = a[r0.., 0:64] . b[0:16nt, 0:64]^T          (scores q k^T, dp = dout v^T)
__device__ inline void rows_times_transposed(const bf16* a, const bf16* b, float* out, int r0, int nt) {
  for (int j = 0; j < nt; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int d = 0; d < 4; ++d) {
      FragA x;
      FragBT y;
      wmma::load_matrix_sync(x, a + r0 * LDH + 16 * d, LDH);
      wmma::load_matrix_sync(y, b + 16 * j * LDH + 16 * d, LDH);
      wmma::mma_sync(acc, x, y, acc);
    }
    wmma::store_matrix_sync(out + r0 * LDF + 16 * j, acc, LDF, wmma::mem_row_major);
  }
}

// out[r0.., 0:64] = a[r0.., 0:16nt] . b[0:16nt, 0:64]             (o = p v, dq = ds k)
__device__ inline void rows_times(const bf16* a, const bf16* b, float* out, int r0, int nt) {
  for (int j = 0; j < 4; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int t = 0; t < nt; ++t) {
      FragA x;
      FragB y;
      wmma::load_matrix_sync(x, a + r0 * LDH + 16 * t, LDH);
      wmma::load_matrix_sync(y, b + 16 * t * LDH + 16 * j, LDH);
      wmma::mma_sync(acc, x, y, acc);
    }
    wmma::store_matrix_sync(out + r0 * LDF + 16 * j, acc, LDF, wmma::mem_row_major);
  }
}

// out[r0.., 0:64] = a[0:16nt, r0..]^T . b[0:16nt, 0:64]            (dk = ds^T q, dv = p^T dout)
__device__ inline void columns_times(const bf16* a, const bf16* b, float* out, int r0, int nt) {
  for (int j = 0; j < 4; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int t = 0; t < nt; ++t) {
      FragAT x;
      FragB y;
      wmma::load_matrix_sync(x, a + 16 * t * LDH + r0, LDH);
      wmma::load_matrix_sync(y, b + 16 * t * LDH + 16 * j, LDH);
      wmma::mma_sync(acc, x, y, acc);
    }
    wmma::store_matrix_sync(out + r0 * LDF + 16 * j, acc, LDF, wmma::mem_row_major);
  }
}

// ---- The tiled kernels (MAX_TOKENS < L <= MAX_LONG_TOKENS): mma.sync m16n8k16 on registers ----
// Fragment layouts from the PTX ISA (lane = 4 g + t): A (16 x 16, row-major) reg 0 = row g, columns 2t, 2t + 1;
// reg 1 = row g + 8; reg 2 = row g, columns 2t + 8, 2t + 9; reg 3 = row g + 8, columns 2t + 8, 2t + 9.
// B (16 x 8): reg 0 = rows 2t, 2t + 1 of column g; reg 1 = rows 2t + 8, 2t + 9. C (16 x 8, fp32): c0, c1 = row g,
// columns 2t, 2t + 1; c2, c3 = row g + 8. Two C tiles side by side are one A tile: scores become probabilities
// in registers and feed the next product without a trip through shared memory.
typedef unsigned int u32;

// Whether key `key` takes part in query `query`'s softmax (padding rows and columns do not).
__device__ inline bool attends(int query, int key, int L, bool causal) {
  return query < L && key < L && !(causal && key > query);
}

__device__ inline u32 pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}

// c (16 x 8, fp32) += a (16 x 16, bf16) . b (16 x 8, bf16)
__device__ inline void mma(float* c, const u32* a, const u32* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A fragments of rows [r0, r0 + 16) of head h of a (B, L, H * 64) array, straight from global memory: a[d] holds
// columns [16d, 16d + 16). Rows >= L are zero.
__device__ inline void load_a(const bf16* src, u32 (*a)[4], int b, int h, int L, int H, int r0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + g + 8 * half;
    const u32* p = reinterpret_cast<const u32*>(src + row_offset(b, row < L ? row : 0, h, L, H));
#pragma unroll
    for (int d = 0; d < 4; ++d) {
      a[d][half] = row < L ? p[8 * d + t] : 0u;
      a[d][2 + half] = row < L ? p[8 * d + 4 + t] : 0u;
    }
  }
}

// B fragment with B[k][n] = m[n0 + n][k0 + k] from a row-major LDH tile (k . q^T style products).
__device__ inline void load_b_rows(const bf16* m, int n0, int k0, int lane, u32* b) {
  const u32* p = reinterpret_cast<const u32*>(m + (n0 + (lane >> 2)) * LDH + k0);
  b[0] = p[lane & 3];
  b[1] = p[4 + (lane & 3)];
}

// The backward's two score-shaped products per tile, for MT 16-row tiles of a warp, each two C tiles (16 rows x 16
// columns n0 .. n0 + 15) over 64 columns: s = a . m[n0 ..]^T and dp = c . mc[n0 ..]^T, a and c in A fragments, m and
// mc row-major LDH tiles in shared memory (q k^T and dout v^T; k q^T and v dout^T for the transposed view). Each
// B fragment loaded feeds all MT row tiles.
template <int MT>
__device__ inline void two_scores(u32 (*a)[4][4], const bf16* m, u32 (*c)[4][4], const bf16* mc, int n0, int lane,
                                  float (*s)[2][4], float (*dp)[2][4]) {
#pragma unroll
  for (int d = 0; d < 4; ++d)
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      u32 mb[2], cb[2];
      load_b_rows(m, n0 + 8 * n, 16 * d, lane, mb);
      load_b_rows(mc, n0 + 8 * n, 16 * d, lane, cb);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma(s[mt][n], a[mt][d], mb);
        mma(dp[mt][n], c[mt][d], cb);
      }
    }
}

// B fragment with B[k][n] = m[k0 + k][n0 + n] from a row-major LDH tile (p . v style products): ldmatrix's
// transposing load, lanes 0-15 pointing at rows k0 .. k0 + 15 (LDSM), or four 16-bit loads.
template <bool LDSM>
__device__ inline void load_b_cols(const bf16* m, int k0, int n0, int lane, u32* b) {
  if (LDSM) {
    const u32 address = static_cast<u32>(__cvta_generic_to_shared(m + (k0 + (lane & 15)) * LDH + n0));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1]) : "r"(address));
  } else {
    const unsigned short* p = reinterpret_cast<const unsigned short*>(m) + (k0 + 2 * (lane & 3)) * LDH + n0 + (lane >> 2);
    b[0] = p[0] | (static_cast<u32>(p[LDH]) << 16);
    b[1] = p[8 * LDH] | (static_cast<u32>(p[9 * LDH]) << 16);
  }
}

// rowsum(x * y) over 64 columns for rows g and g + 8 of two A-fragment sets, summed over the row's four lanes.
__device__ inline void row_dots(u32 (*x)[4], u32 (*y)[4], float* out) {
  out[0] = out[1] = 0.0f;
#pragma unroll
  for (int d = 0; d < 4; ++d)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {  // registers 0, 2: row g; 1, 3: row g + 8
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x[d][reg]));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&y[d][reg]));
      out[reg & 1] += a.x * b.x + a.y * b.y;
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    out[r] += __shfl_xor_sync(0xffffffffu, out[r], 1);
    out[r] += __shfl_xor_sync(0xffffffffu, out[r], 2);
  }
}

// Rows r0 + g and r0 + g + 8 (those < L) of an output from 8 C tiles (64 columns), times factor[row half].
__device__ inline void store_c(float (*acc)[4], bf16* dst, int b, int h, int L, int H, int r0, const float* factor,
                               int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + g + 8 * r;
    if (row >= L) continue;
    bf16* out = dst + row_offset(b, row, h, L, H) + 2 * t;
#pragma unroll
    for (int c = 0; c < 8; ++c)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * c) =
          __floats2bfloat162_rn(acc[c][2 * r] * factor[r], acc[c][2 * r + 1] * factor[r]);
  }
}
}  // namespace mlxclip_attention
"""

# One block of 4 warps per (batch, head); warp w owns query rows [16w, 16w + 16) (and key rows in the dK/dV phase).
# L, H, NT (= ceil(L / 16) tiles) and CAUSAL are template constants.
_FORWARD = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);  // q, then p over the same rows (each warp overwrites only its own)
  bf16* ks = qs + 64 * LDH;
  bf16* vs = ks + 64 * LDH;
  float* sf = reinterpret_cast<float*>(vs + 64 * LDH);
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_tile(q, qs, b, h, L, H, 16 * NT);
  load_tile(k, ks, b, h, L, H, 16 * NT);
  load_tile(v, vs, b, h, L, H, 16 * NT);
  __syncthreads();
  if (warp >= NT) return;
  const int r0 = 16 * warp;
  rows_times_transposed(qs, ks, sf, r0, NT);  // s = q k^T
  __syncwarp();
  softmax_rows(sf, qs, r0, L, 16 * NT, CAUSAL, false, lane);
  __syncwarp();
  rows_times(qs, vs, sf, r0, NT);  // o = p v
  __syncwarp();
  store_rows(sf, o, b, h, L, H, r0, 1.0f, lane);
"""

# p is recomputed from q and k (nothing but the inputs is kept from the forward pass);
# ds = p * (dp - rowsum(p * dp)), dq = SCALE ds k, dk = SCALE ds^T q, dv = p^T dout.
_BACKWARD = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + 64 * LDH;
  bf16* vs = ks + 64 * LDH;
  bf16* gs = vs + 64 * LDH;  // dout
  bf16* ph = gs + 64 * LDH;
  bf16* dsh = ph + 64 * LDH;
  float* pf = reinterpret_cast<float*>(dsh + 64 * LDH);
  float* dpf = pf + 64 * LDF;
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_tile(q, qs, b, h, L, H, 16 * NT);
  load_tile(k, ks, b, h, L, H, 16 * NT);
  load_tile(v, vs, b, h, L, H, 16 * NT);
  load_tile(dout, gs, b, h, L, H, 16 * NT);
  __syncthreads();
  const int r0 = 16 * warp;
  if (warp < NT) {
    rows_times_transposed(qs, ks, pf, r0, NT);  // s = q k^T
    rows_times_transposed(gs, vs, dpf, r0, NT);  // dp = dout v^T
    __syncwarp();
    softmax_rows(pf, ph, r0, L, 16 * NT, CAUSAL, true, lane);
    __syncwarp();
    for (int r = 0; r < 16; ++r) {  // ds
      const int row = r0 + r;
      float p[2], dp[2];
      for (int t = 0; t < 2; ++t) {
        const int c = lane + 32 * t;
        p[t] = c < 16 * NT ? pf[row * LDF + c] : 0.0f;
        dp[t] = c < 16 * NT ? dpf[row * LDF + c] : 0.0f;
      }
      const float rowsum = warp_sum(p[0] * dp[0] + p[1] * dp[1]);
      for (int t = 0; t < 2; ++t) {
        const int c = lane + 32 * t;
        if (c < 16 * NT) dsh[row * LDH + c] = __float2bfloat16(p[t] * (dp[t] - rowsum));
      }
    }
    __syncwarp();
    rows_times(dsh, ks, dpf, r0, NT);  // dq = ds k
    __syncwarp();
    store_rows(dpf, dq, b, h, L, H, r0, SCALE, lane);
  }
  __syncthreads();  // dk and dv read every query row of ds and p
  if (warp >= NT) return;
  columns_times(dsh, qs, pf, r0, NT);  // dk = ds^T q, for key rows [r0, r0 + 16)
  columns_times(ph, gs, dpf, r0, NT);  // dv = p^T dout
  __syncwarp();
  store_rows(pf, dk, b, h, L, H, r0, SCALE, lane);
  store_rows(dpf, dv, b, h, L, H, r0, 1.0f, lane);
"""


# The tiled kernels. Grid (B * H, ceil(L / 64)): a block of 4 warps owns 64 rows (queries in the forward and dq
# kernels, keys in the dk/dv kernel) and holds the other side of the head (all L rows) in shared memory; warp w owns
# the block's rows [16w, 16w + 16), keeps their q / dout (or k / v) fragments in registers, and walks the other side
# 16 rows at a time. Softmax statistics are log2-based: x = q.k SCALE LOG2E, lse = log2 sum_j 2^x_j, written by the
# forward as a (B, L, H) fp32 output; the backward recomputes p = 2^(x - lse) per tile with
# delta = rowsum(dout * o) (B, L, H). LDSM_TRANS picks ldmatrix for the transposed operand loads. The forward gives
# each warp 32 query rows (blocks of 128), so every k and v fragment it loads feeds two products.
# The forward's and dq's start: the head's k and v rows (all L, zero-padded to 16 NT) in shared memory.
_KV_SHARED = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KR = 16 * NT;
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + KR * LDH;
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  load_tile(k, ks, b, h, L, H, KR);
  load_tile(v, vs, b, h, L, H, KR);
  __syncthreads();
"""

_LONG_FORWARD = _KV_SHARED + r"""
  const float neg_inf = __int_as_float(0xff800000);
  const int r0 = 128 * blockIdx.y + 32 * warp;  // two 16-row tiles per warp share each k and v fragment load
  if (r0 >= L) return;
  u32 qa[2][4][4];
  load_a(q, qa[0], b, h, L, H, r0, lane);
  load_a(q, qa[1], b, h, L, H, r0 + 16, lane);
  float acc[2][8][4] = {};  // o, per row tile 8 tiles of 8 columns
  // rows g, g + 8 of each row tile; l is this lane's part of the sum
  float m[2][2] = {{neg_inf, neg_inf}, {neg_inf, neg_inf}}, l[2][2] = {};
  const int tiles = CAUSAL && r0 / 16 + 2 < NT ? r0 / 16 + 2 : NT;  // causal: later key tiles are all masked
  for (int j = 0; j < tiles; ++j) {
    float s[2][2][4] = {};
#pragma unroll
    for (int d = 0; d < 4; ++d)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        u32 kb[2];
        load_b_rows(ks, 16 * j + 8 * n, 16 * d, lane, kb);
        mma(s[0][n], qa[0][d], kb);
        mma(s[1][n], qa[1][d], kb);
      }
    u32 pa[2][4];
    float rescale[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float base[2] = {neg_inf, neg_inf};
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool on = attends(r0 + 16 * mt + g + 8 * (e >> 1), 16 * j + 8 * n + 2 * t + (e & 1), L, CAUSAL);
          s[mt][n][e] = on ? s[mt][n][e] * (SCALE * LOG2E) : neg_inf;
          base[e >> 1] = fmaxf(base[e >> 1], s[mt][n][e]);
        }
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // online softmax: the running max, and the factor for what was summed before
        base[r] = fmaxf(base[r], __shfl_xor_sync(0xffffffffu, base[r], 1));
        base[r] = fmaxf(base[r], __shfl_xor_sync(0xffffffffu, base[r], 2));
        const float next = fmaxf(m[mt][r], base[r]);
        base[r] = next == neg_inf ? 0.0f : next;  // a row with no key yet (padding) stays all zero, not NaN
        rescale[mt][r] = exp2f(m[mt][r] - base[r]);
        m[mt][r] = next;
        l[mt][r] *= rescale[mt][r];
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const float p0 = exp2f(s[mt][n][0] - base[0]), p1 = exp2f(s[mt][n][1] - base[0]);
        const float p2 = exp2f(s[mt][n][2] - base[1]), p3 = exp2f(s[mt][n][3] - base[1]);
        l[mt][0] += p0 + p1;
        l[mt][1] += p2 + p3;
        pa[mt][2 * n] = pack(p0, p1);
        pa[mt][2 * n + 1] = pack(p2, p3);
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      u32 vb[2];
      load_b_cols<LDSM_TRANS>(vs, 16 * j, 8 * c, lane, vb);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        acc[mt][c][0] *= rescale[mt][0];
        acc[mt][c][1] *= rescale[mt][0];
        acc[mt][c][2] *= rescale[mt][1];
        acc[mt][c][3] *= rescale[mt][1];
        mma(acc[mt][c], pa[mt], vb);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      inv[r] = 1.0f / l[mt][r];
      const int row = r0 + 16 * mt + g + 8 * r;
      if (t == 0 && row < L) lse[(b * L + row) * H + h] = m[mt][r] + log2f(l[mt][r]);
    }
    store_c(acc[mt], o, b, h, L, H, r0 + 16 * mt, inv, lane);
  }
"""

# dq = SCALE sum over key tiles of ds k, with ds = p (dp - delta) and dp = dout v^T, recomputed per tile; the
# kernel also writes delta = rowsum(dout * o) (B, L, H) for the dk/dv kernel.
_LONG_DQ = _KV_SHARED + r"""
  const int r0 = 64 * MT * blockIdx.y + 16 * MT * warp;  // MT 16-row tiles a warp (DQ_ROWS)
  if (r0 >= L) return;
  u32 qa[MT][4][4], ga[MT][4][4];
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r1 = r0 + 16 * mt;
    load_a(o, qa[mt], b, h, L, H, r1, lane);  // o only for delta = rowsum(dout * o), which the dk/dv kernel reads too
    load_a(dout, ga[mt], b, h, L, H, r1, lane);
    row_dots(qa[mt], ga[mt], row_delta[mt]);
    load_a(q, qa[mt], b, h, L, H, r1, lane);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r1 + g + 8 * r;
      row_lse[mt][r] = row < L ? lse[(b * L + row) * H + h] : 0.0f;
      if (t == 0 && row < L) delta[(b * L + row) * H + h] = row_delta[mt][r];
    }
  }
  float acc[MT][8][4] = {};
  const int tiles = CAUSAL && r0 / 16 + MT < NT ? r0 / 16 + MT : NT;
  for (int j = 0; j < tiles; ++j) {
    float s[MT][2][4] = {}, dp[MT][2][4] = {};
    two_scores<MT>(qa, ks, ga, vs, 16 * j, lane, s, dp);
    u32 da[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float *x_lse = row_lse[mt], *x_delta = row_delta[mt];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool on = attends(r0 + 16 * mt + g + 8 * (e >> 1), 16 * j + 8 * n + 2 * t + (e & 1), L, CAUSAL);
          ds[e] = on ? exp2f(s[mt][n][e] * (SCALE * LOG2E) - x_lse[e >> 1]) * (dp[mt][n][e] - x_delta[e >> 1]) : 0.0f;
        }
        da[mt][2 * n] = pack(ds[0], ds[1]);
        da[mt][2 * n + 1] = pack(ds[2], ds[3]);
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      u32 kb[2];
      load_b_cols<LDSM_TRANS>(ks, 16 * j, 8 * c, lane, kb);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma(acc[mt][c], da[mt], kb);
    }
  }
  const float factor[2] = {SCALE, SCALE};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_c(acc[mt], dq, b, h, L, H, r0 + 16 * mt, factor, lane);
"""

# The transposed view: a warp owns 16 keys and walks the query tiles; p^T and ds^T tiles come out of k q^T and
# v dout^T, and dv = sum p^T dout, dk = SCALE sum ds^T q. lse and delta for every query sit in shared memory.
_LONG_DKDV = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KR = 16 * NT;
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* gs = qs + KR * LDH;  // dout
  float* lse_s = reinterpret_cast<float*>(gs + KR * LDH);
  float* delta_s = lse_s + KR;
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  load_tile(q, qs, b, h, L, H, KR);
  load_tile(dout, gs, b, h, L, H, KR);
  for (int i = threadIdx.x; i < KR; i += blockDim.x) {
    lse_s[i] = i < L ? lse[(b * L + i) * H + h] : 0.0f;
    delta_s[i] = i < L ? delta[(b * L + i) * H + h] : 0.0f;
  }
  __syncthreads();
  const int r0 = 64 * blockIdx.y + 16 * warp;
  if (r0 >= L) return;
  u32 ka[1][4][4], va[1][4][4];
  load_a(k, ka[0], b, h, L, H, r0, lane);
  load_a(v, va[0], b, h, L, H, r0, lane);
  float dk_acc[8][4] = {}, dv_acc[8][4] = {};
  for (int i = CAUSAL ? r0 / 16 : 0; i < NT; ++i) {  // causal: earlier queries never see these keys
    float s[1][2][4] = {}, dp[1][2][4] = {};  // s^T and dp^T: keys x queries
    two_scores<1>(ka, qs, va, gs, 16 * i, lane, s, dp);
    u32 pa[4], da[4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      float p[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = 16 * i + 8 * n + 2 * t + (e & 1);
        const bool on = attends(query, r0 + g + 8 * (e >> 1), L, CAUSAL);
        p[e] = on ? exp2f(s[0][n][e] * (SCALE * LOG2E) - lse_s[query]) : 0.0f;
        ds[e] = p[e] * (dp[0][n][e] - delta_s[query]);
      }
      pa[2 * n] = pack(p[0], p[1]);
      pa[2 * n + 1] = pack(p[2], p[3]);
      da[2 * n] = pack(ds[0], ds[1]);
      da[2 * n + 1] = pack(ds[2], ds[3]);
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      u32 gb[2], qb[2];
      load_b_cols<LDSM_TRANS>(gs, 16 * i, 8 * c, lane, gb);
      load_b_cols<LDSM_TRANS>(qs, 16 * i, 8 * c, lane, qb);
      mma(dv_acc[c], pa, gb);
      mma(dk_acc[c], da, qb);
    }
  }
  const float scale[2] = {SCALE, SCALE}, one[2] = {1.0f, 1.0f};
  store_c(dk_acc, dk, b, h, L, H, r0, scale, lane);
  store_c(dv_acc, dv, b, h, L, H, r0, one, lane);
"""


def supported(q: mx.array, heads: int, scale: float, mask) -> bool:
    """Whether the fused kernels take this call: a CUDA device with bf16 tensor cores, bf16 (B, L, heads * 64) inputs,
    L <= 256, no mask or causal, the default 1/sqrt(64) scale."""
    return (mx.default_device() == mx.gpu and mx.cuda.is_available() and q.dtype == mx.bfloat16 and q.ndim == 3
            and q.shape[1] <= MAX_LONG_TOKENS and q.shape[2] == heads * HEAD_DIM
            and abs(scale - HEAD_DIM ** -0.5) < 1e-9 and (mask is None or (isinstance(mask, str) and mask == "causal"))
            and _device_capable())


MIN_COMPUTE_CAPABILITY = 8  # bf16 WMMA and mma.sync.m16n8k16.bf16 need sm_80 (A100 and later)


def capable(info: dict) -> bool:
    """Whether a CUDA device's `mx.device_info()` allows the kernels (compute capability >= 8). An info without the
    field (an MLX that does not report it) counts as capable: the kernels were taken there before this check."""
    major = info.get("compute_capability_major")
    return major is None or int(major) >= MIN_COMPUTE_CAPABILITY


@lru_cache(maxsize=None)
def _device_capable() -> bool:
    # asked once per process, on the default (CUDA) device; older GPUs (V100, T4) then take mx.fast's SDPA instead of
    # failing to compile the kernels
    return capable(mx.device_info())


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as mx.fast.cuda_kernel takes it (benchmarks/cuda_compile.py compiles the same specs with NVRTC)."""
    name: str
    source: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shared_memory: int

    def dtype(self, name: str) -> str:  # the softmax statistics are fp32, the rest bf16
        return "float32" if name in ("lse", "delta") else "bfloat16"


def kernel_specs(nt: int) -> list[KernelSpec]:
    """The short kernels and, for sequences of nt 16-row tiles, the tiled ones (shared memory sized for nt)."""
    rows = 16 * nt
    return [
        KernelSpec("mlxclip_attention_forward", _FORWARD, ("q", "k", "v"), ("o",), _FORWARD_SMEM),
        KernelSpec("mlxclip_attention_backward", _BACKWARD, ("q", "k", "v", "dout"), ("dq", "dk", "dv"),
                   _BACKWARD_SMEM),
        KernelSpec(f"mlxclip_attention_long_forward_{nt}", _LONG_FORWARD, ("q", "k", "v"), ("o", "lse"),
                   2 * rows * _LDH * 2),
        KernelSpec(f"mlxclip_attention_long_dq_{nt}", _LONG_DQ, ("q", "k", "v", "dout", "lse", "o"), ("dq", "delta"),
                   2 * rows * _LDH * 2),
        KernelSpec(f"mlxclip_attention_long_dkdv_{nt}", _LONG_DKDV, ("q", "k", "v", "dout", "lse", "delta"),
                   ("dk", "dv"), 2 * rows * _LDH * 2 + 2 * rows * 4),
    ]


@lru_cache(maxsize=None)
def _kernels(nt: int):
    return [mx.fast.cuda_kernel(name=spec.name, input_names=list(spec.inputs), output_names=list(spec.outputs),
                                source=spec.source, header=_HEADER, shared_memory=spec.shared_memory)
            for spec in kernel_specs(nt)]


def _launch(kernel, inputs: list[mx.array], heads: int, causal: bool, outputs: int, blocks: int = 0,
            stats: bool = False, dq_tiles: int = 0) -> list[mx.array]:
    """`outputs` arrays shaped as q, then (with `stats`) one fp32 (B, L, heads) row statistic (lse, delta).
    blocks: 0 for the one-block kernels, else the tiled kernels' blocks per (batch, head); dq_tiles: the dq kernel's
    16-row tiles per warp."""
    batch, length, width = inputs[0].shape
    shapes = [(batch, length, width)] * outputs + ([(batch, length, heads)] if stats else [])
    template = [("L", length), ("H", heads), ("NT", -(-length // 16)), ("CAUSAL", causal)]
    template += ([("LDSM_TRANS", LDMATRIX)] if blocks else []) + ([("MT", dq_tiles)] if dq_tiles else [])
    return kernel(inputs=inputs, template=template,
                  grid=(batch * heads * 128, max(blocks, 1), 1), threadgroup=(128, 1, 1), output_shapes=shapes,
                  output_dtypes=[inputs[0].dtype] * outputs + ([mx.float32] if stats else []))


def _short(heads: int, causal: bool):
    """One block per (batch, head), the whole problem in shared memory (L <= MAX_TOKENS)."""

    @mx.custom_function
    def attention(q, k, v):
        return _launch(_kernels(MAX_TOKENS // 16)[0], [q, k, v], heads, causal, 1)[0]

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        q, k, v = primals
        return tuple(_launch(_kernels(MAX_TOKENS // 16)[1], [q, k, v, cotangent.astype(q.dtype)], heads, causal, 3))

    return attention


def _tiled(heads: int, causal: bool):
    """The tiled kernels (MAX_TOKENS < L <= MAX_LONG_TOKENS): returns (o, lse); the backward reads lse, and its dq
    kernel writes delta for the dk/dv kernel."""

    def kernels(q):
        return _kernels(-(-q.shape[1] // 16))[2:]

    def blocks(q, rows):  # blocks per (batch, head): the forward's hold 128 query rows, dq's 4 DQ_ROWS, dk/dv's 64
        return -(-q.shape[1] // rows)

    @mx.custom_function
    def attention(q, k, v):
        return tuple(_launch(kernels(q)[0], [q, k, v], heads, causal, 1, blocks(q, 128), stats=True))

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v = primals
        out, lse = outputs
        dout = cotangents[0].astype(q.dtype)
        _, dq_kernel, dkdv_kernel = kernels(q)
        dq, delta = _launch(dq_kernel, [q, k, v, dout, lse, out], heads, causal, 1, blocks(q, 4 * DQ_ROWS),
                            stats=True, dq_tiles=DQ_ROWS // 16)
        dk, dv = _launch(dkdv_kernel, [q, k, v, dout, lse, delta], heads, causal, 2, blocks(q, 64))
        return dq, dk, dv

    return attention


@lru_cache(maxsize=None)
def fused(heads: int, causal: bool):
    """softmax(q kᵀ / 8 [+ causal mask]) v over `heads` heads of (B, L, heads * 64) bf16 arrays, as (B, L, heads * 64)."""
    short, tiled = _short(heads, causal), _tiled(heads, causal)

    def attention(q, k, v):
        return short(q, k, v) if q.shape[1] <= MAX_TOKENS else tiled(q, k, v)[0]

    return attention
