"""CUDA source of the one-block attention kernels (sequences of at most 64 tokens), used by mlx_clip.gpu_attention.

MLX's CUDA SDPA differentiates through cuDNN only when the sequence length is a multiple of 128; at CLIP's lengths
(50 image tokens for ViT-B/32, ≤ 64 trimmed text tokens) its backward is an unfused chain of kernels that keeps the
(B, H, L, L) probabilities: ≈ 16 ms of a 64 ms ViT-B/32 train step at batch 256 for ~2% of its FLOPs. Here one thread
block owns one (batch, head): the whole ≤ 64 × 64 problem sits in shared memory, the products run on tensor cores
(WMMA, bf16 in, fp32 accumulate) and the backward recomputes the probabilities instead of storing them. The kernels
also read and write the (B, L, heads · 64) layout of the projections directly, so the head split/merge transposes
(a copy each, forward and backward) disappear.

HEADER opens the `mlxclip_attention` namespace and holds what both kernel families use (types, strides, row
loads); mlx_clip.gpu_attention joins it with the tiled kernels' helpers and closes the namespace.
"""

LDH, LDF = 72, 68  # shared-memory row strides (bf16, fp32): 32-byte aligned WMMA tiles, rows staggered over banks
_TILE_H = 64 * LDH * 2  # one bf16 64 x 64 tile, bytes
_TILE_F = 64 * LDF * 4  # one fp32 64 x 64 tile, bytes
FORWARD_SMEM = 3 * _TILE_H + _TILE_F  # q (then p), k, v; scores then output
BACKWARD_SMEM = 6 * _TILE_H + 2 * _TILE_F  # q, k, v, dout, p, ds; p and dp in fp32 (then output staging)

HEADER = r"""
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
"""

# One block of 4 warps per (batch, head); warp w owns query rows [16w, 16w + 16) (and key rows in the dK/dV phase).
# L, H, NT (= ceil(L / 16) tiles) and CAUSAL are template constants.
_FORWARD = r"""
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);  // q, then p over the same rows (each warp overwrites only its own)
  bf16* ks = qs + 64 * LDH;
  bf16* vs = ks + 64 * LDH;
  float* sf = reinterpret_cast<float*>(vs + 64 * LDH);
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_tile(q, qs, b, h + Q_AT, L, QKV_HEADS, 16 * NT);
  load_tile(k, ks, b, h + K_AT, L, QKV_HEADS, 16 * NT);
  load_tile(v, vs, b, h + V_AT, L, QKV_HEADS, 16 * NT);
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
  load_tile(q, qs, b, h + Q_AT, L, QKV_HEADS, 16 * NT);
  load_tile(k, ks, b, h + K_AT, L, QKV_HEADS, 16 * NT);
  load_tile(v, vs, b, h + V_AT, L, QKV_HEADS, 16 * NT);
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
    store_rows(dpf, dq, b, h + Q_AT, L, QKV_HEADS, r0, SCALE, lane);
  }
  __syncthreads();  // dk and dv read every query row of ds and p
  if (warp >= NT) return;
  columns_times(dsh, qs, pf, r0, NT);  // dk = ds^T q, for key rows [r0, r0 + 16)
  columns_times(ph, gs, dpf, r0, NT);  // dv = p^T dout
  __syncwarp();
  store_rows(pf, dk, b, h + K_AT, L, QKV_HEADS, r0, SCALE, lane);
  store_rows(dpf, dv, b, h + V_AT, L, QKV_HEADS, r0, 1.0f, lane);
"""

# q, k and v as three (B, L, H * 64) arrays, or (the joint kernels, mlx_clip.fused_qkv) as the column blocks of one
# (B, L, 3 * H * 64) product, read in place: a row then holds 3H heads, q's at 0, k's at H, v's at 2H. The backward
# writes dq, dk and dv the same way into one array, the gradient of that product, so nothing joins them afterwards.
_SEPARATE = """
  using namespace mlxclip_attention;
  constexpr int QKV_HEADS = H, Q_AT = 0, K_AT = 0, V_AT = 0;
"""
_JOINT = """
  using namespace mlxclip_attention;
  constexpr int QKV_HEADS = 3 * H, Q_AT = 0, K_AT = H, V_AT = 2 * H;
  const bf16 *q = qkv, *k = qkv, *v = qkv;
"""
FORWARD = _SEPARATE + _FORWARD
BACKWARD = _SEPARATE + _BACKWARD
JOINT_FORWARD = _JOINT + _FORWARD
JOINT_BACKWARD = _JOINT + "  bf16 *dq = dqkv, *dk = dqkv, *dv = dqkv;\n" + _BACKWARD
