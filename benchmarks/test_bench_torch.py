"""pytest-benchmark suite, torch side (open_clip eager and torch.compile): benchmarks/workloads_torch.py.

    pytest benchmarks/ --benchmark-only
    MLXCLIP_BENCH_ARCH=ViT-B-32 MLXCLIP_BENCH_BATCH=32 MLXCLIP_BENCH_DEVICE=cuda pytest benchmarks/test_bench_torch.py \
        --benchmark-only

torch.compile's first call compiles (minutes on a small CPU); it falls in the warm-up rounds.
"""

import os

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from benchmarks.workloads_mlx import MODES, TASKS  # noqa: E402
from benchmarks.workloads_torch import torch_workload  # noqa: E402
from mlx_clip.config import get_config  # noqa: E402

ARCH = os.environ.get("MLXCLIP_BENCH_ARCH", "tiny")
BATCH = int(os.environ.get("MLXCLIP_BENCH_BATCH", "8"))
DEVICE = os.environ.get("MLXCLIP_BENCH_DEVICE", "cpu")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", TASKS)
def test_torch(benchmark, task, mode):
    workload = torch_workload(get_config(ARCH), task, BATCH, mode, device=DEVICE)
    benchmark.group = f"{ARCH} {task} batch {workload.items}"
    benchmark.extra_info.update(backend="torch", mode=mode, task=task, arch=ARCH, batch=workload.items, device=DEVICE)
    benchmark.pedantic(workload.run, warmup_rounds=2, rounds=5, iterations=1)
    benchmark.extra_info["items_per_s"] = workload.items / benchmark.stats.stats.median
