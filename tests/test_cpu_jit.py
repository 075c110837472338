"""mlx_clip/cpu_jit.py: the g++ wrapper adds its flags to MLX's kernel builds only, enabling it is safe to repeat in
child processes, and kernels built with the flags compute bit for bit what MLX's own build computes."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlx_clip import cpu_jit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                                reason="the wrapper is for Linux with g++")


def _fake_compiler(tmp_path):
    """A 'compiler' that writes the arguments it got, one per line."""
    log = tmp_path / "args.txt"
    fake = tmp_path / "fake-g++"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{log}"\n')
    fake.chmod(0o755)
    return fake, log


def _run_wrapper(wrapper, args, log):
    subprocess.run(["sh", str(wrapper), *args], check=True)
    return log.read_text().splitlines()


def test_wrapper_adds_flags_to_mlx_kernel_builds_only(tmp_path):
    fake, log = _fake_compiler(tmp_path)
    kernels = tmp_path / "jit" / "mlx"
    wrapper = tmp_path / "g++"
    wrapper.write_text(cpu_jit.wrapper_script(str(fake), str(kernels), ("-fno-math-errno", "-mavx2")))
    build = ["-std=c++17", "-O3", "-fPIC", "-shared", f"{kernels}/0.32.4/cpu/k name.cpp", "-o", f"{kernels}/k.so"]
    assert _run_wrapper(wrapper, build, log) == build + ["-fno-math-errno", "-mavx2"]
    other = ["-O3", "-march=native", "-c", str(tmp_path / "torchinductor" / "x.cpp"), "-o", "x.o"]
    assert _run_wrapper(wrapper, other, log) == other  # anything else: exactly as called


def test_a_compiler_that_rejects_the_flags_builds_as_mlx_asked(tmp_path):
    log = tmp_path / "args.txt"
    picky = tmp_path / "picky-g++"  # fails on any argument it does not know, as clang does on --param
    picky.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "--param=x" ] && exit 1; done\nprintf "%s\\n" "$@" > "{log}"\n')
    picky.chmod(0o755)
    kernels = tmp_path / "mlx"
    wrapper = tmp_path / "g++"
    wrapper.write_text(cpu_jit.wrapper_script(str(picky), str(kernels), ("--param=x",)))
    build = ["-O3", f"{kernels}/k.cpp", "-o", f"{kernels}/k.so"]
    assert _run_wrapper(wrapper, build, log) == build


def _python(code, env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _env(tmp_path, name, **extra):
    tmp = tmp_path / name
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp), **extra}


_STATE = """
import json, os, shutil
import mlx_clip
from mlx_clip import cpu_jit
print(json.dumps({"status": cpu_jit.STATUS, "path": os.environ["PATH"].split(os.pathsep),
                  "tmpdir": os.environ["TMPDIR"], "gxx": shutil.which("g++")}))
