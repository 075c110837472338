"""CUDA source of the tiled attention kernels (64 < L ≤ 320 tokens), used by mlx_clip.gpu_attention.

Flash-attention style: a block of WARPS warps owns WARPS · MT · 16 rows, holds the other side of its head in shared
memory and walks it 16 (or, KS = 2, 32) rows a step, with scores and probabilities in registers (mma.sync fragments). The forward keeps
each row's log-sum-exp (fp32, (B, L, H)); the backward recomputes the probabilities from it, in two kernels (dq over
query rows; dk and dv over key rows) so no gradient needs atomics. MLX's unfused backward there kept the (B, H, L, L)
probabilities, ran its batched products in cuBLAS's align-1 kernels (a 197-wide bf16 row is not 16-byte aligned)
and took ~40 ms of a 160 ms ViT-B/16 step on an H100 (benchmarks/perf-notes.md, change 28).

HEADER continues the namespace that attention_kernels_short.HEADER opens (it uses its bf16, LDH, SCALE, row_offset
and load_tile).
"""

from mlx_clip.attention_kernels_short import LDH


def shared_memory(nt: int) -> tuple[int, int, int]:
    """Bytes of shared memory of the forward, dq and dk/dv kernels for nt 16-row tiles: the other side's two row
    sets (k and v; q and dout), and for dk/dv the per-query lse and delta, with one spare zero tile (a step of two
    tiles, DQ_STEP or DKDV_STEP 32, may pass the last)."""
    spare = 16 * (nt + 1)
    return 2 * spare * LDH * 2, 2 * spare * LDH * 2, 2 * spare * LDH * 2 + 2 * spare * 4


HEADER = r"""// ---- The tiled kernels (MAX_TOKENS < L <= MAX_LONG_TOKENS): mma.sync m16n8k16 on registers ----
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

// 2^x as one MUFU.EX2 (ex2.approx.ftz: ~2 ulp, 2^-inf = 0), where exp2f adds a range test and two multiplies per
// element; the softmax's values are rounded to bf16 after it anyway.
__device__ inline float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Whether a tile of 16 keys from k0 needs the mask: causal attention, or keys past L (the zero-padded rows of the
// shared tile, which would score 0, not -inf). Warp-uniform, so the other tiles skip the per-element tests.
__device__ inline bool masked_tile(int k0, int L, bool causal) {
  return causal || k0 + 16 > L;
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

// B fragment with B[k][n] = m[n0 + n][k0 + k] from a row-major LDH tile (k . q^T style products): two 32-bit loads,
// or (LDSM) one ldmatrix.x2, lanes 0-7 pointing at rows n0 .. n0 + 7 at column k0, lanes 8-15 at column k0 + 8.
template <bool LDSM>
__device__ inline void load_b_rows(const bf16* m, int n0, int k0, int lane, u32* b) {
  if (LDSM) {
    // the lane's part (loop-invariant, hoisted) apart from the tile's (constant once unrolled: an immediate offset)
    const u32 lane_address = static_cast<u32>(__cvta_generic_to_shared(m)) + 2 * ((lane & 7) * LDH + (lane & 8));
    const u32 address = lane_address + 2 * (n0 * LDH + k0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(address));
  } else {
    const u32* p = reinterpret_cast<const u32*>(m + (n0 + (lane >> 2)) * LDH + k0);
    b[0] = p[lane & 3];
    b[1] = p[4 + (lane & 3)];
  }
}

// The backward's two score-shaped products per tile, for MT 16-row tiles of a warp, each two C tiles (16 rows x 16
// columns n0 .. n0 + 15) over 64 columns: s = a . m[n0 ..]^T and dp = c . mc[n0 ..]^T, a and c in A fragments, m and
// mc row-major LDH tiles in shared memory (q k^T and dout v^T; k q^T and v dout^T for the transposed view). Each
// B fragment loaded feeds all MT row tiles.
template <int MT, bool LDSM>
__device__ inline void two_scores(u32 (*a)[4][4], const bf16* m, u32 (*c)[4][4], const bf16* mc, int n0, int lane,
                                  float (*s)[2][4], float (*dp)[2][4]) {
#pragma unroll
  for (int d = 0; d < 4; ++d)
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      u32 mb[2], cb[2];
      load_b_rows<LDSM>(m, n0 + 8 * n, 16 * d, lane, mb);
      load_b_rows<LDSM>(mc, n0 + 8 * n, 16 * d, lane, cb);
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
    const u32 lane_address = static_cast<u32>(__cvta_generic_to_shared(m)) + 2 * (lane & 15) * LDH;  // as load_b_rows
    const u32 address = lane_address + 2 * (k0 * LDH + n0);
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
"""

