"""benchmarks/step_census.py: the traced train step's node census and the fixed + per-sample fit."""

import pytest
from mlx.utils import tree_flatten

from benchmarks import step_census
from mlx_clip.config import get_config
from mlx_clip.model import CLIP
from mlx_clip.train import optim


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
