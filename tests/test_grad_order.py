"""linear.after_weight_grads (ORDERED_WEIGHT_GRADS): off the CPU a dense layer's input gradient waits for its weight
gradients, so MLX runs each weight-gradient GEMM where the backward reaches its layer instead of at the backward's end.
Checked on the step as the product builds it off the CPU (the GPU branch: benchmarks/step_census.py), run on this CPU:
the same numbers, and a lower step peak, most of all where one node reads many gradients (the shape of the CUDA strided
norm kernel, which MLX gave +1.8 GiB of peak on an H200)."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from benchmarks import step_census
from benchmarks.workloads_mlx import mlx_workload
from mlx_clip import cpu_streams, linear
from mlx_clip.config import get_config
from mlx_clip.train import step


@pytest.fixture
def gpu_branch(monkeypatch):
    """The step built as off the CPU (no batch-parallel slices, no CPU kernels), as step_census --gpu-branch does."""
    for module, name, value in step_census.gpu_branch_settings():
        monkeypatch.setattr(module, name, value)


def _kernel_shaped_norm(monkeypatch):
    """The strided norm kernel's graph shape from MLX ops (step_census.norm_like_kernel: its value is 1, not the
    norm, which leaves the step's shape, not its numbers, to compare)."""
    for module, name, value in step_census.norm_like_kernel_settings():
        monkeypatch.setattr(module, name, value)


def _step_peak(batch: int) -> float:
    """GiB above the resident arrays at one compiled `small` train step's peak (after two warm-up steps)."""
    work = mlx_workload(get_config("small"), "train", batch, "compiled", "float32")
    for _ in range(2):
        work.run()
    return step_census.step_peak_gib(work)


@pytest.mark.parametrize("norm", ["flat", "kernel-shaped"])
def test_ordered_weight_gradients_lower_the_step_peak(monkeypatch, gpu_branch, norm):
    if norm == "kernel-shaped":
        _kernel_shaped_norm(monkeypatch)
    else:
        # per-gradient sums: "auto" on GPUs but CUDA, and on CUDA with MLXCLIP_GPU_NORM_KERNEL=0
        monkeypatch.setattr(step, "NORM_SQUARES", "flat")
    peaks = {}
    for ordered in (False, True):
        monkeypatch.setattr(linear, "ORDERED_WEIGHT_GRADS", ordered)
        peaks[ordered] = _step_peak(64)
        mx.clear_cache()
    # measured: kernel-shaped 0.53 -> 0.35 GiB, flat 0.385 -> 0.347 GiB
    assert peaks[True] < (0.8 if norm == "kernel-shaped" else 0.97) * peaks[False], peaks


def _one_step(ordered: bool, monkeypatch) -> dict:
    monkeypatch.setattr(linear, "ORDERED_WEIGHT_GRADS", ordered)
    work = mlx_workload(get_config("tiny"), "train", 4, "compiled", "float32")
    (loss, norm, applied), params, opt_state = work.launch()
    mx.eval(loss, norm, params, opt_state)
    return {"loss": loss, "norm": norm, **dict(tree_flatten(params)), **dict(tree_flatten(opt_state))}


def test_ordering_changes_no_number(monkeypatch, gpu_branch):
    """One step's loss, clip norm, parameters and AdamW moments, bit for bit."""
    ordered, plain = _one_step(True, monkeypatch), _one_step(False, monkeypatch)
    assert ordered.keys() == plain.keys() and len(ordered) > 10
    for name in ordered:
        np.testing.assert_array_equal(np.array(ordered[name]), np.array(plain[name]), err_msg=name)


def test_on_the_cpu_nothing_is_added(monkeypatch):
    dx, dw = mx.arange(6.0).reshape(2, 3), mx.ones((3, 3))
    monkeypatch.setattr(cpu_streams, "on_cpu", lambda: True)  # the CPU's graph, whose host time is its step's
    assert linear.after_weight_grads(dx, dw) is dx
    monkeypatch.setattr(cpu_streams, "on_cpu", lambda: False)
    waiting = linear.after_weight_grads(dx, dw)
    assert waiting is not dx and np.array_equal(np.array(waiting), np.array(dx))
