"""MLX's sgemm by oneDNN (mlx_clip/onednn_blas.py, onednn_sgemm.c; on by default with AVX-512), against float64 numpy
and open_clip. Each check runs in a fresh process, as the shim must be loaded before MLX is."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_clip import onednn_blas

needs_onednn = pytest.mark.skipif(
    not sys.platform.startswith("linux") or onednn_blas.find_dnnl() is None
    or not (shutil.which("cc") or shutil.which("gcc")),
    reason="needs Linux, a C compiler and oneDNN (pip install onednn-cpu-gomp)")

PROBE = r"""
import json, numpy as np
import mlx_clip
from mlx_clip import _blas, onednn_blas
import mlx.core as mx

rng = np.random.default_rng(0)
def arr(*shape):
    return rng.standard_normal(shape).astype(np.float32)
def err(got, want):
    return float(np.abs(np.array(got, dtype=np.float64) - want).max() / np.abs(want).max())
f64 = lambda x: np.array(x, dtype=np.float64)
worst, cases = 0.0, 0
for m, k, n in [(50, 768, 2304), (1, 512, 512), (7, 33, 65), (800, 96, 300)]:
    for ta in (False, True):
        for tb in (False, True):
            a = mx.array(arr(k, m)).T if ta else mx.array(arr(m, k))
            b = mx.array(arr(n, k)).T if tb else mx.array(arr(k, n))
            c = mx.array(arr(m, n))
            worst = max(worst, err(a @ b, f64(a) @ f64(b)), err(mx.addmm(c, a, b), f64(c) + f64(a) @ f64(b)))
            cases += 2
x = mx.array(arr(3, 40, 70))
w = arr(70, 30)
worst = max(worst, err(x @ mx.array(w), f64(x) @ w.astype(np.float64)))  # batched
s = mx.array(arr(40, 100))[:, 5:75]  # rows longer than the product's K
worst = max(worst, err(s @ mx.array(w), f64(s) @ w.astype(np.float64)))
taken = onednn_blas.counts()[0]
c, a, b = mx.array(arr(20, 30)), mx.array(arr(20, 40)), mx.array(arr(40, 30))
scaled = err(mx.addmm(c, a, b, alpha=0.5, beta=2.0), 2.0 * f64(c) + 0.5 * f64(a) @ f64(b))  # MKL's: alpha 0.5
# two CPU streams calling at once, as MLX's batch-parallel mode does (their own scratchpads and thread counts)
streams = [mx.new_stream(mx.cpu) for _ in range(2)]
pairs = [(mx.array(arr(64, 256)), mx.array(arr(256, 128))) for _ in range(16)]
outs = []
for i, (p, q) in enumerate(pairs):
    with mx.stream(streams[i % 2]):
        outs.append(p @ q)
mx.eval(outs)
concurrent = max(err(o, f64(p) @ f64(q)) for o, (p, q) in zip(outs, pairs))
print(json.dumps({"status": onednn_blas.STATUS, "describe": _blas.describe(), "worst": worst, "cases": cases,
                  "taken": taken, "counts": onednn_blas.counts(), "scaled": scaled, "concurrent": concurrent}))
"""


def _probe(on: bool, min_mnk: int = 0) -> dict:
    """The probe in a fresh process; min_mnk 0 sends every product to oneDNN, so every layout is checked there."""
    env = {**os.environ, "MLXCLIP_ONEDNN": "1" if on else "0", "MLXCLIP_ONEDNN_MIN_MNK": str(min_mnk)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_onednn
def test_onednn_sgemm_matches_float64_every_layout_and_hands_the_rest_to_mkl():
    got = _probe(on=True)
    assert got["status"].startswith("on (oneDNN"), got["status"]
    assert "sgemm by oneDNN" in got["describe"]
    assert got["taken"] >= got["cases"]  # oneDNN ran the products (counted by the shim), not MKL
    assert got["worst"] < 1e-5 and got["concurrent"] < 1e-5
    assert got["scaled"] < 1e-5
    assert got["counts"][1] >= 1  # the alpha = 0.5 product went to MKL
    off = _probe(on=False)
    assert off["status"].startswith("off") and off["counts"] == [0, 0] and off["worst"] < 1e-5
    # by default products under onednn_blas.MIN_MNK (1 x 512 x 512, 7 x 33 x 65, 20 x 40 x 30, ...) stay with MKL
    default = _probe(on=True, min_mnk=onednn_blas.MIN_MNK)
    assert 0 < default["taken"] < got["taken"] and default["counts"][1] > got["counts"][1] and default["worst"] < 1e-5


@needs_onednn
def test_model_with_onednn_sgemm_matches_open_clip():
    """The issue's fp32 parity, with every MLX GEMM run by oneDNN."""
    env = {**os.environ, "MLXCLIP_ONEDNN": "1"}
    tests = ["tests/test_parity.py::test_open_clip_parity_small",
             "tests/test_parity.py::test_loss_gradients_match_open_clip"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_min_mnk_reads_its_setting_and_names_a_bad_one(monkeypatch):
    monkeypatch.delenv("MLXCLIP_ONEDNN_MIN_MNK", raising=False)
    assert onednn_blas.min_mnk() == onednn_blas.MIN_MNK
    monkeypatch.setenv("MLXCLIP_ONEDNN_MIN_MNK", "0")
    assert onednn_blas.min_mnk() == 0
    monkeypatch.setenv("MLXCLIP_ONEDNN_MIN_MNK", "big")
    with pytest.warns(UserWarning, match="MLXCLIP_ONEDNN_MIN_MNK='big': expected a number"):
        assert onednn_blas.min_mnk() == onednn_blas.MIN_MNK


def test_on_by_default_only_where_measured(monkeypatch):
    """Unset, MLXCLIP_ONEDNN follows the CPU: on with AVX-512 (where oneDNN's gains were measured), off without; the
    setting overrides either way."""
    monkeypatch.delenv("MLXCLIP_ONEDNN", raising=False)
    for avx512, want in ((True, True), (False, False)):
        monkeypatch.setattr(onednn_blas, "cpu_has", lambda feature, a=avx512: a and feature == "avx512f")
        assert onednn_blas.enabled() is want
        for value, forced in (("1", True), ("0", False)):
            monkeypatch.setenv("MLXCLIP_ONEDNN", value)
            assert onednn_blas.enabled() is forced
        monkeypatch.delenv("MLXCLIP_ONEDNN")
