"""GELU, QuickGELU, softmax and attention built from multiply, add, divide and bit shifts, with hand-written gradients.

Why: on MLX's CPU backend `erf`, `exp`, `tanh` and `sigmoid` run as scalar libm calls (12–27 ns per element here, against
0.3 ns for a multiply), so the exact GELU of a ViT-B/32 MLP cost more than its matmuls, and the softmax inside attention
as much as the attention matmuls. The rational approximations below are the ones Eigen, XLA and TensorFlow use for
float32 `erf`/`tanh` (a few ulp), and `exp` is the classic 2^n · 2^f split (Cephes-style); inside `mx.compile` each fuses
into one vectorised loop: 5–7× faster than MLX's ops on this CPU, and no slower on a GPU, where they are memory bound.
Errors against float64 references are asserted in tests/test_fastmath.py.

Kernel boundaries (`_fence`): MLX's compiler fuses a chain of elementwise ops at most 11 deep (`max_compile_depth` in
mlx/compile.cpp); what lies deeper becomes an input of the fused kernel. When that input is a broadcast constant (a
polynomial coefficient), the kernel gets a stride-0 array among its inputs and runs its strided, unvectorised variant:
the GELU gradient on 800 x 3072 elements took 44 ms inside a compiled graph, against 2-4 ms for each of its parts
alone, and the train steps' profiles showed these strided kernels (~5% of ViT-B/32's samples, ~11% of `small`'s). So
each polynomial gets its input and output materialised (`mx.contiguous`, a no-op on a contiguous array outside
compilation, a kernel boundary inside): every fused region stays shallow whatever the caller adds around it, at the
cost of one more pass over memory per boundary (44 -> 7 ms for that gradient, same bits).
"""

from __future__ import annotations

import math
import os
import warnings

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams, gpu_activation, gpu_attention

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Eigen's generic_fast_erf_float: erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (erf is ±1 to float precision beyond).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
# Eigen's generic_fast_tanh_float: tanh(x) ≈ x·P(x²)/Q(x²) on [-7.9, 7.9].
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _polynomial(coefficients: tuple[float, ...], z: mx.array) -> mx.array:
    """Σ cᵢ zⁱ with coefficients highest degree first, by Estrin's scheme: a shallow graph (depth ~log n rather than
    Horner's 2n) that MLX's CPU compiler keeps in one fused loop (a long Horner chain measured 2-4x slower there)."""
    c = coefficients[::-1]
    terms = [c[i] + c[i + 1] * z if i + 1 < len(c) else c[i] for i in range(0, len(c), 2)]
    power = z * z
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] * power if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


def _fence(x: mx.array) -> mx.array:
    """A kernel boundary inside a compiled graph (module docstring): x itself, materialised."""
    return mx.contiguous(x)


def _clamp(x: mx.array, bound: float) -> mx.array:
    # (|x+b| - |x-b|) / 2 = clip(x, -b, b) without min/max, whose NaN checks stop the compiled CPU loop vectorising.
    return (mx.abs(x + bound) - mx.abs(x - bound)) * 0.5


def erf(x: mx.array) -> mx.array:
    return _erf_of_clamped(_clamp(x, 4.0))


def _erf_of_clamped(c: mx.array) -> mx.array:
    c = _fence(c)
    c2 = c * c
    return _fence(c * _polynomial(_ERF_P, c2) / _polynomial(_ERF_Q, c2))


_TANH_BOUND = 7.90531110763549805


def tanh(x: mx.array) -> mx.array:
    return _tanh_of_clamped(_clamp(x, _TANH_BOUND))


def _tanh_of_clamped(c: mx.array) -> mx.array:
    c = _fence(c)
    c2 = c * c
    return _fence(c * _polynomial(_TANH_P, c2) / _polynomial(_TANH_Q, c2))


_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 of magnitude < 2**22 to an integer, kept in its low bits
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # Cephes' split of ln 2: n * _LN2_HI is exact in float32
_EXP_R = tuple(1.0 / math.factorial(k) for k in range(7, -1, -1))  # e^r on [-ln2/2, ln2/2], error < 2e-8


def exp(x: mx.array) -> mx.array:
    """e^x for float32 x ≤ 0, as a softmax needs (relative error ≤ 1e-6 where the result is normal; x < -87 gives
    ≈ 1e-38, not 0 — below anything a softmax or a loss can see)."""
    x = mx.maximum(x, -87.0)
    y = x * _LOG2E + _ROUND
    n = y - _ROUND  # round(x / ln 2)
    r = (x - n * _LN2_HI) - n * _LN2_LO  # in [-ln2/2, ln2/2], without the rounding error of x / ln 2 itself
    # 2^n: the rounded integer n sits in y's low mantissa bits; move it into the exponent field.
    scale = mx.view(mx.left_shift(mx.view(y, mx.int32) - (0x4B400000 - 127), 23), mx.float32)
    return _fence(_polynomial(_EXP_R, r) * scale)  # r not fenced: measured slower (more kernels, more buffers)


