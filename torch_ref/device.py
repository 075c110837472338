"""Where the torch reference runs: the best device present (mps > cuda > cpu) unless a name is given."""

from __future__ import annotations

import torch

# Names the `--device` flags accept; "gpu" means whichever accelerator torch has.
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps", "gpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """`name` None/"auto": mps, else cuda, else cpu. An explicit name that is absent here is an error, not a fallback:
    a benchmark that silently ran on the CPU would report the wrong machine."""
    name = (name or "auto").lower()
    if name not in DEVICE_NAMES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    mps = torch.backends.mps.is_available()
    cuda = torch.cuda.is_available()
    if name in ("auto", "gpu"):
        if mps:
            return torch.device("mps")
        if cuda:
            return torch.device("cuda")
        if name == "gpu":
            raise ValueError("device 'gpu': torch sees neither CUDA nor MPS here")
        return torch.device("cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ValueError(f"device {name!r} is not available to torch on this machine")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes held by torch's allocator since the last reset (CUDA); None where torch keeps no such count (CPU,
    MPS), so callers fall back to the process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
