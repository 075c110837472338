"""Each layout of tests/test_multi_tensor.py::_layouts alone through multi_tensor.sum_of_squares_strided, against
float64 numpy: which layouts the strided kernel reads wrongly (session 17: the test failed on an H200)."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, "tests")
from test_multi_tensor import _layouts  # noqa: E402

from mlx_clip.train import multi_tensor  # noqa: E402

for dtype in (mx.float32, mx.bfloat16):
    for i, a in enumerate(_layouts(dtype)):
        want = float(np.sum(np.array(a.astype(mx.float32), dtype=np.float64) ** 2))
        got = multi_tensor.sum_of_squares_strided([a]).item()
        err = abs(got - want) / max(want, 1e-30)
        if err > 1e-5 or i < 4:
            print(f"{dtype} #{i} shape {a.shape} got {got:.6g} want {want:.6g} rel {err:.2e}", flush=True)
    arrays = _layouts(dtype)
    want = sum(float(np.sum(np.array(a.astype(mx.float32), dtype=np.float64) ** 2)) for a in arrays)
    got = multi_tensor.sum_of_squares_strided(arrays).item()
    print(f"{dtype} all {len(arrays)}: got {got:.6g} want {want:.6g} rel {abs(got - want) / want:.2e}", flush=True)