def _standard_normal_cdf(x: mx.array) -> mx.array:
    # Φ(x) = (1 + erf(x/√2)) / 2, with the clamp applied to x itself (keeps the fused graph shallow)
    return 0.5 + 0.5 * _erf_of_clamped(_clamp(x, 4.0 * math.sqrt(2.0)) * _SQRT1_2)


def _gelu_value(x: mx.array) -> mx.array:
    return x * _standard_normal_cdf(x)


_normal_cdf = mx.compile(_standard_normal_cdf)
_x_times_normal_pdf = mx.compile(lambda x: x * _INV_SQRT_2PI * exp(_fence(-0.5 * x * x)))


def _gelu_grad(x: mx.array) -> mx.array:
    # d/dx x·Φ(x) = Φ(x) + x·φ(x), as two kernels: fused into one, g++ stopped vectorising the loop (3x slower here)
    return _normal_cdf(x) + _x_times_normal_pdf(x)


def _sigmoid_1702(x: mx.array) -> mx.array:
    # sigmoid(1.702x) = (1 + tanh(0.851x)) / 2, clamping x itself (keeps the fused graph shallow)
    return 0.5 + 0.5 * _tanh_of_clamped(_clamp(x, _TANH_BOUND / 0.851) * 0.851)


def _quick_gelu_value(x: mx.array) -> mx.array:
    return x * _sigmoid_1702(x)


def _quick_gelu_grad(x: mx.array) -> mx.array:
    s = _sigmoid_1702(x)
    return s + 1.702 * x * s * (1.0 - s)


def _in_float32(fn):
    """Half-precision inputs are computed in float32 inside the fused kernel (free) and rounded once at the end."""
    return lambda x: fn(x.astype(mx.float32)).astype(x.dtype)


def _with_gradient(stream, value_fn, grad_fn):
    """An activation whose forward and backward are each one compiled, fused elementwise kernel."""
    value, grad = mx.compile(_in_float32(value_fn)), mx.compile(_in_float32(grad_fn))

    @mx.custom_function
    def activation(x):
        return cpu_streams.in_own_shape(stream, value, x)

    @activation.vjp
    def activation_vjp(x, cotangent, output):  # one input: MLX passes the array itself, not a tuple
        with mx.stream(stream):  # the forward's stream (cpu_streams.for_current_stream says why)
            return cotangent * cpu_streams.in_own_shape(stream, grad, x)

    return activation


def _fast_gelu(x: mx.array) -> mx.array:
    return cpu_streams.for_current_stream(_with_gradient, _gelu_value, _gelu_grad)(x)


def _fast_quick_gelu(x: mx.array) -> mx.array:
    return cpu_streams.for_current_stream(_with_gradient, _quick_gelu_value, _quick_gelu_grad)(x)


# The polynomial kernels are for the CPU only (cpu_streams.on_cpu, decided when a graph is traced). On a GPU, erf/exp
# are cheap hardware-assisted instructions; the polynomial kernels there only add JIT time (a ViT-B/32 train step took
# 83 s to compile with them on an H100). CUDA takes gpu_activation's kernels (one pass forward, one backward; MLX's
# compiled backward writes out its intermediates), other GPUs MLX's ops.
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as open_clip's nn.GELU() and HF's "gelu"."""
    if cpu_streams.on_cpu():
        return _fast_gelu(x)
    return gpu_activation.activation("gelu")(x) if gpu_activation.applies(x) else nn.gelu(x)


def quick_gelu(x: mx.array) -> mx.array:
    """x·sigmoid(1.702x), OpenAI CLIP's activation."""
    if cpu_streams.on_cpu():
        return _fast_quick_gelu(x)
    return gpu_activation.activation("quick_gelu")(x) if gpu_activation.applies(x) else x * mx.sigmoid(1.702 * x)


GPU_KINDS = {gelu: "gelu", quick_gelu: "quick_gelu"}  # gpu_activation's name of each (mlp_block's fused backward)


_softmax_exp = mx.compile(lambda x, m: exp((x - m).astype(mx.float32)))


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (masked entries may be -inf: they come out 0 to float precision)."""
    return cpu_streams.for_current_stream(_softmax)(x)


def _softmax(stream):
    def forward(x):
        e = _softmax_exp(x, mx.stop_gradient(x.max(axis=-1, keepdims=True)))
        return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)

    @mx.custom_function
    def softmax(x):
        return cpu_streams.in_own_shape(stream, forward, x)

    @softmax.vjp
    def softmax_vjp(x, cotangent, output):
        with mx.stream(stream):  # the forward's stream (cpu_streams.for_current_stream says why)
            return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))

    return softmax


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, L, heads·Dh) -> (B, heads, L, Dh)."""
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """(B, heads, L, Dh) -> (B, L, heads·Dh)."""
    batch, heads, length, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, -1)


