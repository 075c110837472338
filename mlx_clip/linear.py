"""The dense layer's product, turned round on the CPU when it has few rows (issue 7, benchmarks/perf-notes.md).

MLX computes `x @ W.T` as one `cblas_sgemm(RowMajor, NoTrans, Trans, M, N, K, x, W)`. With M small (one caption's
16 tokens) and MKL running the call on 2 threads, MKL copies the small operand into its panel format over and over
(`sgemm_scopy_right16`: 35% of a batch-1 text tower's samples). The same numbers as `(W @ x.T).T` hand MKL the weight
as the left operand: 16 x 512 x 512 took 97 -> 70 us with the weight in cache and 157 -> 129 us with it cold (as in a
tower, whose weights stream from memory at batch 1); the ViT-B/32 text tower for one caption 26.8 -> 24.0 ms, same
process. At 50 rows (one image) the two orders run alike (86.2 vs 86.0 ms for the image tower), so only up to
FEW_ROWS rows are turned round. With one MKL thread per call (batch-parallel mode, `cpu_streams`) the two orders run
alike, and a GPU's GEMMs are not MKL's: both keep `x @ W.T`. Tested against numpy in `tests/test_linear.py`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams

FEW_ROWS = 32  # measured: 16 rows gain 10-20%, 50 rows neither gain nor lose


def product(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias) for (..., K) inputs and an (N, K) weight, in the faster order for this call."""
    if _turn_round(x, weight):
        rows = x.reshape(-1, x.shape[-1]).T
        y = weight @ rows if bias is None else mx.addmm(bias[:, None], weight, rows)  # bias added inside the GEMM
        # Made row-contiguous (a copy of a few rows): a transposed view would hand the next ops, and the next GEMM,
        # another memory layout than the usual order gives, and MKL rounds differently by layout (a fresh LoRA
        # adapter, whose update is 0, must leave the embeddings bit-identical: tests/test_lora.py).
        return mx.contiguous(y.T).reshape(*x.shape[:-1], weight.shape[0])
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def _turn_round(x: mx.array, weight: mx.array) -> bool:
    # Decided when a graph is traced: shapes, the device and the CPU mode are fixed for a trace.
    rows = x.size // max(x.shape[-1], 1)
    return (rows <= FEW_ROWS and weight.ndim == 2 and cpu_streams.on_cpu() and not cpu_streams.ENABLED
            and cpu_streams.cores() > 1)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) whose product is `product`."""

    def __call__(self, x: mx.array) -> mx.array:
        return product(x, self["weight"], self["bias"] if "bias" in self else None)