# The tiled kernels. Grid (B * H, ceil(L / (16 MT WARPS))): a block of WARPS warps owns 16 MT WARPS rows (queries in
# the forward and dq kernels, keys in the dk/dv kernel) and holds the other side of the head (all L rows) in shared
# memory; warp w owns the block's rows [16 MT w, 16 MT (w + 1)) (MT 16-row tiles, each fragment of the other side it
# loads feeding MT products), keeps their q / dout (or k / v) fragments in registers, and walks the other side KS
# 16-row tiles a step. The loops are latency-bound (mlx_clip/gpu_attention.py has the shapes measured): 8-warp blocks
# sharing one shared-memory copy fit more warps an SM than 4-warp ones. Softmax statistics are log2-based:
# x = q.k SCALE LOG2E, lse = log2 sum_j 2^x_j, written by the forward as a (B, L, H) fp32 output; the backward
# recomputes p = 2^(x - lse) per tile with delta = rowsum(dout * o) (B, L, H). LDSM_TRANS picks ldmatrix for the
# transposed operand loads, LDSM_ROWS for the row-major ones.
# The forward's and dq's start: the head's k and v rows (all L, zero-padded to 16 (NT + 1)) in shared memory.
KV_SHARED = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KR = 16 * (NT + 1);  // a spare zero tile: a step of two key tiles (dq's KS = 2) may pass the last
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + KR * LDH;
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  load_tile(k, ks, b, h, L, H, KR);
  load_tile(v, vs, b, h, L, H, KR);
  __syncthreads();
