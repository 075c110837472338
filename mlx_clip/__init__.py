"""mlx-clip: CLIP in MLX — load, convert, fine-tune, evaluate and serve."""

from mlx_clip import _blas, cpu_jit

_blas.load()  # must precede the first `import mlx.core` anywhere in the process
cpu_jit.enable()  # before MLX builds its first CPU kernel: vectorised fused loops (cpu_jit.py says why)

from mlx_clip import cpu_cache  # noqa: E402  (after the BLAS preload)

cpu_cache.configure()  # CPU builds: MLXCLIP_CPU_CACHE, if set, sizes MLX's buffer cache (cpu_cache.py says why)

from mlx_clip import gpu_buffers  # noqa: E402

gpu_buffers.configure()  # CUDA: 1,000 kernels a command buffer unless MLX_MAX_OPS_PER_BUFFER is set (gpu_buffers.py)

__version__ = "0.1.0"

# Public names, imported on first use so `import mlx_clip.tokenizer` stays light.
_LAZY = {
    "CLIP": "mlx_clip.model",
    "CLIPConfig": "mlx_clip.config",
    "TextConfig": "mlx_clip.config",
    "VisionConfig": "mlx_clip.config",
    "get_config": "mlx_clip.config",
    "list_configs": "mlx_clip.config",
    "load": "mlx_clip.io",
    "save": "mlx_clip.io",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlx_clip' has no attribute {name!r}")
