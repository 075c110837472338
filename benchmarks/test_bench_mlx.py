"""pytest-benchmark suite, MLX side: the same workloads `mlxclip bench` times (benchmarks/workloads_mlx.py).

    pytest benchmarks/ --benchmark-only                      # tiny arch, batch 8
    MLXCLIP_BENCH_ARCH=ViT-B-32 MLXCLIP_BENCH_BATCH=32 pytest benchmarks/test_bench_mlx.py --benchmark-only

Kept out of the default test run (pyproject's testpaths is tests/). For side-by-side numbers with the machine named,
use `mlxclip bench`, which runs every measurement in its own process.
"""

import os

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import pytest

from benchmarks.workloads_mlx import MODES, TASKS, mlx_workload
from mlx_clip.config import get_config

ARCH = os.environ.get("MLXCLIP_BENCH_ARCH", "tiny")
BATCH = int(os.environ.get("MLXCLIP_BENCH_BATCH", "8"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", TASKS)
def test_mlx(benchmark, task, mode):
    workload = mlx_workload(get_config(ARCH), task, BATCH, mode)
    benchmark.group = f"{ARCH} {task} batch {workload.items}"
    benchmark.extra_info.update(backend="mlx", mode=mode, task=task, arch=ARCH, batch=workload.items)
    benchmark.pedantic(workload.run, warmup_rounds=2, rounds=5, iterations=1)
    benchmark.extra_info["items_per_s"] = workload.items / benchmark.stats.stats.median
