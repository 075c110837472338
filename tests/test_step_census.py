"""benchmarks/step_census.py: the traced train step's node census and the fixed + per-sample fit."""

import pytest
from mlx.utils import tree_flatten

from benchmarks import step_census
from mlx_clip.config import get_config
from mlx_clip.model import CLIP
from mlx_clip.train import optim, step


def test_census_sees_one_update_kernel_per_small_parameter_and_split_updates_for_large_ones():
    counts = step_census.census("tiny", 4)
    sizes = [p.size for _, p in tree_flatten(CLIP(get_config("tiny")).trainable_parameters())]
    small = sum(size <= optim.FUSED_UPDATE_MAX for size in sizes)
    assert 0 < small < len(sizes)  # tiny has both kinds (its token embedding is the large one)
    fused = [name for name in counts if name.startswith("Compiled")]
    # AdamW's kernels: v's square and the update's square root in one kernel when fused, in two kernels when split
    assert sum(counts[n] for n in fused if "Square" in n and "Sqrt" in n) == small
    assert sum(counts[n] for n in fused if "Square" in n and "Sqrt" not in n) >= len(sizes) - small
    assert counts["Matmul"] > 0 and sum(counts[v] for v in step_census.VIEWS) > 0


def test_fit_recovers_a_line():
    fixed, per_sample = step_census.fit([2, 8, 32], [10 + 2 * 3.5, 10 + 8 * 3.5, 10 + 32 * 3.5])
    assert fixed == pytest.approx(10.0) and per_sample == pytest.approx(3.5)


def test_gpu_branch_reduce_takes_two_norm_nodes_and_the_fold_saves_a_node_per_parameter(monkeypatch):
    """Off the CPU (traced here with the GPU branch, in bf16) with MLXCLIP_NORM_SQUARES=reduce, each gradient's sum of
    squares is one fused square and one sum read by the total, no flattening or squeeze per gradient; with
    optim.FOLD_CLIP_GPU the clip factor goes into AdamW's update kernel rather than a multiply of its own per gradient,
    one node per parameter fewer (but the 0-d logit_scale's: see the end)."""
    from mlx_clip import cpu_streams

    monkeypatch.setattr(cpu_streams, "on_cpu", lambda: False)
    monkeypatch.setattr(optim, "on_cpu", lambda: False)
    monkeypatch.setattr(step_census, "DTYPE", "bfloat16")
    monkeypatch.setattr(step, "NORM_SQUARES", "reduce")
    params = [p for _, p in tree_flatten(CLIP(get_config("tiny")).trainable_parameters())]
    n, arrays = len(params), sum(p.ndim > 0 for p in params)  # a 0-d one's square and "sum" fuse into the total
    text = step_census._step_dot("tiny", 2)
    kinds = ("CompiledAsTypeSquare", "Square")  # bf16 gradients are cast first; fp32 ones (logit_scale's) are not
    squares = step_census.context(text, kinds[0]) + step_census.context(text, kinds[1])
    # each gradient's square read by its sum alone; unfolded, AdamW squares the 0-d fp32 logit_scale's scaled gradient
    # in a node of its own too, read by its update kernel, never by a reshape
    assert sum(count for (_, readers), count in squares.items() if readers == ("Sum",)) == arrays
    assert all(readers == ("Sum",) or readers[0].startswith("Compiled") for (_, readers) in squares)
    sums = step_census.context(text, "Sum")
    norm_sums = {key: count for key, count in sums.items() if key[0] in ((kinds[0],), (kinds[1],))}
    assert sum(norm_sums.values()) == arrays and not any("Squeeze" in readers for (_, readers) in norm_sums)
    monkeypatch.setattr(optim, "FOLD_CLIP_GPU", True)  # the GPU's default since session 22 (s26b: queued, faster)
    folded = sum(step_census.census("tiny", 2).values())
    monkeypatch.setattr(optim, "FOLD_CLIP_GPU", False)
    # one node per parameter but the 0-d logit_scale: at its chain's depth both ways cut the gradient's zeroing into a
    # kernel of its own, which unfolded takes the scaling in too (until session 28 the unfolded update also squared
    # its scaled gradient in bf16 in a node of its own: n then)
    assert sum(step_census.census("tiny", 2).values()) - folded == n - 1


def test_gpu_branch_auto_norm_is_flat(monkeypatch):
    """Off the CPU "auto" is "flat" since session 18 (reduce raised ViT-B-16's peak by 1.4 GiB on an H200): the traced
    GPU-branch step has flat's node census, not reduce's."""
    from mlx_clip import cpu_streams

    monkeypatch.setattr(cpu_streams, "on_cpu", lambda: False)
    monkeypatch.setattr(optim, "on_cpu", lambda: False)
    monkeypatch.setattr(step_census, "DTYPE", "bfloat16")
    counts = {}
    for way in ("auto", "flat", "reduce"):
        monkeypatch.setattr(step, "NORM_SQUARES", way)
        counts[way] = step_census.census("tiny", 2)
    assert counts["auto"] == counts["flat"] != counts["reduce"]


def test_ab_traces_each_workload_under_its_value_and_restores_the_setting(monkeypatch):
    """--ab: two workloads built in one process, the first under the setting as it is, the second under the given
    value (held while its warm-up steps trace it), stepped alternately; the module's value restored after."""
    seen = []
    real = step_census._workload

    def workload(arch, batch):
        seen.append(step.DOT_ROWS_MIN)
        return real(arch, batch)

    monkeypatch.setattr(step_census, "_workload", workload)
    before = step.DOT_ROWS_MIN
    times = step_census.ab("tiny", 2, "mlx_clip.train.step.DOT_ROWS_MIN=2**40", seconds=0)
    assert seen == [before, 2 ** 40] and step.DOT_ROWS_MIN == before
    assert list(times) == [f"DOT_ROWS_MIN={before!r}", f"DOT_ROWS_MIN={2 ** 40!r}"]
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    with pytest.raises(ValueError, match="module.NAME=VALUE"):
        step_census.ab("tiny", 2, "DOT_ROWS_MIN", seconds=0)