"""

FORWARD = KV_SHARED + r"""
  const float neg_inf = __int_as_float(0xff800000);
  constexpr float SLACK = 8.0f;  // how far (log2 units) a row's max may pass its reference before o and l are rescaled
  const int r0 = 16 * MT * (WARPS * blockIdx.y + warp);  // MT 16-row tiles a warp share each k and v fragment load
  if (r0 >= L) return;
  u32 qa[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_a(q, qa[mt], b, h, L, H, r0 + 16 * mt, lane);
  float acc[MT][8][4] = {};  // o, per row tile 8 tiles of 8 columns
  // rows g, g + 8 of each row tile: m is the row's reference (log2 units), never more than SLACK below its running max;
  // l is this lane's part of the sum of 2^(x - m)
  float m[MT][2], l[MT][2] = {};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = neg_inf;
  const int tiles = CAUSAL && r0 / 16 + MT < NT ? r0 / 16 + MT : NT;  // causal: later key tiles are all masked
  for (int j = 0; j < tiles; ++j) {
    float s[MT][2][4] = {};
#pragma unroll
    for (int d = 0; d < 4; ++d)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        u32 kb[2];
        load_b_rows<LDSM_ROWS>(ks, 16 * j + 8 * n, 16 * d, lane, kb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma(s[mt][n], qa[mt][d], kb);
      }
    if (masked_tile(16 * j, L, CAUSAL)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!attends(r0 + 16 * mt + g + 8 * (e >> 1), 16 * j + 8 * n + 2 * t + (e & 1), L, CAUSAL))
              s[mt][n][e] = neg_inf;
    }
    float top[MT][2];  // each row's largest score in this tile, log2 units
    bool grows = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float x = fmaxf(fmaxf(s[mt][0][2 * r], s[mt][0][2 * r + 1]), fmaxf(s[mt][1][2 * r], s[mt][1][2 * r + 1]));
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
        top[mt][r] = x * (SCALE * LOG2E);
        grows |= top[mt][r] > m[mt][r] + SLACK;
      }
    // The online softmax's rescale of o and l, only when some row's max passed its reference by more than SLACK
    // (2^8: probabilities stay <= 256, exact in the sums and in bf16's range); o / l and lse = m + log2 l do not depend
    // on which reference was used. After the first tile this is rare, and the 64 multiplies a tile go with it.
    if (__any_sync(0xffffffffu, grows)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float next = fmaxf(m[mt][r], top[mt][r]);
          const float factor = next == neg_inf ? 1.0f : ex2(m[mt][r] - next);  // m = -inf: nothing summed yet
          m[mt][r] = next;
          l[mt][r] *= factor;
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            acc[mt][c][2 * r] *= factor;
            acc[mt][c][2 * r + 1] *= factor;
          }
        }
    }
    u32 pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // a row with no key yet (causal padding rows) keeps m = -inf: its probabilities 2^(-inf - 0) = 0, not NaN
      const float base[2] = {m[mt][0] == neg_inf ? 0.0f : m[mt][0], m[mt][1] == neg_inf ? 0.0f : m[mt][1]};
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = ex2(fmaf(s[mt][n][e], SCALE * LOG2E, -base[e >> 1]));
        l[mt][0] += p[0] + p[1];
        l[mt][1] += p[2] + p[3];
        pa[mt][2 * n] = pack(p[0], p[1]);
        pa[mt][2 * n + 1] = pack(p[2], p[3]);
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      u32 vb[2];
      load_b_cols<LDSM_TRANS>(vs, 16 * j, 8 * c, lane, vb);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma(acc[mt][c], pa[mt], vb);
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
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
DQ = KV_SHARED + r"""
  const int r0 = 16 * MT * (WARPS * blockIdx.y + warp);  // MT 16-row tiles a warp (DQ_ROWS), WARPS a block
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
  for (int j = 0; j < tiles; j += KS) {  // KS key tiles a step (DQ_STEP)
    float s[KS][MT][2][4] = {}, dp[KS][MT][2][4] = {};
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) two_scores<MT, LDSM_ROWS>(qa, ks, ga, vs, 16 * (j + kk), lane, s[kk], dp[kk]);
    u32 da[KS][MT][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float *x_lse = row_lse[mt], *x_delta = row_delta[mt];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          float ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e)
            ds[e] = ex2(fmaf(s[kk][mt][n][e], SCALE * LOG2E, -x_lse[e >> 1])) * (dp[kk][mt][n][e] - x_delta[e >> 1]);
          const int k0 = 16 * (j + kk);
          if (masked_tile(k0, L, CAUSAL)) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (!attends(r0 + 16 * mt + g + 8 * (e >> 1), k0 + 8 * n + 2 * t + (e & 1), L, CAUSAL)) ds[e] = 0.0f;
          }
          da[kk][mt][2 * n] = pack(ds[0], ds[1]);
          da[kk][mt][2 * n + 1] = pack(ds[2], ds[3]);
        }
      }
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        u32 kb[2];
        load_b_cols<LDSM_TRANS>(ks, 16 * (j + kk), 8 * c, lane, kb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma(acc[mt][c], da[kk][mt], kb);
      }
  }
  const float factor[2] = {SCALE, SCALE};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_c(acc[mt], dq, b, h, L, H, r0 + 16 * mt, factor, lane);
"""

