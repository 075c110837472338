"""What `mlxclip doctor` reports: MLX, its device, the BLAS in use and the fp32 matmul rate it gives, torch."""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time

from mlx_clip import _blas, onednn_blas


def matmul_gflops(n: int = 1024, repeats: int = 7, dtype: str = "float32", best: bool = False) -> float:
    """GFLOP/s of an n×n @ n×n MLX matmul on the default device (after one warm-up): the median of `repeats`, or the
    fastest (`best`, a peak's estimate on a machine whose speed dips)."""
    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    b = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / (min(times) if best else statistics.median(times)) / 1e9


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"available": False}
    device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    return {"available": True, "version": torch.__version__, "device": device, "open_clip": _version("open_clip_torch")}


def _malloc() -> str:
    """The malloc the CLI's MLX commands run under; on the CPU "auto" gives `finetune` another than the rest."""
    from mlx_clip import host_malloc

    def label(choice: tuple, commands: tuple) -> str:
        library, why = choice
        if library is None:
            return why
        state = "loaded" if host_malloc.loaded(library) else \
            f"not in this process; `mlxclip {' / '.join(commands)}` re-executes under it"
        return f"{library}, {state} ({why})"

    training, other = host_malloc.current(training=True), host_malloc.current(training=False)
    if training == other:
        return label(other, host_malloc.COMMANDS)
    others = tuple(c for c in host_malloc.COMMANDS if c not in host_malloc.TRAINING_COMMANDS)
    return (f"{', '.join(host_malloc.TRAINING_COMMANDS)}: {label(training, host_malloc.TRAINING_COMMANDS)}; "
            f"{', '.join(others)}: {label(other, others)}")


def report(measure: bool = True) -> dict:
    import mlx.core as mx

    from mlx_clip import (cpu_cache, cpu_jit, fastmath, fused_qkv, gpu_activation, gpu_attention, gpu_buffers,
                          gpu_embedding, gpu_reduce, linear, model, qkv_block)
    from mlx_clip.train import loop, optim, step

    info = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": _blas.describe(),
        "onednn_sgemm": onednn_blas.STATUS,  # MLXCLIP_ONEDNN: MLX's sgemm by oneDNN (onednn_blas.py)
        "malloc": _malloc(),  # MLXCLIP_MALLOC: what `mlxclip finetune` / `serve` run MLX's host work under
        "cache_limit_bytes": cpu_cache.current_limit(),  # MLXCLIP_CPU_CACHE on CPU builds
        "cpu_jit": cpu_jit.STATUS,  # MLXCLIP_CPU_JIT: flags for MLX's CPU kernel compiler
        "cpu_jit_kernels": cpu_jit.KERNEL_DIR,  # where MLX's CPU kernels are built and cached while it is on
        "gpu_attention": fastmath.GPU_ATTENTION,  # MLXCLIP_GPU_ATTENTION
        # the fused CUDA kernels' reach and switches (MLXCLIP_GPU_LDMATRIX, MLXCLIP_GPU_DQ_ROWS, MLXCLIP_GPU_DKDV_ROWS,
        # MLXCLIP_GPU_DQ_STEP, MLXCLIP_GPU_DKDV_STEP, MLXCLIP_GPU_FWD_ROWS, MLXCLIP_GPU_FWD_WARPS, MLXCLIP_GPU_DQ_WARPS,
        # MLXCLIP_GPU_DKDV_WARPS)
        "gpu_attention_kernels": {"max_tokens": gpu_attention.MAX_LONG_TOKENS, "ldmatrix": gpu_attention.LDMATRIX,
                                  "dq_rows": gpu_attention.DQ_ROWS, "dkdv_rows": gpu_attention.DKDV_ROWS,
                                  "dq_step": gpu_attention.DQ_STEP, "dkdv_step": gpu_attention.DKDV_STEP,
                                  "fwd_rows": gpu_attention.FWD_ROWS, "fwd_warps": gpu_attention.FWD_WARPS,
                                  "dq_warps": gpu_attention.DQ_WARPS, "dkdv_warps": gpu_attention.DKDV_WARPS},
        "gpu_reduce": gpu_reduce.ENABLED,  # MLXCLIP_GPU_REDUCE: our bias / LayerNorm gradient kernels on CUDA
        "gpu_activation": gpu_activation.ENABLED,  # MLXCLIP_GPU_ACTIVATION: our GELU / quick GELU kernels on CUDA
        # MLXCLIP_GPU_EMBEDDING: the token table's gradient summed in a fixed order on CUDA (runs repeat bit for bit)
        "gpu_embedding": gpu_embedding.ENABLED,
        "qkv_block": qkv_block.ENABLED,  # MLXCLIP_QKV_BLOCK: LayerNorm-1 recomputed in the backward (opt-in)
        # MLXCLIP_ORDERED_WEIGHT_GRADS: off the CPU each dense layer's weight-gradient GEMM where the backward reaches it
        "ordered_weight_grads": linear.ORDERED_WEIGHT_GRADS,
        "gpu_fused_qkv": fused_qkv.ENABLED,  # MLXCLIP_GPU_FUSED_QKV: q, k, v as one product on CUDA (short sequences)
        "patch_embed": model.PATCH_EMBED,  # MLXCLIP_PATCH_EMBED: the patch stem as one product or mx.conv2d
        # MLXCLIP_PACK_TEXT / MLXCLIP_PACK_WINDOWS: CPU training packs captions, attended by key windows
        "pack_text": {"packed": loop.PACK_TEXT, "windows": loop.PACK_WINDOWS},
        "queue_state": loop.QUEUE_STATE,  # MLXCLIP_QUEUE_STATE: a queued train step's updates handed over with it
        "norm_squares": step.NORM_SQUARES,  # MLXCLIP_NORM_SQUARES: how the clip norm sums each gradient's squares
        "gpu_norm_kernel": step.GPU_NORM_KERNEL,  # MLXCLIP_GPU_NORM_KERNEL: "auto" sums them with our kernel on CUDA
        "fold_clip": optim.FOLD_CLIP_GPU,  # MLXCLIP_GPU_FOLD_CLIP: off the CPU, the clip factor in AdamW's moments
        "bf16_moments": optim.BF16_MOMENTS,  # MLXCLIP_BF16_MOMENTS: AdamW's first moment bf16 for bf16 weights
        # MLXCLIP_GPU_INPLACE_UPDATE: off the CPU, large parameters' AdamW as kernels writing over p, m and v (opt-in)
        "gpu_inplace_update": optim.GPU_INPLACE_UPDATE,
        # MLX_MAX_OPS_PER_BUFFER on CUDA (1,000 unless set, gpu_buffers.py); None where MLX's own default applies
        "gpu_ops_per_buffer": gpu_buffers.in_force(),
        "torch": torch_info(),
    }
    if measure:
        info["matmul_fp32_gflops"] = round(matmul_gflops(), 1)
    return info
