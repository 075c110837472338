"""The fine-tuning engine on the `tiny` config and a synthetic industrial dataset: the CLI and YAML, outputs and the
report, LiT and LoRA, corrupt images, label-aware losses and the CPU's batch-parallel and packed-caption modes (resume,
checkpoints and non-finite steps: test_finetune_recovery.py). References are independent: torch, open_clip_train,
numpy, module types."""

import math
import re
import shutil
import sys
from pathlib import Path

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from PIL import Image

import mlx_clip.train.finetune as ft
import mlx_clip.train.loop as loop
from mlx_clip import cli
from mlx_clip.data.images import TooManyBadImagesError
from mlx_clip.data.pipeline import Loader, LoaderConfig
from mlx_clip.data.sources import open_source
from mlx_clip.io import load
from mlx_clip.train.args import resolve_args
from mlx_clip.train.lora import load_with_adapters
# helpers shared with the other fine-tuning tests (their fixtures data_dir, tiny_dir, run_a: tests/conftest.py);
# tests/ is on sys.path under pytest
from finetune_util import run_args, metric_records, step_losses, saved_weights, assert_same, patch_train  # noqa: E402


def _val_pixels_and_labels(data_dir, preprocess):
    rows = open_source(data_dir / "val.csv").records
    pixels = np.stack([preprocess.to_numpy(Image.open(r["image"])) for r in rows]).astype(np.float32)
    return pixels, np.array([r["label"] for r in rows]), [r["caption"] for r in rows]




def _run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mlxclip", *map(str, args)])
    # in process: `finetune` would re-execute this very process (pytest) under mimalloc on the CPU (host_malloc.ensure)
    monkeypatch.setenv("MLXCLIP_MALLOC", "system")
    code = 0
    try:
        cli.run()
    except SystemExit as exc:
        code = exc.code
    return code, *capsys.readouterr()