# The transposed view: a warp owns MT 16-key tiles (DKDV_ROWS) and walks the query tiles, KS at a time (DKDV_STEP: two
# tiles give each step twice the independent products and exponentials, for latency's sake); p^T and ds^T tiles come
# out of k q^T and v dout^T, and dv = sum p^T dout, dk = SCALE sum ds^T q, each q and dout fragment loaded feeding all
# MT key tiles. lse and delta for every query sit in shared memory. A block is WARPS warps (DKDV_WARPS: 8 share one
# copy of the head's q and dout, 16 warps an SM where 4-warp blocks fit 12 by shared memory).
DKDV = r"""
  using namespace mlxclip_attention;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int KR = 16 * (NT + 1);  // a spare zero tile (lse +inf): a step of KS = 2 tiles may pass the last
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* gs = qs + KR * LDH;  // dout
  float* lse_s = reinterpret_cast<float*>(gs + KR * LDH);
  float* delta_s = lse_s + KR;
  const int b = blockIdx.x / H, h = blockIdx.x % H, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  load_tile(q, qs, b, h, L, H, KR);
  load_tile(dout, gs, b, h, L, H, KR);
  for (int i = threadIdx.x; i < KR; i += blockDim.x) {  // a padded query: lse +inf makes its p 2^-inf = 0, ds 0
    lse_s[i] = i < L ? lse[(b * L + i) * H + h] : __int_as_float(0x7f800000);
    delta_s[i] = i < L ? delta[(b * L + i) * H + h] : 0.0f;
  }
  __syncthreads();
  const int r0 = 16 * MT * (WARPS * blockIdx.y + warp);
  if (r0 >= L) return;
  u32 ka[MT][4][4], va[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    load_a(k, ka[mt], b, h, L, H, r0 + 16 * mt, lane);
    load_a(v, va[mt], b, h, L, H, r0 + 16 * mt, lane);
  }
  float dk_acc[MT][8][4] = {}, dv_acc[MT][8][4] = {};
  for (int i = CAUSAL ? r0 / 16 : 0; i < NT; i += KS) {  // causal: earlier queries never see these keys
    float s[KS][MT][2][4] = {}, dp[KS][MT][2][4] = {};  // s^T and dp^T: keys x queries
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) two_scores<MT, LDSM_ROWS>(ka, qs, va, gs, 16 * (i + kk), lane, s[kk], dp[kk]);
    u32 pa[KS][MT][4], da[KS][MT][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const int q0 = 16 * (i + kk) + 8 * n + 2 * t;  // this lane's two queries, q0 and q0 + 1
        const float2 x_lse = *reinterpret_cast<const float2*>(lse_s + q0);
        const float2 x_delta = *reinterpret_cast<const float2*>(delta_s + q0);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          float p[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool odd = e & 1;
            p[e] = ex2(fmaf(s[kk][mt][n][e], SCALE * LOG2E, -(odd ? x_lse.y : x_lse.x)));
            if (CAUSAL && !attends(q0 + odd, r0 + 16 * mt + g + 8 * (e >> 1), L, CAUSAL)) p[e] = 0.0f;
            ds[e] = p[e] * (dp[kk][mt][n][e] - (odd ? x_delta.y : x_delta.x));
          }
          pa[kk][mt][2 * n] = pack(p[0], p[1]);
          pa[kk][mt][2 * n + 1] = pack(p[2], p[3]);
          da[kk][mt][2 * n] = pack(ds[0], ds[1]);
          da[kk][mt][2 * n + 1] = pack(ds[2], ds[3]);
        }
      }
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        u32 gb[2], qb[2];
        load_b_cols<LDSM_TRANS>(gs, 16 * (i + kk), 8 * c, lane, gb);
        load_b_cols<LDSM_TRANS>(qs, 16 * (i + kk), 8 * c, lane, qb);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(dv_acc[mt][c], pa[kk][mt], gb);
          mma(dk_acc[mt][c], da[kk][mt], qb);
        }
      }
  }
  const float scale[2] = {SCALE, SCALE}, one[2] = {1.0f, 1.0f};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_c(dk_acc[mt], dk, b, h, L, H, r0 + 16 * mt, scale, lane);
    store_c(dv_acc[mt], dv, b, h, L, H, r0 + 16 * mt, one, lane);
  }
"""
