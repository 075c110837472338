"""mlx_clip.gpu_buffers: MLX's CUDA command-buffer size, 1,000 kernels unless MLX_MAX_OPS_PER_BUFFER is set."""

import json
import os
import subprocess
import sys

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
from mlx_clip import gpu_buffers

VARIABLE = "MLX_MAX_OPS_PER_BUFFER"


def imported_env(env: dict) -> dict:
    """MLX_MAX_OPS_PER_BUFFER and the backend as a fresh process sees them after `import mlx_clip`."""
    code = ("import json, os, mlx_clip; from mlx_clip import gpu_buffers; "
            f"print(json.dumps({{'value': os.environ.get({VARIABLE!r}), 'cuda': gpu_buffers.cuda_available()}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_cuda_default_and_nothing_elsewhere():
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    seen = imported_env(env)
    assert seen["value"] == ("1000" if seen["cuda"] else None)  # a CPU or Metal process keeps MLX's own sizes


def test_a_size_the_user_set_is_kept():
    assert imported_env({**os.environ, VARIABLE: "250"})["value"] == "250"


def test_the_rule():
    assert gpu_buffers.wanted({}, cuda=True) == "1000"
    assert gpu_buffers.wanted({VARIABLE: " "}, cuda=True) == "1000"  # blank: MLX would atoi it to 0, a commit a kernel
    assert gpu_buffers.wanted({VARIABLE: "100"}, cuda=True) is None  # MLX's own default, asked for by name
    assert gpu_buffers.wanted({}, cuda=False) is None


def test_configure_writes_the_given_environment_only_on_cuda():
    env = {}
    assert gpu_buffers.configure(env, cuda=True) == "1000" and env == {VARIABLE: "1000"}
    env = {VARIABLE: "400"}
    assert gpu_buffers.configure(env, cuda=True) == "400" and env == {VARIABLE: "400"}
    env = {}
    assert gpu_buffers.configure(env, cuda=False) is None and env == {}