def test_yaml_config_and_flags_flags_win(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tiny_dir}\ntrain-data: {data_dir / 'train.csv'}\nout: {out}\nsteps: 2\n"
                      "batch_size: 8\nlr: 1e-3\nweight_decay: 5e-2\nlog-every: 1\nhflip: true\nlock_image: true\n")
    result = CliRunner().invoke(cli.main, ["finetune", "--config", str(config), "--lr", "0.002", "--steps", "3",
                                           "--no-hflip"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == 0.002 and resolved["steps"] == 3 and resolved["hflip"] is False  # flags
    assert resolved["batch_size"] == 8 and resolved["weight_decay"] == 0.05 and resolved["lock_image"] is True  # YAML
    assert resolved["seed"] == 0 and resolved["eps"] == 1e-6  # defaults
    assert sorted(step_losses(out)) == [1, 2, 3]
    assert resolve_args({}, config).lr == 1e-3  # `1e-3` is a string to PyYAML; it must still be a float


@pytest.mark.parametrize("line,message", [("learning_rate: 0.1", "unknown option.*learning_rate"),
                                          ("steps: many", "option steps expects int")])
def test_bad_yaml_is_a_clear_error(line, message, tmp_path, monkeypatch, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"out: {tmp_path / 'run'}\n{line}\n")
    code, _, err = _run_cli(monkeypatch, capsys, "finetune", "--config", config)
    assert code == 1 and err.startswith("error:")
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_finetune_help_documents_the_fixed_flags():
    result = CliRunner().invoke(cli.main, ["finetune", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    for flag in ("--steps", "--epochs", "--batch-size", "--lr", "--seed", "--save-every", "--eval-every", "--resume",
                 "--lock-image", "--lock-text", "--lora-rank", "--loss", "--config"):
        assert f"{flag} " in result.output or f"{flag}/" in result.output, flag
    assert "overrides --epochs" in result.output and "'latest'" in result.output


# ---- outputs ---------------------------------------------------------------------------------------------------------

def test_final_model_dir_loads_and_matches_the_in_memory_model(run_a, data_dir):
    loaded, tokenizer, preprocess = load(run_a.dir / "final")
    pixels, _, captions = _val_pixels_and_labels(data_dir, preprocess)
    for encode, x in (("encode_image", mx.array(pixels)), ("encode_text", tokenizer(captions))):
        ours, theirs = getattr(loaded, encode)(x), getattr(run_a.model, encode)(x)
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-6, rtol=0)
    final = saved_weights(run_a.dir / "final" / "model.safetensors")
    last = saved_weights(run_a.dir / "checkpoints" / "step-00000010" / "trainable.safetensors")
    assert_same({k: final[k] for k in last}, last)
    base = saved_weights(Path(run_a.args.model) / "model.safetensors")
    assert not np.array_equal(final["text_projection.weight"], base["text_projection.weight"])


def test_metrics_lines_and_report(run_a, data_dir):
    records = metric_records(run_a.dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in train)
    for r in train:  # the LR logged is the one step `step` used: cosine from lr at step 1
        assert r["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 10)), rel=1e-6)
    evals = [r for r in records if "top1" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 1.0 for r in evals)
    # The final zero-shot top-1/top-5, recomputed with numpy from the saved model.
    model, tokenizer, preprocess = load(run_a.dir / "final")
    pixels, labels, _ = _val_pixels_and_labels(data_dir, preprocess)
    classes = (data_dir / "classes.txt").read_text().split("\n")[:-1]
    templates = (data_dir / "templates.txt").read_text().split("\n")[:-1]
    image = np.array(model.encode_image(mx.array(pixels)), dtype=np.float64)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = np.array(model.encode_text(tokenizer([t.format(c) for c in classes for t in templates])), dtype=np.float64)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).reshape(len(classes), len(templates), -1).mean(1)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    scores = image @ text.T
    rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)
    assert evals[-1]["top1"] == pytest.approx(np.mean(rank == 0))
    assert evals[-1]["top5"] == pytest.approx(np.mean(rank < 5))
    assert run_a.summary["top1_after"] == evals[-1]["top1"] and run_a.summary["top1_before"] == evals[0]["top1"]
    summary_md = (run_a.dir / "summary.md").read_text()
    assert "top1_after" in summary_md and "## Evaluation" in summary_md
    from mlx_clip import _blas  # the run names the BLAS its CPU products ran on (MKL, oneDNN's sgemm)

    assert run_a.summary["blas"] == _blas.describe() and f"| blas | {_blas.describe()} |" in summary_md
    from mlx_clip import gpu_buffers  # and MLX's CUDA command-buffer size where it ran on CUDA (None elsewhere)

    ops = run_a.summary["gpu_ops_per_buffer"]
    assert ops == gpu_buffers.in_force() and (ops is None) == (not gpu_buffers.cuda_available())
    with Image.open(run_a.dir / "curves.png") as png:
        assert png.format == "PNG" and png.width > 100


def test_lit_leaves_the_image_tower_bit_identical(tiny_dir, data_dir, tmp_path):
    ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "lit", steps=3, lock_image=True), quiet=True)
    base = saved_weights(Path(tiny_dir) / "model.safetensors")
    final = saved_weights(tmp_path / "lit" / "final" / "model.safetensors")
    vision = [k for k in base if k.startswith(("vision_model.", "visual_projection."))]
    assert len(vision) > 30
    assert_same({k: final[k] for k in vision}, {k: base[k] for k in vision})
    assert not np.array_equal(final["text_projection.weight"], base["text_projection.weight"])


