"""Where native libraries that Python packages install are found: each environment prefix's lib/ (pip's wheels'
data files, conda's), for MKL (_blas.py), oneDNN (onednn_blas.py) and the mallocs (host_malloc.py). No MLX import:
all three run before MLX is loaded."""

from __future__ import annotations

import glob
import os
import sys


def prefix_lib_dirs() -> list[str]:
    """PREFIX/lib of this interpreter's environment, its base and an active conda environment, each once."""
    prefixes = dict.fromkeys(filter(None, [sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX", "")]))
    return [os.path.join(p, "lib") for p in prefixes]


def in_prefixes(pattern: str) -> list[str]:
    """Files matching `pattern` (e.g. "libmkl_rt.so*") in those folders, in their order, sorted within each."""
    return [path for folder in prefix_lib_dirs() for path in sorted(glob.glob(os.path.join(folder, pattern)))]