"""


def test_enabling_in_a_child_process_keeps_one_wrapper_and_one_directory(tmp_path):
    env = _env(tmp_path, "t")
    parent = json.loads(_python(_STATE, env))
    assert parent["status"].startswith("on: -fno-math-errno")
    root = parent["tmpdir"]
    assert os.path.dirname(root) == env["TMPDIR"] and parent["gxx"] == os.path.join(root, "bin", "g++")
    child = json.loads(_python(_STATE, {**env, "PATH": os.pathsep.join(parent["path"]), "TMPDIR": root}))
    assert child["tmpdir"] == root  # not nested one level further
    assert sum("mlxclip-jit-" in p for p in child["path"]) == 1
    script = open(child["gxx"]).read()  # the wrapper calls the real compiler, never itself
    assert "mlxclip-jit-" not in script.split('exec "')[-1].split('"')[0]


def test_switched_off_leaves_path_and_tmpdir_alone(tmp_path):
    env = _env(tmp_path, "off", MLXCLIP_CPU_JIT="0")
    state = json.loads(_python(_STATE, env))
    assert state["status"] == "off (MLXCLIP_CPU_JIT=0)"
    assert state["tmpdir"] == env["TMPDIR"] and state["path"] == env["PATH"].split(os.pathsep)


# Compiled functions whose fused kernels the flags change (sqrt, where over float work, many inputs): GELU and its
# gradient, softmax, LayerNorm and the guarded AdamW update of the training step, on one fixed input.
_KERNELS = """
import glob, os
import numpy as np
import mlx_clip
import mlx.core as mx
import mlx.nn as nn
from mlx_clip import fastmath
from mlx_clip.train.optim import GroupedAdamW
mx.random.seed(0)
x = mx.random.normal((64, 300)) * 3
w = mx.random.normal((300,))
gelu = mx.compile(lambda a: fastmath.gelu(a))
grad = mx.compile(mx.grad(lambda a: (fastmath.gelu(a) * w).sum()))
soft = mx.compile(lambda a: mx.softmax(a * 0.7, axis=-1))
norm = mx.compile(lambda a: mx.fast.layer_norm(a, w, w * 0.1, 1e-5) + mx.sqrt(mx.abs(a)))
model = nn.Linear(300, 200)
model.update({"weight": mx.random.normal((200, 300)), "bias": mx.random.normal((200,))})
opt = GroupedAdamW(1e-3, {"weight": (1.0, 0.1), "bias": (0.5, 0.0)})
opt.init(model.trainable_parameters())
grads = {"weight": mx.random.normal((200, 300)), "bias": mx.random.normal((200,))}
state = [model.state, opt.state]
upd = mx.compile(lambda g, f: opt.guarded_update(model, g, mx.array(0.5), f) or model.parameters(),
                 inputs=state, outputs=state)
bad = {"weight": grads["weight"].at[0, 0].add(float("nan")), "bias": grads["bias"].at[3].add(float("inf"))}
for finite in (True, False, True):  # the skipped step's gradients hold a nan and an inf
    upd(grads if finite else bad, mx.array(finite))
    mx.eval(model.parameters(), opt.state)
out = [gelu(x), grad(x), soft(x), norm(x), model.weight, model.bias, opt.state["weight"]["m"],
       opt.state["weight"]["v"]]
np.savez(os.environ["OUT"], *[np.array(o) for o in out])
print(len(glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "*", "cpu", "*.so"))))
"""


def test_kernels_built_with_the_flags_compute_the_same_bits(tmp_path):
    """Fresh kernel directories, so both processes build every kernel: MLX's flags, then ours."""
    stock_out, ours_out = tmp_path / "stock.npz", tmp_path / "ours.npz"
    stock_env = _env(tmp_path, "stock", MLXCLIP_CPU_JIT="0", OUT=str(stock_out))
    ours_env = _env(tmp_path, "ours", OUT=str(ours_out))
    assert int(_python(_KERNELS, stock_env)) > 0
    assert int(_python(_KERNELS, ours_env)) > 0  # built into our directory (TMPDIR is ours in that process)
    ours_root = [p for p in os.listdir(ours_env["TMPDIR"]) if p.startswith("mlxclip-jit-")]
    assert len(ours_root) == 1
    stock_libs = _libraries(stock_env["TMPDIR"])
    ours_libs = _libraries(os.path.join(ours_env["TMPDIR"], ours_root[0]))
    same_kernels = stock_libs.keys() & ours_libs.keys()
    assert same_kernels and any(stock_libs[k] != ours_libs[k] for k in same_kernels)  # the flags reached g++
    stock, ours = np.load(stock_out), np.load(ours_out)
    for key in stock.files:
        assert np.isfinite(stock[key]).all(), key  # the skipped step let nothing non-finite in
        np.testing.assert_array_equal(stock[key], ours[key], err_msg=key)


def _libraries(tmpdir):
    """MLX's built kernels under TMPDIR: file name -> bytes."""
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(tmpdir, "mlx", "*", "cpu", "*.so"))}
