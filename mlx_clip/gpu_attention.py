"""Fused attention for CLIP's sequences on CUDA GPUs (issue 7, benchmarks/perf-notes.md): when our kernels take a call,
which of them runs, and their gradients (mx.custom_function). The CUDA source, and why each design, is in
attention_kernels_short (one block per head, at most 64 tokens: ViT-B/32 images, trimmed text) and
attention_kernels_tiled (flash-style, 65-320 tokens: ViT-B/16's 197 image tokens, ViT-L/14's 257, 77 untrimmed text
tokens). Both read and write the (B, L, heads · 64) layout of the projections directly, so no head split/merge copies
are made.

Scope: bf16, head width 64, L ≤ 320, no mask or causal, scale 1/8, compute capability ≥ 8. Anything else goes to
mx.fast's SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from mlx_clip import attention_kernels_short as short, attention_kernels_tiled as tiled
from mlx_clip.switches import env_choice

HEAD_DIM = 64
MAX_TOKENS = 64  # the one-block kernels
MAX_LONG_TOKENS = 320  # the tiled kernels: 2 blocks an SM by shared memory up to here (tested at 257 and 320)
# The tiled kernels' shared-memory operand loads: ldmatrix.trans for the transposed operands (1, the default; H200:
# 2.21 against 2.35 ms of kernels with four 16-bit loads, 0), and also ldmatrix for the row-major ones (2: no faster,
# ViT-B-16 104.8 against 104.7 ms in session 14, 101.7 against 100.5 in session 20)
LDMATRIX = env_choice("MLXCLIP_GPU_LDMATRIX", (0, 1, 2), 1)
# The tiled kernels' shapes (H200, (256, 12, 197) bf16, fwd + bwd, `python -m benchmarks.attention_profile`; session
# 20's defaults took the three kernels 1.86 -> 1.17 ms). Their loops are latency-bound, so what counts is warps an SM
# (shared memory fits three blocks, registers 65,536 an SM) and independent work a warp:
# - the forward: FWD_ROWS query rows a warp, FWD_WARPS warps a block sharing one copy of the head's k and v: 16 rows,
#   8 warps (72 registers: 24 warps an SM; 0.368 -> 0.299 ms), or 32 rows (each k and v fragment feeding two
#   products; 151 registers), 4 warps;
# - dq: DQ_ROWS query rows a warp, DQ_STEP key rows a step, DQ_WARPS a block: 16, 32, 8 (121 registers, 16 warps an SM:
#   0.578 -> 0.405 ms), or 32 rows (191 registers), 16-key steps, 4 warps, session 13-19's;
# - dk/dv: DKDV_ROWS key rows a warp, DKDV_STEP query rows a step, DKDV_WARPS a block: 16, 16, 8 (128 registers, 16
#   warps an SM: 0.770 -> 0.475 ms), or 4 warps; 32-row steps gave 0.690 ms with 4 warps, but their 158 registers fit
#   one 8-warp block an SM; 32 key rows a warp (250 registers) measured no faster in session 14.
FWD_ROWS = env_choice("MLXCLIP_GPU_FWD_ROWS", (16, 32), 16)
FWD_WARPS = env_choice("MLXCLIP_GPU_FWD_WARPS", (4, 8), 8)
DQ_ROWS = env_choice("MLXCLIP_GPU_DQ_ROWS", (16, 32), 16)
DQ_STEP = env_choice("MLXCLIP_GPU_DQ_STEP", (16, 32), 32)
DQ_WARPS = env_choice("MLXCLIP_GPU_DQ_WARPS", (4, 8), 8)
DKDV_ROWS = env_choice("MLXCLIP_GPU_DKDV_ROWS", (16, 32), 16)
DKDV_STEP = env_choice("MLXCLIP_GPU_DKDV_STEP", (16, 32), 16)
DKDV_WARPS = env_choice("MLXCLIP_GPU_DKDV_WARPS", (4, 8), 8)
# Every kernel's header: the shared part and the one-block kernels' helpers, then the tiled kernels' helpers.
HEADER = short.HEADER + "\n" + tiled.HEADER + "}  // namespace mlxclip_attention\n"


def supported(q: mx.array, heads: int, scale: float, mask) -> bool:
    """Whether the fused kernels take this call: a CUDA device with bf16 tensor cores, bf16 (B, L, heads * 64) inputs,
    L <= 320, no mask or causal, the default 1/sqrt(64) scale."""
    return q.ndim == 3 and _takes(q.dtype, q.shape[1], q.shape[2], heads, scale, mask)


def _takes(dtype, length: int, width: int, heads: int, scale: float, mask) -> bool:
    return (mx.default_device() == mx.gpu and mx.cuda.is_available() and dtype == mx.bfloat16
            and length <= MAX_LONG_TOKENS and width == heads * HEAD_DIM
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


SHORT_SPECS = (
    KernelSpec("mlxclip_attention_forward", short.FORWARD, ("q", "k", "v"), ("o",), short.FORWARD_SMEM),
    KernelSpec("mlxclip_attention_backward", short.BACKWARD, ("q", "k", "v", "dout"), ("dq", "dk", "dv"),
               short.BACKWARD_SMEM),
)
# The same one-block kernels reading q, k and v from one (B, L, 3 * heads * 64) product (mlx_clip.fused_qkv), the
# backward writing their gradients into one array of that shape
JOINT_SPECS = (
    KernelSpec("mlxclip_attention_joint_forward", short.JOINT_FORWARD, ("qkv",), ("o",), short.FORWARD_SMEM),
    KernelSpec("mlxclip_attention_joint_backward", short.JOINT_BACKWARD, ("qkv", "dout"), ("dqkv",),
               short.BACKWARD_SMEM),
)


def tiled_specs(nt: int) -> list[KernelSpec]:
    """The tiled kernels for sequences of nt 16-row tiles (shared memory sized for nt): forward, dq, dk/dv."""
    forward, dq, dkdv = tiled.shared_memory(nt)
    return [KernelSpec(f"mlxclip_attention_long_forward_{nt}", tiled.FORWARD, ("q", "k", "v"), ("o", "lse"), forward),
            KernelSpec(f"mlxclip_attention_long_dq_{nt}", tiled.DQ, ("q", "k", "v", "dout", "lse", "o"),
                       ("dq", "delta"), dq),
            KernelSpec(f"mlxclip_attention_long_dkdv_{nt}", tiled.DKDV, ("q", "k", "v", "dout", "lse", "delta"),
                       ("dk", "dv"), dkdv)]


def kernel_specs(nt: int) -> list[KernelSpec]:
    """Every kernel: the short ones, the tiled ones for nt tiles and the joint short ones (benchmarks/cuda_compile.py
    compiles them all)."""
    return list(SHORT_SPECS) + tiled_specs(nt) + list(JOINT_SPECS)


def _build(specs) -> list:
    return [mx.fast.cuda_kernel(name=spec.name, input_names=list(spec.inputs), output_names=list(spec.outputs),
                                source=spec.source, header=HEADER, shared_memory=spec.shared_memory)
            for spec in specs]


@lru_cache(maxsize=None)
def _short_kernels():
    return _build(SHORT_SPECS)


@lru_cache(maxsize=None)
def _joint_kernels():
    return _build(JOINT_SPECS)


@lru_cache(maxsize=None)
def _tiled_kernels(nt: int):
    return _build(tiled_specs(nt))


def _launch(kernel, inputs: list[mx.array], heads: int, causal: bool, outputs: int, blocks: int = 0,
            stats: bool = False, row_tiles: int = 0, warps: int = 4, extra: tuple = (),
            width: int = 0) -> list[mx.array]:
    """`outputs` arrays shaped as the first input (or `width` wide), then (with `stats`) one fp32 (B, L, heads) row
    statistic (lse, delta). blocks: 0 for the one-block kernels, else the tiled kernels' blocks per (batch, head);
    row_tiles: the dq and dk/dv kernels' 16-row tiles per warp; warps: a block's (the tiled kernels' WARPS); extra:
    more (name, value) template arguments."""
    batch, length, width = inputs[0].shape[:2] + (width or inputs[0].shape[2],)
    shapes = [(batch, length, width)] * outputs + ([(batch, length, heads)] if stats else [])
    template = [("L", length), ("H", heads), ("NT", -(-length // 16)), ("CAUSAL", causal)]
    if blocks:
        template += [("LDSM_TRANS", LDMATRIX >= 1), ("LDSM_ROWS", LDMATRIX >= 2), ("WARPS", warps)]
    template += ([("MT", row_tiles)] if row_tiles else []) + list(extra)
    return kernel(inputs=inputs, template=template,
                  grid=(batch * heads * 32 * warps, max(blocks, 1), 1), threadgroup=(32 * warps, 1, 1),
                  output_shapes=shapes, output_dtypes=[inputs[0].dtype] * outputs + ([mx.float32] if stats else []))


def _short(heads: int, causal: bool):
    """One block per (batch, head), the whole problem in shared memory (L <= MAX_TOKENS)."""

    @mx.custom_function
    def attention(q, k, v):
        return _launch(_short_kernels()[0], [q, k, v], heads, causal, 1)[0]

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        q, k, v = primals
        return tuple(_launch(_short_kernels()[1], [q, k, v, cotangent.astype(q.dtype)], heads, causal, 3))

    return attention


def _tiled(heads: int, causal: bool):
    """The tiled kernels (MAX_TOKENS < L <= MAX_LONG_TOKENS): returns (o, lse); the backward reads lse, and its dq
    kernel writes delta for the dk/dv kernel."""

    def kernels(q):
        return _tiled_kernels(-(-q.shape[1] // 16))

    def blocks(q, rows):  # per (batch, head), of `rows` rows each: a kernel's warps times its rows a warp
        return -(-q.shape[1] // rows)

    @mx.custom_function
    def attention(q, k, v):
        return tuple(_launch(kernels(q)[0], [q, k, v], heads, causal, 1, blocks(q, FWD_WARPS * FWD_ROWS), stats=True,
                             row_tiles=FWD_ROWS // 16, warps=FWD_WARPS))

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v = primals
        out, lse = outputs
        dout = cotangents[0].astype(q.dtype)
        _, dq_kernel, dkdv_kernel = kernels(q)
        dq, delta = _launch(dq_kernel, [q, k, v, dout, lse, out], heads, causal, 1, blocks(q, DQ_WARPS * DQ_ROWS),
                            stats=True, row_tiles=DQ_ROWS // 16, warps=DQ_WARPS,
                            extra=(("KS", DQ_STEP // 16),))
        dk, dv = _launch(dkdv_kernel, [q, k, v, dout, lse, delta], heads, causal, 2,
                         blocks(q, DKDV_WARPS * DKDV_ROWS), row_tiles=DKDV_ROWS // 16, warps=DKDV_WARPS,
                         extra=(("KS", DKDV_STEP // 16),))
        return dq, dk, dv

    return attention


@lru_cache(maxsize=None)
def fused(heads: int, causal: bool):
    """softmax(q kᵀ / 8 [+ causal mask]) v over `heads` heads of (B, L, heads * 64) bf16 arrays, as
    (B, L, heads * 64)."""
    short, tiled = _short(heads, causal), _tiled(heads, causal)

    def attention(q, k, v):
        return short(q, k, v) if q.shape[1] <= MAX_TOKENS else tiled(q, k, v)[0]

    return attention


def supported_joint(width: int, length: int, dtype, heads: int, scale: float, mask) -> bool:
    """Whether `fused_qkv` takes a (B, `length`, 3 * `width`) product of `dtype`: as `supported` for q of (B, length,
    width), and short enough for the one-block kernels (the tiled ones read q, k and v apart)."""
    return length <= MAX_TOKENS and _takes(dtype, length, width, heads, scale, mask)


@lru_cache(maxsize=None)
def fused_qkv(heads: int, causal: bool):
    """As `fused`, of the (B, L, 3 * heads * 64) array [q | k | v] (L <= MAX_TOKENS), as (B, L, heads * 64): the
    one-block kernels reading q, k and v side by side; its gradient is one array shaped as the input."""

    @mx.custom_function
    def attention(qkv):
        return _launch(_joint_kernels()[0], [qkv], heads, causal, 1, width=heads * HEAD_DIM)[0]

    @attention.vjp
    def attention_vjp(qkv, cotangent, output):  # one primal: MLX passes it (and the cotangent) as the array itself
        return _launch(_joint_kernels()[1], [qkv, cotangent.astype(qkv.dtype)], heads, causal, 1)[0]

    return attention
