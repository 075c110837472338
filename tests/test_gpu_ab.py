"""benchmarks.gpu_ab's variant strings: each setting reaches its module switch, `+` joins them, every variant starts
from the process's own settings, and a bad name or value is refused with the choices named."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import pytest

from benchmarks import gpu_ab
from mlx_clip import gpu_activation, gpu_reduce, linear, qkv_block


def test_settings_are_set_joined_and_reset():
    try:
        gpu_ab._set("qkv=on+lnforward=ours+gradcopy=1+actfused=0+finish=1")
        assert qkv_block.ENABLED and gpu_reduce.LN_FORWARD and linear.CONTIGUOUS_GRADS_ON_GPU
        assert not gpu_activation.FUSED and gpu_reduce.FINISH_KERNEL
        gpu_ab._set("default")  # back to the process's settings
        now = (qkv_block.ENABLED, gpu_reduce.LN_FORWARD, linear.CONTIGUOUS_GRADS_ON_GPU, gpu_activation.FUSED,
               gpu_reduce.FINISH_KERNEL)
        assert now == tuple(gpu_ab.DEFAULTS[name] for name in ("qkv", "lnforward", "gradcopy", "actfused", "finish"))
    finally:
        gpu_ab._set("default")


@pytest.mark.parametrize("variant", ["qkv=maybe", "flash", "speed=fast"])
def test_a_bad_variant_names_the_choices(variant):
    with pytest.raises(SystemExit, match="expected default or NAME=VALUE.*qkv: on, off"):
        gpu_ab._set(variant)
    gpu_ab._set("default")
