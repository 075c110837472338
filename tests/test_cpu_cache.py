"""mlx_clip.cpu_cache: MLX's CPU buffer cache, sized at import by MLXCLIP_CPU_CACHE."""

import json
import os
import subprocess
import sys

import pytest

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlx_clip import cpu_cache
from mlx_clip.train.args import TrainingArgs

pytestmark = pytest.mark.skipif(not cpu_cache._cpu_only_build(), reason="GPU builds keep MLX's own cache policy")

PROBE = """
import json, resource, sys
{before}
import mlx_clip
import mlx.core as mx
limit = mx.set_cache_limit(0); mx.set_cache_limit(limit)
x = mx.ones((16 << 20,)); mx.eval(x)  # 64 MB, allocated and freed each round as a training step's buffers are
def churn():
    y = x * 2.0
    mx.eval(y)
    del y
churn(); churn()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(json.dumps({{"limit": limit, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start}}))
"""


def probe(env=None, before=""):
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_raised_limit_stops_page_faults_and_the_default_is_mlx_s():
    raised = probe({"MLXCLIP_CPU_CACHE": "1GB"})
    kept = probe({"MLXCLIP_CPU_CACHE": ""})
    assert raised["limit"] == 10**9
    assert kept["limit"] == cpu_cache.MLX_CPU_DEFAULT == probe({"MLXCLIP_CPU_CACHE": "0"})["limit"]
    # 5 rounds of a 64 MB buffer: at MLX's default limit each is a fresh mapping (16k faults a round); cached, none.
    assert kept["faults"] > 5 * 8000 and raised["faults"] < 1000


def test_explicit_sizes_and_a_program_s_own_limit():
    assert probe({"MLXCLIP_CPU_CACHE": "800MB"})["limit"] == 800 * 10**6
    own = probe({"MLXCLIP_CPU_CACHE": "1GB"}, before="import mlx.core as mx; mx.set_cache_limit(12345)")
    assert own["limit"] == 12345  # set before mlx_clip was imported: left alone


def test_bad_size_names_the_variable(monkeypatch):
    monkeypatch.setenv("MLXCLIP_CPU_CACHE", "lots")
    with pytest.raises(ValueError, match="MLXCLIP_CPU_CACHE: memory size 'lots'"):
        cpu_cache.wanted_limit()
    previous = mx.set_cache_limit(cpu_cache.MLX_CPU_DEFAULT)  # as if nothing had set it yet
    try:
        with pytest.warns(UserWarning, match="MLXCLIP_CPU_CACHE"):
            assert cpu_cache.configure() == cpu_cache.MLX_CPU_DEFAULT
    finally:
        mx.set_cache_limit(previous)


def test_a_training_run_raises_the_limit_and_puts_it_back(monkeypatch):
    monkeypatch.delenv("MLXCLIP_CPU_CACHE", raising=False)
    previous = mx.set_cache_limit(cpu_cache.MLX_CPU_DEFAULT)  # as MLX starts
    try:
        with cpu_cache.for_training():
            assert cpu_cache.current_limit() == cpu_cache.TRAINING_LIMIT
        assert cpu_cache.current_limit() == cpu_cache.MLX_CPU_DEFAULT
        # the user's MLXCLIP_CPU_CACHE, or a limit the program chose, is left as it is
        monkeypatch.setenv("MLXCLIP_CPU_CACHE", "0")
        assert cpu_cache.training_limit() is None
        monkeypatch.delenv("MLXCLIP_CPU_CACHE")
        mx.set_cache_limit(12345)
        with cpu_cache.for_training():
            assert cpu_cache.current_limit() == 12345
    finally:
        mx.set_cache_limit(previous)


def test_finetune_trains_with_the_training_limit(monkeypatch):
    from mlx_clip.train import finetune as finetune_module

    seen = {}

    def spy(args, quiet):
        seen["limit"] = cpu_cache.current_limit()
        return {}

    monkeypatch.delenv("MLXCLIP_CPU_CACHE", raising=False)
    monkeypatch.setattr(finetune_module, "_finetune", spy)
    previous = mx.set_cache_limit(cpu_cache.MLX_CPU_DEFAULT)
    try:
        finetune_module.finetune(TrainingArgs())  # the defaults: the wrapper reads the args (--memory-limit)
        assert seen["limit"] == cpu_cache.TRAINING_LIMIT
        assert cpu_cache.current_limit() == cpu_cache.MLX_CPU_DEFAULT
    finally:
        mx.set_cache_limit(previous)
