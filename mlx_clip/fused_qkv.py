"""q, k and v as one product on CUDA (issue 7, benchmarks/perf-notes.md).

A ViT-B/32 train step on an H200 is host-bound: its time is the main thread's work per graph node, and a cuBLAS call
is the dearest node (~28 µs: MLX builds a cuBLASLt plan and stream-captures every GEMM). Each attention block made
nine of them for its projections (q, k, v: a product forward, dx and dW backward) plus two adds joining the three dx.
Here the block's three weights and biases are concatenated (two small copies a step), one product makes the
(B·L, 3D) array [q | k | v], and the one-block attention kernels read q, k and v in place and write their gradients
into one array of that shape (mlx_clip.gpu_attention.fused_qkv): three cuBLAS calls instead of nine, one bias
column sum instead of three, no adds. The weights' gradients come back as row blocks of the concatenation's.

Session 6 tried one q/k/v product with MLX's SDPA, whose head split copied q, k and v apart again (no gain); the
kernels here need no copy. Only where those kernels take the call: CUDA, bf16, head width 64, at most
gpu_attention.MAX_TOKENS tokens, no mask or causal (ViT-B/32's images and trimmed captions; ViT-B/16's 197-token
images keep three products), and plain Linear projections (LoRA and quantized layers take the usual path).
MLXCLIP_GPU_FUSED_QKV=0 turns it off.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_clip import fastmath, gpu_attention, linear
from mlx_clip.switches import env_switch

ENABLED = env_switch("MLXCLIP_GPU_FUSED_QKV", True)  # read when a graph is traced


def applies(attn, dtype, lengths: tuple, mask) -> bool:
    """Whether `context` takes this call: attention `attn` (a model.Attention) of (B, L) = `lengths` tokens whose
    projections' input has `dtype`."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    return (ENABLED and fastmath.GPU_ATTENTION in ("fused", "aligned") and not attn.chunk
            and all(linear.is_plain(p) and "bias" in p and p.weight.dtype == dtype
                    for p in projections)
            and gpu_attention.supported_joint(attn.q_proj.weight.shape[0], lengths[-1], dtype, attn.num_heads,
                                              attn.scale, mask))


def context(attn, y: mx.array, lengths: tuple, mask) -> mx.array:
    """The attention of rows `y` ((B·L, D), LayerNorm's output) before the output projection, as (B·L, D)."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = mx.concatenate([p.weight for p in projections])
    bias = mx.concatenate([p.bias for p in projections])
    qkv = linear.product(y, weight, bias)  # (B·L, 3D); its backward: one dx, one dW, one bias column sum
    out = gpu_attention.fused_qkv(attn.num_heads, isinstance(mask, str))(qkv.reshape(*lengths, qkv.shape[-1]))
    return out.reshape(y.shape)
