"""MLXCLIP_MALLOC: which malloc MLX's host work runs under, and the CLI's re-execution under it (host_malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench import _env
from mlx_clip import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def libdir(tmp_path):
    """A library folder holding both allocators (empty files: choose() only looks for them)."""
    for name in ("libjemalloc.so.2", "libmimalloc.so.2"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_auto_prefers_mimalloc_on_a_linux_gpu(libdir):
    library, why = host_malloc.choose(None, on_gpu=True, platform="linux", dirs=[str(libdir)])
    assert library == str(libdir / "libmimalloc.so.2") and "mimalloc" in why
    os.remove(libdir / "libmimalloc.so.2")
    library, _ = host_malloc.choose("auto", on_gpu=True, platform="linux", dirs=[str(libdir)])
    assert library == str(libdir / "libjemalloc.so.2")


def test_auto_prefers_mimalloc_for_cpu_training_and_keeps_glibc_for_cpu_latency_work(libdir):
    library, why = host_malloc.choose(None, on_gpu=False, platform="linux", dirs=[str(libdir)], training=True)
    assert library == str(libdir / "libmimalloc.so.2") and "CPU training" in why
    library, why = host_malloc.choose(None, on_gpu=False, platform="linux", dirs=[str(libdir)], training=False)
    assert library is None and "glibc" in why
    assert host_malloc.choose(None, on_gpu=False, platform="darwin", dirs=[str(libdir)], training=True)[0] is None
    assert host_malloc.choose("system", on_gpu=False, platform="linux", dirs=[str(libdir)], training=True)[0] is None


def test_only_the_training_commands_choose_as_training(monkeypatch):
    """ensure() asks for the training choice for `finetune` only: serve / embed / eval are latency work on a CPU."""
    asked = []
    monkeypatch.delenv("MLXCLIP_MALLOC_REEXEC", raising=False)
    monkeypatch.setattr(host_malloc, "current", lambda training=False: asked.append(training) or (None, "none"))
    for argv in (["finetune", "--demo"], ["serve"], ["embed", "x"], ["eval"], []):
        host_malloc.ensure(argv)
    assert asked == [True, False, False, False, False]


def test_auto_keeps_the_system_malloc_on_cpu_macos_or_when_none_is_installed(libdir, tmp_path_factory):
    assert host_malloc.choose(None, on_gpu=False, platform="linux", dirs=[str(libdir)])[0] is None
    assert host_malloc.choose(None, on_gpu=True, platform="darwin", dirs=[str(libdir)])[0] is None
    empty = tmp_path_factory.mktemp("empty")
    library, why = host_malloc.choose(None, on_gpu=True, platform="linux", dirs=[str(empty)])
    assert library is None and "libmimalloc2.0" in why  # says what to install


def test_system_and_explicit_path(libdir):
    assert host_malloc.choose("system", on_gpu=True, platform="linux", dirs=[str(libdir)])[0] is None
    path = str(libdir / "libjemalloc.so.2")
    assert host_malloc.choose(path, on_gpu=False, platform="linux")[0] == path  # a path applies on any device


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"MLXCLIP_MALLOC=.*nope\.so.*does not exist"):
        host_malloc.choose(str(tmp_path / "nope.so"), on_gpu=True)


def test_preload_lists_are_edited_without_losing_other_libraries():
    env = {"LD_PRELOAD": "/a.so:/lib/x.so", "HOME": "/h"}
    assert host_malloc.with_preload(env, "/lib/x.so")["LD_PRELOAD"] == "/lib/x.so /a.so"
    assert host_malloc.without_preload(env, "/lib/x.so") == {"LD_PRELOAD": "/a.so", "HOME": "/h"}
    assert host_malloc.without_preload({"LD_PRELOAD": "/lib/x.so"}, "/lib/x.so") == {}
    assert host_malloc.without_preload(env, None) == env


def test_loaded_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libmimalloc.so.2\n")
    assert host_malloc.loaded("/opt/libmimalloc.so.2", str(maps))  # the same library found under another folder
    assert not host_malloc.loaded("libjemalloc.so.2", str(maps))


def test_bench_gives_the_malloc_to_mlx_and_keeps_it_from_torch(libdir, monkeypatch):
    path = str(libdir / "libmimalloc.so.2")
    monkeypatch.setenv("MLXCLIP_MALLOC", path)
    monkeypatch.setenv("LD_PRELOAD", path)  # as if the bench itself had been started under it
    assert _env("mlx", "cuda", "bfloat16", "train")["LD_PRELOAD"].split()[0] == path
    assert path not in _env("torch", "cuda", "bfloat16", "train").get("LD_PRELOAD", "")
    monkeypatch.delenv("MLXCLIP_MALLOC")
    monkeypatch.delenv("LD_PRELOAD")
    assert "LD_PRELOAD" not in _env("mlx", "cpu", "float32", "embed-image")  # auto on the CPU, latency work: glibc's
    # auto for CPU training: the malloc `mlxclip finetune` would run under (none where none is installed)
    library, _ = host_malloc.choose(None, on_gpu=False, training=True)
    trained = _env("mlx", "cpu", "float32", "train").get("LD_PRELOAD", "")
    assert (trained.split()[0] == library) if library else not trained
    assert library is None or library not in _env("torch", "cpu", "float32", "train").get("LD_PRELOAD", "")


def _any_library() -> str:
    # the re-execution does not depend on what the library is; a real allocator when installed, else zlib
    for name in ("mimalloc", "jemalloc", "z"):
        path = host_malloc.find(name, host_malloc._search_dirs())
        if path:
            return path
    pytest.skip("no shared library to preload found")


def test_cli_reexecutes_under_the_chosen_library_once():
    library = _any_library()
    env = dict(os.environ, MLXCLIP_MALLOC=library, PYTHONPATH=ROOT)
    env.pop("LD_PRELOAD", None)
    code = ("import sys; from mlx_clip import host_malloc; print('first', host_malloc.loaded(sys.argv[1]), flush=True);"
            "host_malloc.ensure(['doctor', '--json', '--no-bench']); print('not re-executed')")
    out = subprocess.run([sys.executable, "-c", code, library], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "first False" and "not re-executed" not in out.stdout
    info = json.loads(lines[-1])  # the re-executed process ran `mlxclip doctor --json`, with the library mapped
    assert info["malloc"].startswith(f"{library}, loaded"), info["malloc"]


def test_cli_passes_a_bad_setting_as_one_error_line(tmp_path):
    env = dict(os.environ, MLXCLIP_MALLOC=str(tmp_path / "missing.so"), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "mlx_clip", "eval", "--help"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "error: MLXCLIP_MALLOC=" in out.stderr and "missing.so" in out.stderr


def test_in_use_names_the_allocator_mapped(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert host_malloc.in_use(str(maps)) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert host_malloc.in_use(str(maps)) == "system"


def test_doctor_names_finetunes_malloc_apart_when_it_differs(monkeypatch):
    """On the CPU "auto" gives `finetune` mimalloc and the latency commands glibc's: doctor says which is which."""
    from mlx_clip import doctor

    choice = {True: ("/x/libmimalloc.so.2", "mimalloc: training"), False: (None, "glibc's malloc (latency)")}
    monkeypatch.setattr(host_malloc, "current", lambda training=False: choice[training])
    text = doctor._malloc()
    assert text.startswith("finetune: /x/libmimalloc.so.2, not in this process; `mlxclip finetune` re-executes")
    assert text.endswith("serve, embed, eval, memory: glibc's malloc (latency)")
    choice[True] = choice[False]
    assert doctor._malloc() == "glibc's malloc (latency)"
