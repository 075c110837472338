"""The MLP's activation (erf GELU, quick GELU) on CUDA GPUs as our own kernels (issue 7, benchmarks/perf-notes.md
change 31): the forward, and the backward with the activation recomputed, each one pass over memory.

MLX differentiates `x (1 + erf(x / √2)) / 2` op by op. In a compiled training step the backward's intermediates
(x / √2, erf(·) + 1) feed both the recomputed activation a (fc2's weight gradient needs it) and dh, so mx.compile
writes each of them out: four kernels of the ViT-B/16 MLP's hidden size, 12.5 ms of a 118 ms H200 step
(results/gpu-s13-h200.md §4) where reading h and the incoming gradient once and writing a and dh once (four passes)
takes ~4 ms at the card's bandwidth. Here one kernel does that, in fp32 registers, eight elements a thread (16-byte
loads); the forward's kernel reads h and writes a. Measured on an H200 (results/gpu-s14-h200.md): 1,278 -> 501 us at
(50432, 3072) bf16, the ViT-B/16 step 114.9 -> 104.7 ms; its peak +1.2 GiB (a now comes out with dh, early; ordering
fc2's weight gradient first to free a sooner made the peak higher still, so the cause is not settled).

Scope: CUDA, float32 / bfloat16 / float16 arrays of a multiple of 8 and fewer than 2^31 elements. Anything else, and
MLXCLIP_GPU_ACTIVATION=0, takes MLX's ops.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from mlx_clip.gpu_reduce import VECTORS, cuda_device
from mlx_clip.switches import env_switch

ENABLED = env_switch("MLXCLIP_GPU_ACTIVATION", True)  # read when a graph is traced
# value_and_grad as one kernel (a and dh from one read of h), or two (MLXCLIP_GPU_ACTIVATION_FUSED=0: a by the forward
# kernel, dh by the gradient kernel, h read twice): the second lets a appear only where fc2's weight gradient uses it,
# to test whether a's early appearance is what raised ViT-B/16's peak by 1.2 GiB (perf-notes change 31). It is not:
# an H200's ViT-B/32 step peaked higher with two kernels (5.44 vs 4.85 GiB; results/gpu-s15-h200.md §2)
FUSED = env_switch("MLXCLIP_GPU_ACTIVATION_FUSED", True)
KINDS = {"gelu": 0, "quick_gelu": 1}  # the KIND template argument
THREADS = 256
_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

# act(x) and its slope d act / dx, in fp32 (accurate erff / expf: the kernels are memory-bound)
HEADER = VECTORS + r"""
namespace mlxclip_activation {
using namespace mlxclip_reduce;
template <int KIND>
__device__ inline float act(float x, float* slope) {
  if (KIND == 0) {  // x Phi(x): Phi' = exp(-x^2 / 2) / sqrt(2 pi)
    const float c = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    *slope = c + x * 0.39894228040143268f * expf(-0.5f * x * x);
    return x * c;
  }
  // x sigmoid(1.702 x), the sigmoid as MLX's: y = sigmoid(-|z|) from exp(|z|), so s and 1 - s are y and 1 - y
  // without a cancelling 1 - s
  const float z = 1.702f * x, y = 1.0f / (1.0f + expf(fabsf(z)));
  const float s = z < 0.0f ? y : 1.0f - y;
  *slope = s + z * y * (1.0f - y);
  return x * s;
}
}  // namespace mlxclip_activation
"""

# One thread per 8 elements of the flattened array; N = its size, read at run time (one kernel serves every shape).
_START = r"""
  using namespace mlxclip_activation;
  const size_t i = 8 * ((size_t)blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= (size_t)h_shape[0]) return;
  float v[8], slope[8];
  load8(h + i, v);
"""
FORWARD = _START + r"""
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = act<KIND>(v[e], &slope[e]);
  store8(a + i, v);
"""
GRAD = _START + r"""
  float gv[8];
  load8(g + i, gv);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    act<KIND>(v[e], &slope[e]);
    gv[e] *= slope[e];
  }
  store8(dh + i, gv);
"""
VALUE_AND_GRAD = _START + r"""
  float gv[8];
  load8(g + i, gv);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    v[e] = act<KIND>(v[e], &slope[e]);
    gv[e] *= slope[e];
  }
  store8(a + i, v);
  store8(dh + i, gv);
"""
SOURCES = {  # kernel -> (source, inputs, outputs)
    "forward": (FORWARD, ("h",), ("a",)),
    "grad": (GRAD, ("h", "g"), ("dh",)),
    "value_and_grad": (VALUE_AND_GRAD, ("h", "g"), ("a", "dh")),
}


def applies(x: mx.array) -> bool:
    """Whether our kernels take x (decided when a graph is traced)."""
    return ENABLED and cuda_device() and x.dtype in _DTYPES and x.size % 8 == 0 and 0 < x.size < 2**31


@lru_cache(maxsize=None)
def _kernel(which: str):
    source, inputs, outputs = SOURCES[which]
    return mx.fast.cuda_kernel(name=f"mlxclip_activation_{which}", input_names=list(inputs),
                               output_names=list(outputs), source=source, header=HEADER)


def _run(which: str, kind: str, h: mx.array, *g: mx.array) -> list[mx.array]:
    outputs = SOURCES[which][2]
    threads = -(-h.size // 8)
    return _kernel(which)(inputs=[h.reshape(-1)] + [t.astype(h.dtype).reshape(-1) for t in g],
                          template=[("T", h.dtype), ("KIND", KINDS[kind])],
                          grid=(-(-threads // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                          output_shapes=[(h.size,)] * len(outputs), output_dtypes=[h.dtype] * len(outputs))


def value(kind: str, h: mx.array) -> mx.array:
    """act(h) by the forward kernel (applies(h))."""
    return _run("forward", kind, h)[0].reshape(h.shape)


def value_and_grad(kind: str, h: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    """(act(h), g · act'(h)) from one pass over h and g (applies(h); g shaped as h), or two with FUSED off."""
    if not FUSED:
        return value(kind, h), _run("grad", kind, h, g)[0].reshape(h.shape)
    a, dh = _run("value_and_grad", kind, h, g)
    return a.reshape(h.shape), dh.reshape(h.shape)


@lru_cache(maxsize=None)
def activation(kind: str):
    """act as a differentiable function of one array (applies(x)): the forward kernel, and a backward that recomputes
    the slope from x in one pass (nothing but x is kept)."""

    @mx.custom_function
    def fn(x):
        return value(kind, x)

    @fn.vjp
    def fn_vjp(x, cotangent, output):  # one input: MLX passes the array itself, not a tuple
        return _run("grad", kind, x, cotangent)[0].reshape(x.shape)

    return fn
