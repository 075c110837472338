"""What a result was measured on: CPU model and cores, accelerator name, library versions, the BLAS MLX uses."""

from __future__ import annotations

import os
import platform
from datetime import date

from benchmarks.blas import cpu_name


def gpu_name(device: str) -> str | None:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if device == "mps":
        return "Apple GPU (MPS)"
    return None


def _malloc_label(device: str) -> str:
    """The malloc MLX's rows run under; on the CPU "auto" gives train rows another than the rest (host_malloc.py)."""
    from mlx_clip import host_malloc

    labels = []
    for training in (True, False):
        library, why = host_malloc.choose(os.environ.get("MLXCLIP_MALLOC"), on_gpu=device != "cpu", training=training)
        labels.append(f"{os.path.basename(library)} ({why})" if library else why)
    return labels[0] if labels[0] == labels[1] else f"train rows {labels[0]}; other rows {labels[1]}"


def settings() -> dict[str, str]:
    """The MLX and mlx-clip switches set in the environment (MLX_*, MLXCLIP_*), sorted: a result names the non-default
    paths it measured (the command-buffer sizes, the opt-in kernels), so two runs' rows say whether they compare."""
    return {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("MLX_", "MLXCLIP_"))}


def machine_info(device: str) -> dict:
    """A dict for the JSON reports; `label` is the one line the markdown tables are headed with."""
    import mlx.core as mx

    from mlx_clip import _blas, cpu_jit

    info = {
        "date": str(date.today()),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device,
        "gpu": gpu_name(device),
        "mlx": mx.__version__,
        "mlx_blas": _blas.describe(),
        "mlx_cpu_jit": cpu_jit.STATUS,  # MLX's CPU kernel compiler flags (cpu_jit.py)
        "mlx_malloc": _malloc_label(device),  # MLXCLIP_MALLOC (host_malloc.py)
        "settings": settings(),
    }
    try:
        import open_clip
        import torch

        info.update(torch=torch.__version__, open_clip=open_clip.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    where = info["gpu"] or f"{info['cpu']}, {info['cores']} cores"
    info["label"] = f"{where} ({device}); MLX {info['mlx']}, torch {info.get('torch', '-')}, {info['date']}"
    return info


def shared_cpu_label() -> str:
    """The CPU line for reports measured on this (possibly shared) machine, with its load when the run started."""
    return f"{machine_info('cpu')['label']}; load average at start {os.getloadavg()[0]:.1f} (a shared machine)"
