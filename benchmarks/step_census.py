"""What a compiled MLX train step is made of, and what it costs apart from its batch (issue 7).

- census: the traced step's graph nodes by primitive (fused kernels named by their ops), as MLX will evaluate them
  (`mx.export_to_dot` of the step's outputs). Views (Reshape, Transpose, ...) cost ~1 us each to evaluate on the CPU,
  kernels and GEMM calls more: the count is where per-step overhead starts.
- fixed: the step timed at several batch sizes and fitted as fixed + per-sample cost, the two numbers that say whether
  a backend is behind per sample (compute) or per step (optimizer, graph, launches).

- without attention (`--no-attention`, with `--fit`): each attention replaced by its value input (projections kept;
  wrong numbers, right shapes), the upper bound of what a faster attention could save.

    python -m benchmarks.step_census --arch small --batch 32
    python -m benchmarks.step_census --arch small --fit 2,8,32
    python -m benchmarks.step_census --arch small --fit 32 --no-attention

The workload is `mlxclip bench`'s train step (benchmarks/workloads_mlx.py), in the product's CPU mode.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.workloads_mlx import mlx_workload
from mlx_clip import cpu_streams
from mlx_clip.config import get_config

VIEWS = {"Reshape", "Transpose", "ExpandDims", "Squeeze", "Flatten", "Unflatten", "Broadcast", "View", "Slice"}


def _workload(arch: str, batch: int):
    words = None if arch in ("tiny", "small") else (5, 30)
    return mlx_workload(get_config(arch), "train", batch, "compiled", "float32", words=words)


def census(arch: str, batch: int) -> collections.Counter:
    """{primitive name: nodes} of one traced train step (after a warm-up step, so the trace is the cached one)."""
    load = _workload(arch, batch)
    load.run()
    with cpu_streams.batch_parallel_mode(batch > 1):  # the mode the workload runs in (workloads_mlx._in_mode)
        outputs = load.launch()
    leaves = [v for _, v in tree_flatten(outputs) if isinstance(v, mx.array)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.dot")
        mx.export_to_dot(path, *leaves)
        with open(path) as f:
            labels = re.findall(r'label ?= ?"([^"]*)"', f.read())
    mx.eval(leaves)
    return collections.Counter(label.split()[0] for label in labels if label)


def step_ms(arch: str, batch: int, steps: int) -> float:
    """Median ms of `steps` train steps after two warm-up steps."""
    load = _workload(arch, batch)
    load.run()
    load.run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        load.run()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _cut_attention() -> None:
    # the model calls fastmath.token_attention for every non-pooled attention; the pooled last block's is kept
    from mlx_clip import fastmath

    fastmath.token_attention = lambda q, k, v, heads, scale, mask=None: v + 0 * (q + k)


def fit(batches: list[int], ms: list[float]) -> tuple[float, float]:
    """(fixed ms, ms per sample): the least-squares line through (batch, ms)."""
    per_sample, fixed = np.polyfit(np.array(batches, float), np.array(ms, float), 1)
    return float(fixed), float(per_sample)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--batch", type=int, default=32, help="the census's batch")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fit", default="", help="comma-separated batch sizes: time the step at each and fit fixed + "
                                              "per-sample cost (instead of the census)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-attention", action="store_true", help="time the steps with attention cut out (see above)")
    args = ap.parse_args()
    if args.no_attention:
        _cut_attention()
    if args.fit:
        batches = [int(b) for b in args.fit.split(",")]
        ms = [step_ms(args.arch, b, args.steps) for b in batches]
        for b, t in zip(batches, ms):
            print(f"{args.arch} train b{b}: {t:.1f} ms")
        if len(batches) < 2:
            return
        fixed, per_sample = fit(batches, ms)
        print(f"{args.arch}: fixed {fixed:.1f} ms per step + {per_sample:.2f} ms per sample")
        return
    counts = census(args.arch, args.batch)
    views = sum(n for name, n in counts.items() if name in VIEWS)
    print(f"{args.arch} train b{args.batch}: {sum(counts.values())} nodes, {views} of them views, "
          f"{counts.get('Matmul', 0) + counts.get('AddMM', 0)} GEMM nodes, "
          f"{sum(n for name, n in counts.items() if name.startswith('Compiled'))} fused kernels")
    for name, n in counts.most_common(args.top):
        print(f"{n:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
