"""The CUDA kernels (attention: mlx_clip/attention_kernels_short.py, attention_kernels_tiled.py; the gradients' column
sums: mlx_clip/gpu_reduce.py; the token embedding's gradient: mlx_clip/gpu_embedding.py; the MLP's activation:
mlx_clip/gpu_activation.py; the multi-tensor optimizer and gradient norm: mlx_clip/train/multi_tensor.py) compile for
the H100 (sm_90) with NVRTC, here on a machine without a GPU, wrapped as MLX's CUDA backend wraps a custom kernel
(benchmarks/cuda_compile.py): a syntax or type error in their source fails CI instead of a device loan. Numerics are
tested on the card (tests/test_gpu_attention.py)."""

import pytest

from benchmarks import cuda_compile
from mlx_clip import gpu_attention

if not cuda_compile.nvrtc_available():
    pytest.skip("NVRTC not installed (pyproject's dev extra installs it on Linux x86-64)", allow_module_level=True)

UNITS = cuda_compile.kernel_units()
REDUCE_UNITS = cuda_compile.reduce_units()  # mlx_clip/gpu_reduce.py
EMBEDDING_UNITS = cuda_compile.embedding_units()  # mlx_clip/gpu_embedding.py
ACTIVATION_UNITS = cuda_compile.activation_units()  # mlx_clip/gpu_activation.py
MULTI_TENSOR_UNITS = cuda_compile.multi_tensor_units()  # mlx_clip/train/multi_tensor.py
ALL = UNITS + REDUCE_UNITS + EMBEDDING_UNITS + ACTIVATION_UNITS + MULTI_TENSOR_UNITS


@pytest.mark.parametrize("name,unit", ALL, ids=[name for name, _ in ALL])
def test_kernel_compiles_for_sm90(name, unit):
    ok, log, size = cuda_compile.compile_ptx(unit)
    assert ok, f"{name}:\n{log}"
    assert size > 1000
    assert "warning" not in log.lower(), log


def test_every_kernel_and_length_class_is_covered():
    """Short kernels at <= 64 tokens, tiled ones above (with and without ldmatrix; dq also with 32 rows a warp),
    causal and not: all five kernels."""
    names = {name.rsplit("_L", 1)[0].rstrip("_0123456789") for name, _ in UNITS}
    assert names == {spec.name.rstrip("_0123456789") for spec in gpu_attention.kernel_specs(4)}
    assert any(f"_L{gpu_attention.MAX_LONG_TOKENS}_" in name for name, _ in UNITS)
    assert any(name.endswith("_mt2") and "_dq_" in name and "causal" in name for name, _ in UNITS)
    assert any(name.endswith("_mt2") and "_dkdv_" in name and "causal" in name for name, _ in UNITS)


def test_a_broken_kernel_fails_with_its_log():
    spec = gpu_attention.kernel_specs(13)[2]
    unit = cuda_compile.wrap("broken", gpu_attention.HEADER, spec.source.replace("load_a(q, qa", "load_a(qx, qa", 1),
                             [(n, spec.dtype(n)) for n in spec.inputs], [(n, spec.dtype(n)) for n in spec.outputs],
                             {"L": 197, "H": 12, "NT": 13, "CAUSAL": False, "LDSM_TRANS": True,
                              "LDSM_ROWS": False})
    ok, log, _ = cuda_compile.compile_ptx(unit)
    assert not ok and "qx" in log