def test_lora_finetune_saves_adapters_and_a_fused_dir(tiny_dir, data_dir, tmp_path):
    args = run_args(tiny_dir, data_dir, tmp_path / "lora", steps=3, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    ft.finetune(args, quiet=True)
    adapters = tmp_path / "lora" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    lora = saved_weights(adapters / "adapters.safetensors")
    assert len(lora) == 2 * 2 * 6 * 2 and all(k.endswith((".lora_a", ".lora_b")) for k in lora)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith("lora_b"))  # the adapters trained
    base = saved_weights(Path(tiny_dir) / "model.safetensors")
    fused = saved_weights(tmp_path / "lora" / "final" / "model.safetensors")
    assert fused.keys() == base.keys()
    targets = {k[: -len(".lora_a")] for k in lora if k.endswith(".lora_a")}
    for key in base:
        layer = key[: -len(".weight")]
        if layer in targets:  # W + (alpha / r) B A, in float64
            want = base[key] + (8.0 / 4) * (lora[layer + ".lora_b"].astype(np.float64) @ lora[layer + ".lora_a"])
            np.testing.assert_allclose(fused[key], want, atol=1e-5, rtol=0, err_msg=key)
        else:
            assert np.array_equal(fused[key], base[key]), key  # the base stays frozen
    with_adapters, tokenizer, preprocess = load_with_adapters(str(tiny_dir), adapters)
    plain, _, _ = load(tmp_path / "lora" / "final")
    pixels, _, captions = _val_pixels_and_labels(data_dir, preprocess)
    for encode, x in (("encode_image", mx.array(pixels)), ("encode_text", tokenizer(captions))):
        np.testing.assert_allclose(np.array(getattr(plain, encode)(x)), np.array(getattr(with_adapters, encode)(x)),
                                   atol=1e-5, rtol=0)


# ---- corrupt images --------------------------------------------------------------------------------------------------

