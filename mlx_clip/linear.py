"""The dense layer's product, turned round on the CPU when it has few rows (issue 7, benchmarks/perf-notes.md).

MLX computes `x @ W.T` as one `cblas_sgemm(RowMajor, NoTrans, Trans, M, N, K, x, W)`. With M small (one caption's
16 tokens) and MKL running the call on 2 threads, MKL copies the small operand into its panel format over and over
(`sgemm_scopy_right16`: 35% of a batch-1 text tower's samples). The same numbers as `(W @ x.T).T` hand MKL the weight
as the left operand: 16 x 512 x 512 took 97 -> 70 us with the weight in cache and 157 -> 129 us with it cold (as in a
tower, whose weights stream from memory at batch 1); the ViT-B/32 text tower for one caption 26.8 -> 24.0 ms, same
process. At 50 rows (one image) the two orders run alike (86.2 vs 86.0 ms for the image tower), so only up to
FEW_ROWS rows are turned round. With one MKL thread per call (batch-parallel mode, `cpu_streams`) the two orders run
alike, and a GPU's GEMMs are not MKL's: both keep `x @ W.T`. Tested against numpy in `tests/test_linear.py`.

On the CPU the usual order also hands back the weight's gradient row-major (`ROW_MAJOR_GRADS`): MLX's autodiff of
`x @ W.T` makes it as (xᵀ g)ᵀ, a transposed view, and every later pass over it (the slices' sum in batch-parallel
mode, the clip norm, AdamW's fused update, whose weights and moments are row-major) then reads it column by column.
The same GEMM written as gᵀ x gives it in the weight's layout: ViT-B-32 b16 train step, same process, alternating
(`benchmarks/scratch/gradab.py`): 4,169 -> 3,931, 4,102 -> 4,037, 4,114 -> 3,974 ms. The MLP block's hand-written
backward (`mlp_block`) already did so; this covers the attention projections and the towers' output projections.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams, gpu_reduce
from mlx_clip.switches import env_switch

FEW_ROWS = 32  # measured: 16 rows gain 10-20%, 50 rows neither gain nor lose
ROW_MAJOR_GRADS = env_switch("MLXCLIP_ROW_MAJOR_GRADS", True)  # read when a graph is traced
# The same on a GPU (cuBLAS makes either layout at one cost): opt-in, as an H100 measured no gain in speed and peaks
# that vary more between runs of one setting than between settings (benchmarks/results/gpu-rowmajor-h100-s10.md)
ROW_MAJOR_GRADS_ON_GPU = env_switch("MLXCLIP_ROW_MAJOR_GRADS_GPU", False)
# Or, on a GPU, autodiff's (xᵀ g)ᵀ copied to the weight's layout (MLXCLIP_GPU_CONTIGUOUS_GRADS=1, opt-in): AdamW
# reads the transposed view strided (98 updates of a ViT-B/16 step took 36 us each against ~12 us for the rest:
# results/gpu-s14-h200.md §4), and until session 16 the clip norm's reshape copied each such gradient too, so one copy
# at the source was to serve both. No gain on an H200's ViT-B/32 step (83.7 vs 82.0 ms, results/gpu-s15-h200.md §2)
CONTIGUOUS_GRADS_ON_GPU = env_switch("MLXCLIP_GPU_CONTIGUOUS_GRADS", False)


# Off the CPU a dense layer's input gradient waits for its weight and bias gradients (`after_weight_grads`). MLX runs
# a step's nodes in reverse breadth-first order from the step's outputs (`eval_impl`'s tape), so a weight gradient's
# place is set by its readers: AdamW's update and the clip norm. Where one node reads many gradients (the strided norm
# kernel: 24 a launch), every weight-gradient GEMM landed at the end of the backward pass and kept each layer's
# activation and cotangent alive until then (session 26: ViT-B-32 b64 on the CPU's GPU-branch graph, the kernel's
# shape emulated: step peak 3.40 GiB against 2.30 with the default norm; on an H200 +1.8 GiB at b256). Waiting for
# them puts each GEMM where the backward reaches its layer (the same step: 2.31 GiB; the default norm's 2.08). One
# graph node a layer (a no-op); MLXCLIP_ORDERED_WEIGHT_GRADS=0 leaves the order to MLX
# (`python -m benchmarks.step_census --gpu-branch --norm-like-kernel --peak --ab ...`).
ORDERED_WEIGHT_GRADS = env_switch("MLXCLIP_ORDERED_WEIGHT_GRADS", True)  # read when a graph is traced


def after_weight_grads(dx: mx.array, *grads: mx.array) -> mx.array:
    """`dx` (the gradient a layer hands back to the one before it), made to wait for the layer's parameter gradients
    `grads` off the CPU (ORDERED_WEIGHT_GRADS)."""
    if not ORDERED_WEIGHT_GRADS or cpu_streams.on_cpu() or not grads:
        return dx
    return mx.depends(dx, list(grads))


def product(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias) for (..., K) inputs and an (N, K) weight, in the faster order for this call."""
    if _turn_round(x, weight):
        rows = x.reshape(-1, x.shape[-1]).T
        y = weight @ rows if bias is None else mx.addmm(bias[:, None], weight, rows)  # bias added inside the GEMM
        # Made row-contiguous (a copy of a few rows): a transposed view would hand the next ops, and the next GEMM,
        # another memory layout than the usual order gives, and MKL rounds differently by layout (a fresh LoRA
        # adapter, whose update is 0, must leave the embeddings bit-identical: tests/test_lora.py).
        return mx.contiguous(y.T).reshape(*x.shape[:-1], weight.shape[0])
    on_cpu = cpu_streams.on_cpu()
    row_major = ROW_MAJOR_GRADS and (on_cpu or ROW_MAJOR_GRADS_ON_GPU)
    copied = CONTIGUOUS_GRADS_ON_GPU and not on_cpu and not row_major
    # on a GPU the bias gradient by gpu_reduce.column_sum (MLX's column reduction is ~5x slower there)
    gpu_sum = bias is not None and gpu_reduce.column_sum_fits(x.size // max(x.shape[-1], 1), weight.shape[0], x.dtype)
    if row_major or copied or gpu_sum:
        dense = cpu_streams.for_current_stream(_dense, bias is not None, row_major, copied)
        return dense(x, weight) if bias is None else dense(x, weight, bias)
    return _plain(x, weight, bias)


def _plain(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def _dense(stream, has_bias: bool, row_major: bool, copied: bool = False):
    """`x @ W.T (+ b)` with a hand-written backward: dW = gᵀ x, row-major like W (module docstring), or with
    `row_major` False (xᵀ g)ᵀ as MLX's autodiff makes it, made contiguous when `copied`; db by
    gpu_reduce.column_sum. Built per stream: a hand-written VJP runs on the stream current when the backward is
    traced (cpu_streams.for_current_stream)."""

    @mx.custom_function
    def dense(x, weight, *bias):
        return _plain(x, weight, bias[0] if bias else None)

    @dense.vjp
    def dense_vjp(primals, cotangent, output):
        # Only the gradients asked for are evaluated (a frozen weight's GEMM is never run: MLX is lazy).
        x, weight = primals[:2]
        with mx.stream(stream):
            rows, x_rows = as_rows(cotangent), as_rows(x)
            dw = rows.T @ x_rows if row_major else (x_rows.T @ rows).T
            dw = mx.contiguous(dw) if copied else dw
            # dx from the rows already made: `cotangent @ weight` on (B, L, N) would flatten and unflatten it again,
            # two graph nodes where one reshape does (the same product; a host-bound GPU step pays per node)
            dw = dw.astype(weight.dtype)
            db = (gpu_reduce.column_sum(rows).astype(primals[2].dtype),) if has_bias else ()
            dx = (rows @ weight).reshape(x.shape).astype(x.dtype)
            return (after_weight_grads(dx, dw, *db), dw, *db)

    return dense


def as_rows(t: mx.array) -> mx.array:
    """t as one (rows, last axis) matrix: every leading axis' entries as rows; a matrix as it is (MLX's reshape
    returns an array already of an explicit shape, but one with -1 is a graph node even where nothing changes)."""
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


def _turn_round(x: mx.array, weight: mx.array) -> bool:
    # Decided when a graph is traced: shapes, the device and the CPU mode are fixed for a trace.
    rows = x.size // max(x.shape[-1], 1)
    return (rows <= FEW_ROWS and weight.ndim == 2 and cpu_streams.on_cpu() and not cpu_streams.ENABLED
            and cpu_streams.cores() > 1)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) whose product is `product`."""

    def __call__(self, x: mx.array) -> mx.array:
        return product(x, self["weight"], self["bias"] if "bias" in self else None)


def is_plain(module: nn.Module) -> bool:
    """A dense layer whose weight is used as it is (nn.Linear or ours), not a LoRA, quantized or other wrapper: the
    hand-written blocks (mlp_block, fused_qkv) read its weight and bias themselves."""
    return type(module) in (nn.Linear, Linear)