def token_attention(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float, mask=None) -> mx.array:
    """Attention over `heads` heads of (B, L, heads·Dh) projections, returned as (B, L, heads·Dh).

    On CUDA the fused kernels of mlx_clip.gpu_attention (up to 320 tokens) take it when they apply
    (MLXCLIP_GPU_ATTENTION "fused"); they read the projections' layout directly. Otherwise the heads are split off
    and `attention` runs."""
    if GPU_ATTENTION in ("fused", "aligned") and gpu_attention.supported(q, heads, scale, mask):
        return gpu_attention.fused(heads, isinstance(mask, str))(q, k, v)
    return merge_heads(attention(*(split_heads(t, heads) for t in (q, k, v)), scale=scale, mask=mask))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q kᵀ · scale + mask) v for (B, H, L, Dh) arrays; `mask` None, "causal" or additive.

    On the CPU, as two batched matmuls around the fast softmax (MLX's fused SDPA has no CPU kernel: it composes the
    same matmuls around a libm-exp softmax, about 3× slower here). Elsewhere the fused kernel (cuDNN / Metal), or what
    MLXCLIP_GPU_ATTENTION picks (below)."""
    if cpu_streams.on_cpu():
        return _matmul_attention(q, k, v, scale, mask, softmax)
    return _gpu_attention(q, k, v, scale, mask)


def _matmul_attention(q, k, v, scale: float, mask, softmax_fn) -> mx.array:
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, L, L)
    if isinstance(mask, str):
        length = q.shape[-2]
        mask = mx.where(mx.triu(mx.ones((length, length), dtype=mx.bool_), k=1), -mx.inf, 0.0).astype(scores.dtype)
    if mask is not None:
        scores = scores + mask
    return softmax_fn(scores) @ v


# GPU attention (issue 7, benchmarks/perf-notes.md). MLX's CUDA SDPA runs its backward through cuDNN only for sequence
# lengths that are multiples of 128 (CLIP's 50 / 77 / 197 tokens and trimmed text are not), else an unfused path.
# MLXCLIP_GPU_ATTENTION picks: "fused" (default: mlx_clip.gpu_attention's kernels for bf16 sequences of at most 320
# tokens with head width 64: one block per head up to 64 tokens (ViT-B/32 images, trimmed text; attention fwd+bwd 2x
# faster, the ViT-B/32 step ~10%), tiled flash-style kernels above (ViT-B/16's 197 tokens: fwd+bwd 7.45 -> 2.39 ms on
# an H200, the step -14 to -19%; session 20's shapes: 1.17 ms of kernels); longer sequences take sdpa); "sdpa" (mx.fast.scaled_dot_product_attention as is);
# "padded" (q, k, v padded to the next multiple of 128 when that at most doubles the length, padded keys masked out,
# padded query rows computed and dropped: ViT-B-16 train +9-15% img/s on the H100 but +20-27% peak memory); "matmul"
# (two batched matmuls around MLX's softmax, differentiated by MLX: no fused kernel at all); "aligned" (as "fused", but
# sequences beyond the fused kernels padded to the next multiple of 8 (ALIGN_BLOCK), padded keys masked: the unfused
# backward's batched GEMMs then get 16-byte-aligned rows instead of cuBLAS's align-1 kernels; ViT-B/16 -6% on an H100
# before the tiled kernels took 197).
GPU_ATTENTION_MODES = ("sdpa", "padded", "matmul", "fused", "aligned")
GPU_ATTENTION = os.environ.get("MLXCLIP_GPU_ATTENTION", "fused").strip().lower() or "fused"
if GPU_ATTENTION not in GPU_ATTENTION_MODES:
    warnings.warn(f"MLXCLIP_GPU_ATTENTION={GPU_ATTENTION!r}: expected one of {', '.join(GPU_ATTENTION_MODES)}; "
                  "using fused", stacklevel=2)
    GPU_ATTENTION = "fused"
SDPA_BLOCK = 128
ALIGN_BLOCK = 8


def _gpu_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    if GPU_ATTENTION == "matmul":
        return _matmul_attention(q, k, v, scale, mask, lambda x: mx.softmax(x, axis=-1, precise=True))
    length = q.shape[2]
    block = {"padded": SDPA_BLOCK, "aligned": ALIGN_BLOCK}.get(GPU_ATTENTION, 0)
    padded = -(-length // block) * block if block else length
    if (padded == length or padded > 2 * length
            or q.dtype not in (mx.bfloat16, mx.float16) or not (mask is None or isinstance(mask, str))):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    widths = [(0, 0), (0, 0), (0, padded - length), (0, 0)]
    q, k, v = (mx.pad(t, widths) for t in (q, k, v))
    if mask is None:  # "causal" already keeps every real query off the padded keys, which come after it
        mask = mx.arange(padded) < length
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)[:, :, :length]