@pytest.fixture
def corrupt_data(data_dir, tmp_path):
    """A copy of the dataset whose first training image (in epoch 0's seed-0 order) is garbage."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    records = open_source(copy / "train.csv").records
    first = records[int(Loader(records, None, LoaderConfig(seed=0))._order()[0])]
    Path(first["image"]).write_bytes(b"this is not a PNG file" * 8)
    return copy, first["key"]


def test_a_corrupt_image_is_skipped_and_counted(tiny_dir, corrupt_data, tmp_path):
    data, bad = corrupt_data
    summary = ft.finetune(run_args(tiny_dir, data, tmp_path / "run", batch_size=8, max_bad_fraction=0.05), quiet=True)
    assert summary["skipped_images"] == 1
    assert "| skipped_images | 1 |" in (tmp_path / "run" / "summary.md").read_text()
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, 11))


def test_too_many_bad_images_abort(tiny_dir, corrupt_data, tmp_path):
    data, bad = corrupt_data
    # 96 images < the loader's 100-image minimum, so the fraction is judged at the end of the epoch (after 5 batches
    # of 16 from the 95 good images), where 1/96 > 0.
    with pytest.raises(TooManyBadImagesError, match="max-bad-fraction") as err:
        ft.finetune(run_args(tiny_dir, data, tmp_path / "run", steps=8, max_bad_fraction=0.0), quiet=True)
    assert bad in str(err.value)
    assert sorted(step_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]


# ---- losses ----------------------------------------------------------------------------------------------------------

def test_multi_positive_loss_trains_on_the_batch_labels(tiny_dir, data_dir, tmp_path, monkeypatch):
    first = {}

    def keep_first(step, batch):
        first.setdefault("batch", batch)
        return batch

    patch_train(monkeypatch, keep_first)
    summary = ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "mp", steps=2, loss="multi_positive"), quiet=True)
    assert math.isfinite(summary["final_loss"])
    batch = first["batch"]
    model, _, _ = load(tiny_dir)  # the parameters step 1 saw
    img = torch.tensor(np.array(model.encode_image(mx.array(batch["images"]), normalize=True)), dtype=torch.float64)
    txt = torch.tensor(np.array(model.encode_text(mx.array(batch["input_ids"]), normalize=True)), dtype=torch.float64)
    logits = math.exp(model.logit_scale.item()) * img @ txt.T
    labels = torch.tensor(batch["labels"])
    same = (labels[:, None] == labels[None, :]).double()
    targets = same / same.sum(1, keepdim=True)
    want = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    clip = (F.cross_entropy(logits, torch.arange(16)) + F.cross_entropy(logits.T, torch.arange(16))) / 2
    got = step_losses(tmp_path / "mp")[1]
    assert got == pytest.approx(want.item(), rel=1e-4)
    assert abs(want.item() - clip.item()) > 1e-2  # 16 pairs of 5 classes share labels: the losses differ


def test_a_bad_mined_negative_option_is_a_clear_error(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = _run_cli(monkeypatch, capsys, "finetune", "--model", tiny_dir, "--train-data",
                            data_dir / "train.csv", "--out", out, "--steps", 1, "--loss", "mined_negative",
                            "--bank-k", 0)
    assert code == 1 and err.startswith("error:") and "--bank-k" in err
    assert not out.exists()  # refused before any work


def test_finetune_cuts_batches_over_cpu_cores_and_restores_mkl(tiny_dir, data_dir, tmp_path, monkeypatch):
    """On a multi-core CPU a single-process fine-tune traces its towers in batch-parallel mode (mlx_clip/cpu_streams.py:
    each batch cut into one slice per core, MKL at one thread) and leaves MKL's threads as it found them."""
    from mlx_clip import _blas, cpu_streams

    if len(cpu_streams.cpu_streams()) < 2 or _blas.get_threads() is None:
        pytest.skip("batch-parallel mode needs 2+ CPU cores and MKL")
    seen, split = [], cpu_streams.split_batch

    def spy(fn, x):
        seen.append((cpu_streams.ENABLED, x.shape[0], _blas.get_threads()))
        return split(fn, x)

    monkeypatch.setattr(cpu_streams, "split_batch", spy)
    before = _blas.get_threads()
    ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "run", steps=2, eval_every=0), quiet=True)
    cut = [s for s in seen if s[1] == 16]  # the training step's towers (evaluation batches may differ)
    per_stream = max(1, cpu_streams.cores() // len(cpu_streams.cpu_streams()))
    assert cut and all(enabled and threads == per_stream for enabled, _, threads in cut)
    assert not cpu_streams.ENABLED and _blas.get_threads() == before


def test_text_rows_are_packed_on_the_cpu_unless_a_loss_needs_the_rows(monkeypatch):
    """The loop packs caption rows (tokenizer.pack_rows) on the CPU; losses that work on the rows themselves
    (negclip's perturbed captions join them), gradient accumulation (cuts them into micro-batches), sliced attention
    and MLXCLIP_PACK_TEXT=0 keep the trimmed rows. Rows that packing would not shorten stay trimmed too."""
    from mlx_clip.config import get_config
    from mlx_clip.model import CLIP

    model = CLIP(get_config("tiny"))
    rows = loop.text_rows_for(model, losses_need_rows=False, accum_freq=1)
    assert rows is not loop.trimmed_rows
    ragged = np.zeros((4, 77), np.int32)
    for i, n in enumerate((3, 20, 7, 12)):
        ragged[i, 0], ragged[i, 1:n + 1], ragged[i, n + 1] = 49406, 100 + i, 49407
    packed = rows(ragged)
    assert isinstance(packed, dict) and packed["ids"].size < 4 * 32  # 46 tokens instead of 4 rows of 32
    full = np.full((4, 77), 5, np.int32)
    full[:, -1] = 49407
    assert isinstance(rows(full), mx.array)  # nothing to save: trimmed rows
    assert loop.text_rows_for(model, losses_need_rows=True, accum_freq=1) is loop.trimmed_rows
    assert loop.text_rows_for(model, losses_need_rows=False, accum_freq=2) is loop.trimmed_rows
    model.text_model.encoder.layers[0].self_attn.chunk = 16  # sliced attention (--attention-chunk)
    assert loop.text_rows_for(model, losses_need_rows=False, accum_freq=1) is loop.trimmed_rows
    model.text_model.encoder.layers[0].self_attn.chunk = 0
    monkeypatch.setattr(loop, "PACK_TEXT", False)
    assert loop.text_rows_for(model, losses_need_rows=False, accum_freq=1) is loop.trimmed_rows


def test_finetune_feeds_the_step_packed_caption_rows(tiny_dir, data_dir, tmp_path, monkeypatch):
    """A CPU fine-tune's steps encode packed caption rows, one group per slice batch-parallel mode cuts the batch into."""
    from mlx_clip import cpu_streams

    seen, split = [], cpu_streams.split_groups

    def spy(fn, groups):
        seen.append((groups["ids"].shape[0], cpu_streams.groups_for(16)))
        return split(fn, groups)

    monkeypatch.setattr(cpu_streams, "split_groups", spy)
    ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "run", steps=2, eval_every=0), quiet=True)
    assert seen and all(groups == expected for groups, expected in seen)
