"""The `mlxclip` CLI: init / embed / doctor / list-archs smoke tests on generated data, and the `run()` wrapper that turns
bad input into exit code 1 with one `error:` line. Embeddings are checked against the Python API called directly."""

import json
import os
import pickle
import subprocess
import sys

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_clip import cli
from mlx_clip.config import list_configs
from cli_util import invoke, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=3)


def _run(monkeypatch, capsys, *args):
    """`mlxclip ARGS` through the console-script entry point, in process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mlxclip", *map(str, args)])
    # in process: `finetune` would re-execute this very process (pytest) under mimalloc on the CPU (host_malloc.ensure)
    monkeypatch.setenv("MLXCLIP_MALLOC", "system")
    code = 0
    try:
        cli.run()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --- init, list-archs, doctor, help ---------------------------------------------------------------------------------


def test_init_is_seeded(tiny_dir, tmp_path):
    invoke("init", "--arch", "tiny", "--seed", 3, "--out", tmp_path / "again")
    invoke("init", "--arch", "tiny", "--seed", 4, "--out", tmp_path / "other")
    ref = mx.load(str(tiny_dir / "model.safetensors"))
    again = mx.load(str(tmp_path / "again" / "model.safetensors"))
    other = mx.load(str(tmp_path / "other" / "model.safetensors"))
    assert sorted(ref) == sorted(again) == sorted(other)
    assert all(mx.array_equal(ref[k], again[k]).item() for k in ref)
    random = [k for k in ref if k.endswith("weight") and "norm" not in k and "layrnorm" not in k]
    assert len(random) > 20 and not any(mx.array_equal(ref[k], other[k]).item() for k in random)
    # Initialisation scale is CLIP's: token embedding std 0.02 (checked with numpy).
    assert abs(np.std(np.array(ref["text_model.embeddings.token_embedding.weight"])) - 0.02) < 1e-3


def test_list_archs():
    names = invoke("list-archs").output.split()
    assert {"ViT-B-32", "ViT-L-14-336", "ViT-H-14-quickgelu", "tiny", "small"} <= set(names)
    assert names == list_configs()


def test_doctor_json():
    info = json.loads(invoke("doctor", "--json", "--no-bench").output)
    assert {"mlx", "device", "blas", "cpu_jit", "torch"} <= set(info)
    assert info["mlx"] == mx.__version__
    assert info["torch"]["available"] is True and info["torch"]["version"] == torch.__version__


def test_doctor_reports_the_cache_and_attention_settings():
    env = {**os.environ, "MLXCLIP_CPU_CACHE": "1GB", "MLXCLIP_GPU_ATTENTION": "matmul", "MLXCLIP_GPU_DQ_ROWS": "32",
           "MLXCLIP_GPU_DKDV_ROWS": "32", "MLXCLIP_GPU_LDMATRIX": "0", "MLXCLIP_GPU_REDUCE": "0",
           "MLXCLIP_GPU_ACTIVATION": "off", "MLXCLIP_QKV_BLOCK": "1", "MLXCLIP_PATCH_EMBED": "conv",
           "MLXCLIP_PACK_WINDOWS": "0", "MLXCLIP_QUEUE_STATE": "0", "MLXCLIP_NORM_SQUARES": "reduce",
           "MLXCLIP_GPU_NORM_KERNEL": "0",
           "MLXCLIP_GPU_EMBEDDING": "0", "MLXCLIP_GPU_FOLD_CLIP": "0", "MLXCLIP_GPU_INPLACE_UPDATE": "1",
           "MLXCLIP_BF16_MOMENTS": "0",
           "MLXCLIP_GPU_DQ_STEP": "16", "MLXCLIP_GPU_DKDV_STEP": "32", "MLXCLIP_GPU_DKDV_WARPS": "4",
           "MLXCLIP_GPU_FWD_ROWS": "32", "MLXCLIP_GPU_FWD_WARPS": "4", "MLXCLIP_GPU_DQ_WARPS": "4"}
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "doctor", "--json", "--no-bench"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["gpu_attention"] == "matmul"
    assert info["gpu_attention_kernels"] == {"max_tokens": 320, "ldmatrix": 0, "dq_rows": 32, "dkdv_rows": 32,
                                             "dq_step": 16, "dkdv_step": 32, "fwd_rows": 32, "fwd_warps": 4,
                                             "dq_warps": 4, "dkdv_warps": 4}
    assert info["gpu_reduce"] is False and info["gpu_activation"] is False and info["qkv_block"] is True
    assert info["gpu_embedding"] is False
    assert info["patch_embed"] == "conv" and info["norm_squares"] == "reduce" and info["gpu_norm_kernel"] is False
    assert info["pack_text"] == {"packed": True, "windows": False} and info["queue_state"] is False
    assert info["fold_clip"] is False and info["gpu_inplace_update"] is True and info["bf16_moments"] is False
    if info["device"].startswith("Device(cpu"):  # CPU builds take the cache size from the variable
        assert info["cache_limit_bytes"] == 10**9


def test_unknown_gpu_attention_mode_is_named_and_ignored():
    env = {**os.environ, "MLXCLIP_GPU_ATTENTION": "flash", "MLXCLIP_GPU_DQ_ROWS": "24", "MLXCLIP_GPU_DKDV_ROWS": "8",
           "MLXCLIP_GPU_LDMATRIX": "3"}
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "doctor", "--json", "--no-bench"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "MLXCLIP_GPU_ATTENTION='flash': expected one of sdpa, padded, matmul, fused, aligned" in proc.stderr
    assert "MLXCLIP_GPU_DQ_ROWS='24': expected 16 or 32; using 16" in proc.stderr
    assert "MLXCLIP_GPU_DKDV_ROWS='8': expected 16 or 32; using 16" in proc.stderr
    assert "MLXCLIP_GPU_LDMATRIX='3': expected 0, 1 or 2; using 1" in proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["gpu_attention"] == "fused" and info["gpu_attention_kernels"]["dq_rows"] == 16
    assert info["gpu_reduce"] is True and info["gpu_activation"] is True  # on by default
    assert info["gpu_embedding"] is True
    assert info["qkv_block"] is False  # opt-in
    assert info["patch_embed"] == "matmul" and info["norm_squares"] == "auto"
    assert info["gpu_norm_kernel"] is True  # the default since session 27
    assert info["pack_text"] == {"packed": True, "windows": True} and info["queue_state"] is True
    assert info["fold_clip"] is True and info["gpu_inplace_update"] is False  # the defaults since session 22
    assert info["bf16_moments"] is True  # since session 28
    # MLX's command-buffer size: 1,000 kernels on CUDA unless set (gpu_buffers.py), nothing set elsewhere
    from mlx_clip import gpu_buffers

    assert info["gpu_ops_per_buffer"] == ((os.environ.get("MLX_MAX_OPS_PER_BUFFER") or "1000")
                                          if gpu_buffers.cuda_available() else None)
    kernels = info["gpu_attention_kernels"]
    assert kernels["dkdv_rows"] == 16 and kernels["ldmatrix"] == 1 and kernels["dkdv_warps"] == 8
    assert (kernels["fwd_rows"], kernels["fwd_warps"], kernels["dq_step"], kernels["dq_warps"]) == (16, 8, 32, 8)


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("convert", "export", "init", "embed", "doctor", "list-archs"):
        assert command in proc.stdout


# --- embed ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    sizes = {"a.png": (40, 32), "c.png": (32, 50), "sub/b.png": (64, 64), "sub/d.png": (33, 41)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(root / "gray.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_matches_direct_encoding(tiny_dir, image_folder, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a cat\n\n  a red square  \ncafé 🍰 &amp; more\n", encoding="utf-8")
    out = tmp_path / "out" / "emb.npz"
    invoke("embed", "--model", tiny_dir, "--images", image_folder, "--texts", texts, "--out", out, "--batch-size", 2)
    with np.load(out) as f:
        data = {k: f[k] for k in f.files}
    assert set(data) == {"image_embeddings", "image_paths", "text_embeddings", "texts"}
    paths = list(data["image_paths"])
    expected = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert sorted(paths) == expected and len(paths) == 5  # the subfolder is searched, notes.txt is not an image
    assert list(data["texts"]) == ["a photo of a cat", "a red square", "café 🍰 &amp; more"]
    for key, n in (("image_embeddings", 5), ("text_embeddings", 3)):
        assert data[key].shape == (n, 32) and data[key].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(data[key], axis=1), 1.0, atol=1e-5)

    model, tok, pre = mlx_clip.load(tiny_dir)
    images = [Image.open(p) for p in paths]
    ref_images = np.array(model.encode_image(pre.batch(images), normalize=True))
    ref_texts = np.array(model.encode_text(tok(list(data["texts"])), normalize=True))
    np.testing.assert_allclose(data["image_embeddings"], ref_images, atol=2e-6)
    np.testing.assert_allclose(data["text_embeddings"], ref_texts, atol=2e-6)
    assert not np.allclose(ref_images[0], ref_images[1], atol=1e-3)  # distinct inputs, distinct embeddings


def test_embed_texts_only_and_usage_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    invoke("embed", "--model", tiny_dir, "--texts", texts, "--out", tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as f:
        assert f["image_embeddings"].shape == (0, 32) and f["text_embeddings"].shape == (2, 32)
    code, _, err = _run(monkeypatch, capsys, "embed", "--model", tiny_dir, "--out", tmp_path / "x.npz")
    assert code == 2 and "--images and/or --texts" in err
    code, _, err = _run(monkeypatch, capsys, "convert", "--from", "open_clip", "--checkpoint", texts, "--out", tmp_path / "y")
    assert code == 2 and "--arch is required" in err


# --- errors through run() ---------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_config(tiny_dir, tmp_path):
    d = tmp_path / "badcfg"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text("{oops")
    return ["embed", "--model", d, "--texts", d / "config.json", "--out", tmp_path / "x.npz"], str(d / "config.json")


def _missing_key(tiny_dir, tmp_path):
    import safetensors.torch

    ckpt = tmp_path / "oc.safetensors"
    safetensors.torch.save_file({"logit_scale": torch.tensor(1.0)}, ckpt)
    args = ["convert", "--from", "open_clip", "--arch", "tiny", "--checkpoint", ckpt, "--out", tmp_path / "o"]
    return args, "missing keys: text_model.embeddings.position_embedding.weight"


def _evil_pickle(tiny_dir, tmp_path):
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(pickle.dumps({"x": _Payload(tmp_path / "pwned")}, protocol=2))
    return ["convert", "--from", "open_clip", "--arch", "tiny", "--checkpoint", ckpt, "--out", tmp_path / "o"], "evil.pt"


def _escaping_link(tiny_dir, tmp_path):
    d = tmp_path / "linked"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    (d / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    return ["export", "--model", d, "--to", "hf", "--out", tmp_path / "hf"], "outside the model dir"


def _unknown_arch(tiny_dir, tmp_path):
    return ["init", "--arch", "ViT-Q-99", "--out", tmp_path / "o"], "known: tiny, small, ViT-S-32"


@pytest.mark.parametrize("case", [_bad_config, _missing_key, _evil_pickle, _escaping_link, _unknown_arch],
                         ids=lambda f: f.__name__.strip("_"))
def test_run_reports_bad_input_in_one_line(tiny_dir, tmp_path, monkeypatch, capsys, case):
    args, needle = case(tiny_dir, tmp_path)
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "hf").exists()


def test_subprocess_offline_hub_id_is_one_error_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_CACHE", None)
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "embed", "--model", "no/such-model", "--texts", texts,
                           "--out", tmp_path / "x.npz"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no/such-model" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.npz").exists()
