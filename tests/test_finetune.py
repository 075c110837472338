"""The fine-tuning engine on the `tiny` config and a synthetic industrial dataset: resume equality, checkpoints,
non-finite steps, the optimizer (vs torch AdamW and open_clip's schedules), freezing, options, outputs, LoRA, corrupt
images and label-aware losses. References are independent: torch, open_clip_train, numpy, module types."""

import json
import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image

import mlx_clip.train.finetune as ft
import mlx_clip.train.loop as loop
from converters.convert import init_model
from mlx_clip import cli
from mlx_clip.data.images import TooManyBadImagesError
from mlx_clip.data.pipeline import Loader, LoaderConfig
from mlx_clip.data.sources import open_source
from mlx_clip.data.synth import synthesize
from mlx_clip.io import load
from mlx_clip.train.args import TrainingArgs, resolve_args
from mlx_clip.train.checkpoint import checkpoint_dirs, load_checkpoint, resolve_resume, save_checkpoint
from mlx_clip.train.lora import load_with_adapters
from mlx_clip.train.optim import GroupedAdamW, build_optimizer, freeze_towers, param_hparams
from mlx_clip.train.step import make_loss_fn, make_step

LN100 = float(np.float32(math.log(100.0)))


# ---- fixtures and helpers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "industrial"
    synthesize("industrial", out, n=120, seed=0, image_size=32)  # 96 train, 12 val, 12 test
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 0, tmp_path_factory.mktemp("model") / "tiny")


def _args(tiny_dir, data_dir, out, **overrides) -> TrainingArgs:
    base = dict(model=str(tiny_dir), train_data=str(Path(data_dir) / "train.csv"), out=str(out), steps=10,
                batch_size=16, lr=1e-3, log_every=1, workers=1, prefetch=1)
    return TrainingArgs(**(base | overrides))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _weights(path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _snapshot(tree) -> dict[str, np.ndarray]:
    mx.eval(tree)
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _patch_train(monkeypatch, edit_batch=None, wrap_step=None):
    """Route `finetune`'s batches through edit_batch(step, batch) and its step function through wrap_step."""
    real = ft.train

    def train(step_fn, batches, start, *args, **kwargs):
        def edited():
            for step, batch in enumerate(batches, start + 1):
                yield edit_batch(step, batch) if edit_batch else batch
        step_fn = wrap_step(step_fn, kwargs["state_fn"]) if wrap_step else step_fn
        return real(step_fn, edited(), start, *args, **kwargs)

    monkeypatch.setattr(ft, "train", train)


def _nan_at(steps):
    return lambda step, batch: ({**batch, "images": np.full_like(batch["images"], np.nan)} if step in steps else batch)


@pytest.fixture(scope="session")
def run_a(tiny_dir, data_dir, tmp_path_factory):
    """The uninterrupted reference run (10 steps of 16 cross an epoch of 96), keeping the in-memory final model."""
    args = _args(tiny_dir, data_dir, tmp_path_factory.mktemp("runs") / "A", val_data=str(data_dir / "val.csv"),
                 eval_every=5, save_every=4)
    kept, real = {}, ft._save_final

    def save_final(run_dir, model, *rest):
        kept["model"] = model
        return real(run_dir, model, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "_save_final", save_final)
        summary = ft.finetune(args, quiet=True)
    return SimpleNamespace(dir=Path(args.out), args=args, summary=summary, model=kept["model"])


def _val_pixels_and_labels(data_dir, preprocess):
    rows = open_source(data_dir / "val.csv").records
    pixels = np.stack([preprocess.to_numpy(Image.open(r["image"])) for r in rows]).astype(np.float32)
    return pixels, np.array([r["label"] for r in rows]), [r["caption"] for r in rows]


# ---- resume and checkpoints -----------------------------------------------------------------------------------------

def _interrupt_then_resume(args: TrainingArgs, at_step: int, monkeypatch) -> dict:
    """Run `args` until step `at_step` raises KeyboardInterrupt (as Ctrl-C would), then resume it from 'latest'."""
    real = loop._train_record

    def interrupt(step, *rest):
        if step == at_step:
            raise KeyboardInterrupt
        return real(step, *rest)

    with monkeypatch.context() as mp:
        mp.setattr(loop, "_train_record", interrupt)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(args, quiet=True)
    assert max(_losses(args.out)) == at_step - 1
    return ft.finetune(TrainingArgs(**(args.to_dict() | {"resume": "latest"})), quiet=True)


def test_interrupted_and_resumed_run_equals_uninterrupted(run_a, tiny_dir, data_dir, tmp_path, monkeypatch):
    args = _args(tiny_dir, data_dir, tmp_path / "B", val_data=str(data_dir / "val.csv"), eval_every=5, save_every=4)
    summary = _interrupt_then_resume(args, 7, monkeypatch)
    assert summary["resumed_from"] == 4  # the checkpoint at 4, not the unsaved steps 5-6

    records_a, records_b = _records(run_a.dir), _records(args.out)
    train_steps = [r["step"] for r in records_b if "loss" in r]
    assert train_steps == list(range(1, 11))  # each step once, in order
    assert [r["step"] for r in records_b if "top1" in r] == [r["step"] for r in records_a if "top1" in r] == [0, 5, 10]
    losses_a, losses_b = _losses(run_a.dir), _losses(args.out)
    for step in range(1, 11):
        assert abs(losses_b[step] - losses_a[step]) <= 1e-6 * abs(losses_a[step]), step
    assert [r["top1"] for r in records_b if "top1" in r] == [r["top1"] for r in records_a if "top1" in r]
    wa = _weights(run_a.dir / "final" / "model.safetensors")
    wb = _weights(Path(args.out) / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_resume_restores_the_dropout_rng(tiny_dir, data_dir, tmp_path, monkeypatch):
    # LoRA dropout draws random masks inside the compiled step: the resumed run must draw the same ones.
    lora = dict(steps=6, save_every=3, lora_rank=4, lora_dropout=0.5, lr=1e-2)
    ft.finetune(_args(tiny_dir, data_dir, tmp_path / "U", **lora), quiet=True)
    summary = _interrupt_then_resume(_args(tiny_dir, data_dir, tmp_path / "I", **lora), 5, monkeypatch)
    assert summary["resumed_from"] == 3
    losses_u, losses_i = _losses(tmp_path / "U"), _losses(tmp_path / "I")
    assert sorted(losses_i) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(losses_i[step] - losses_u[step]) <= 1e-6 * abs(losses_u[step]), step
    adapters_u = _weights(tmp_path / "U" / "adapters" / "adapters.safetensors")
    for k, v in _weights(tmp_path / "I" / "adapters" / "adapters.safetensors").items():
        np.testing.assert_allclose(v, adapters_u[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_resume_from_a_checkpoint_path(run_a, tiny_dir, data_dir, tmp_path):
    # keep_last=2 pruned step 4: saves at 4 and 8, then the final one at 10
    assert [p.name for p in checkpoint_dirs(run_a.dir)] == ["step-00000008", "step-00000010"]
    path = run_a.dir / "checkpoints" / "step-00000008"
    args = _args(tiny_dir, data_dir, tmp_path / "C", resume=str(path))
    assert ft.finetune(args, quiet=True)["resumed_from"] == 8
    losses_a, losses_c = _losses(run_a.dir), _losses(args.out)
    assert sorted(losses_c) == [9, 10]
    for step in (9, 10):
        assert abs(losses_c[step] - losses_a[step]) <= 1e-6 * abs(losses_a[step])
    with pytest.raises(FileNotFoundError, match="not a checkpoint dir"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


@pytest.fixture
def vision_setup(tiny_dir):
    model, _, _ = load(tiny_dir)
    freeze_towers(model, lock_text=True)  # a smaller optimizer state: these tests are about files
    optimizer = build_optimizer(model, TrainingArgs(lr=1e-3), total_steps=10)
    return model, optimizer


def test_checkpoints_keep_last_k_and_list_only_complete_dirs(vision_setup, tmp_path):
    model, optimizer = vision_setup
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizer, {"data": {}}, keep_last=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004", "step-00000005"]
    root = tmp_path / "checkpoints"
    (root / ".step-00000009.x1y2").mkdir()  # what a kill -9 during a write leaves
    (root / ".step-00000009.x1y2" / "trainable.safetensors").write_bytes(b"partial")
    (root / "step-00000010").mkdir()  # no state.json: not a checkpoint
    assert [p.name for p in checkpoint_dirs(tmp_path)][-1] == "step-00000005"
    assert resolve_resume(tmp_path, "latest") == root / "step-00000005"
    assert resolve_resume(tmp_path / "fresh", "latest") is None
    save_checkpoint(tmp_path, 6, model, optimizer, {}, keep_last=0)  # 0 keeps all
    assert len(checkpoint_dirs(tmp_path)) == 4


def test_checkpoint_write_is_atomic_and_round_trips(vision_setup, tmp_path, monkeypatch):
    model, optimizer = vision_setup
    optimizer.state["logit_scale"]["m"] = mx.array(0.25)  # a non-trivial state to restore
    good = save_checkpoint(tmp_path, 2, model, optimizer, {"data": {"position": 32}})
    saved = _snapshot([model.trainable_parameters(), optimizer.state])
    calls = []

    def crash_on_second_file(path, arrays, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(path, arrays, *a, **k)

    real_save = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, model, optimizer, {})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no temp dir left
    model.update({"logit_scale": mx.array(3.0)})
    optimizer.state["logit_scale"]["m"] = mx.array(-1.0)
    state = load_checkpoint(good, model, optimizer)
    assert state["step"] == 2 and state["data"] == {"position": 32}
    _assert_same(_snapshot([model.trainable_parameters(), optimizer.state]), saved)
    freeze_towers(model, lock_image=True)  # a different trainable set must be refused by name
    with pytest.raises(ValueError, match="trainable parameters differ"):
        load_checkpoint(good, model, optimizer)


# ---- non-finite steps -----------------------------------------------------------------------------------------------

def _batch(tokenizer, seed, n=8):
    rng = np.random.default_rng(seed)
    words = ["scratch", "hole", "stain", "crack", "no defect"]
    texts = [f"a photo of a {words[i % 5]} on metal." for i in range(n)]
    return (mx.array(rng.standard_normal((n, 32, 32, 3)).astype(np.float32)), tokenizer(texts),
            mx.array(np.arange(n, dtype=np.int32)))


def test_a_nonfinite_step_is_as_if_it_never_happened(tiny_dir):
    finals = []
    for with_bad_step in (True, False):
        model, tokenizer, _ = load(tiny_dir)
        optimizer = build_optimizer(model, TrainingArgs(lr=1e-3), total_steps=10)
        step = make_step(model, optimizer, make_loss_fn("clip"))
        state = lambda: [model.parameters(), optimizer.state]  # noqa: E731
        first = _snapshot(state())
        step(*_batch(tokenizer, 1))
        if with_bad_step:
            before = _snapshot(state())
            images, ids, labels = _batch(tokenizer, 2)
            loss, norm, applied = step(images.at[0, 0, 0, 0].add(float("nan")), ids, labels)
            assert not applied.item() and math.isnan(loss.item())
            _assert_same(_snapshot(state()), before)  # parameters, moments, step count and lr untouched
            assert not np.array_equal(before["0.logit_scale"], first["0.logit_scale"])  # the good step did move
        loss, _, applied = step(*_batch(tokenizer, 3))
        assert applied.item() and math.isfinite(loss.item())
        finals.append(_snapshot(state()))
    _assert_same(*finals)


def test_single_nonfinite_step_in_a_run_is_skipped(tiny_dir, data_dir, tmp_path, monkeypatch):
    seen = {}

    def watch_step_3(step_fn, state_fn):
        count = [0]

        def step(*batch):
            count[0] += 1
            if count[0] == 3:
                seen["before"] = _snapshot(state_fn())
            out = step_fn(*batch)
            if count[0] == 3:
                seen["after"] = _snapshot(state_fn())
            return out
        return step

    _patch_train(monkeypatch, _nan_at({3}), watch_step_3)
    summary = ft.finetune(_args(tiny_dir, data_dir, tmp_path / "run", steps=5), quiet=True)
    _assert_same(seen["after"], seen["before"])
    train = {r["step"]: r for r in _records(tmp_path / "run") if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert [train[s]["applied"] for s in range(1, 6)] == [True, True, False, True, True]
    assert math.isnan(train[3]["loss"]) and math.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_three_nonfinite_steps_stop_with_the_last_checkpoint_intact(run_a, tiny_dir, data_dir, tmp_path, monkeypatch):
    args = _args(tiny_dir, data_dir, tmp_path / "nan", save_every=2, keep_last=5)
    _patch_train(monkeypatch, _nan_at({6, 7, 8}))
    with pytest.raises(loop.NonFiniteLossError, match="3 non-finite steps in a row at step 8"):
        ft.finetune(args, quiet=True)
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(args.out)] == ["step-00000002", "step-00000004"]  # none after a bad step
    assert not (Path(args.out) / "final").exists()
    assert [r["applied"] for r in _records(args.out) if r["step"] >= 6] == [False, False, False]
    # The last good checkpoint is loadable and complete: resuming from it reproduces the clean run.
    ft.finetune(TrainingArgs(**(args.to_dict() | {"resume": "latest"})), quiet=True)
    losses_a, losses = _losses(run_a.dir), _losses(args.out)
    assert sorted(losses) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(losses[step] - losses_a[step]) <= 1e-6 * abs(losses_a[step]), step


def test_logit_scale_is_clamped_even_with_a_huge_lr(tiny_dir):
    model, tokenizer, _ = load(tiny_dir)
    model.freeze()
    model.unfreeze(keys=["logit_scale"], recurse=False)
    optimizer = GroupedAdamW(1e3, param_hparams(model, 0.0))
    optimizer.init(model.trainable_parameters())
    clip = make_loss_fn("clip")
    step = make_step(model, optimizer, lambda m, *b: clip(m, *b) - 10.0 * m.logit_scale, grad_clip=0.0)
    assert model.logit_scale.item() < LN100
    for seed in range(3):
        _, _, applied = step(*_batch(tokenizer, seed))
        assert applied.item()
        assert model.logit_scale.item() == LN100  # Adam moved it by ~1000; the clamp holds it at ln(100)


# ---- the CLI and YAML (optimizer tests: tests/test_optim.py) -------------------------------------------------------

def _run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mlxclip", *map(str, args)])
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
    assert sorted(_losses(out)) == [1, 2, 3]
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
    final = _weights(run_a.dir / "final" / "model.safetensors")
    last = _weights(run_a.dir / "checkpoints" / "step-00000010" / "trainable.safetensors")
    _assert_same({k: final[k] for k in last}, last)
    base = _weights(Path(run_a.args.model) / "model.safetensors")
    assert not np.array_equal(final["text_projection.weight"], base["text_projection.weight"])


def test_metrics_lines_and_report(run_a, data_dir):
    records = _records(run_a.dir)
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
    ft.finetune(_args(tiny_dir, data_dir, tmp_path / "lit", steps=3, lock_image=True), quiet=True)
    base = _weights(Path(tiny_dir) / "model.safetensors")
    final = _weights(tmp_path / "lit" / "final" / "model.safetensors")
    vision = [k for k in base if k.startswith(("vision_model.", "visual_projection."))]
    assert len(vision) > 30
    _assert_same({k: final[k] for k in vision}, {k: base[k] for k in vision})
    assert not np.array_equal(final["text_projection.weight"], base["text_projection.weight"])


def test_lora_finetune_saves_adapters_and_a_fused_dir(tiny_dir, data_dir, tmp_path):
    args = _args(tiny_dir, data_dir, tmp_path / "lora", steps=3, lr=1e-2, lora_rank=4, lora_alpha=8.0)
    ft.finetune(args, quiet=True)
    adapters = tmp_path / "lora" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    lora = _weights(adapters / "adapters.safetensors")
    assert len(lora) == 2 * 2 * 6 * 2 and all(k.endswith((".lora_a", ".lora_b")) for k in lora)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith("lora_b"))  # the adapters trained
    base = _weights(Path(tiny_dir) / "model.safetensors")
    fused = _weights(tmp_path / "lora" / "final" / "model.safetensors")
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
    summary = ft.finetune(_args(tiny_dir, data, tmp_path / "run", batch_size=8, max_bad_fraction=0.05), quiet=True)
    assert summary["skipped_images"] == 1
    assert "| skipped_images | 1 |" in (tmp_path / "run" / "summary.md").read_text()
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 11))


def test_too_many_bad_images_abort(tiny_dir, corrupt_data, tmp_path):
    data, bad = corrupt_data
    # 96 images < the loader's 100-image minimum, so the fraction is judged at the end of the epoch (after 5 batches
    # of 16 from the 95 good images), where 1/96 > 0.
    with pytest.raises(TooManyBadImagesError, match="max-bad-fraction") as err:
        ft.finetune(_args(tiny_dir, data, tmp_path / "run", steps=8, max_bad_fraction=0.0), quiet=True)
    assert bad in str(err.value)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]


# ---- losses ----------------------------------------------------------------------------------------------------------

def test_multi_positive_loss_trains_on_the_batch_labels(tiny_dir, data_dir, tmp_path, monkeypatch):
    first = {}

    def keep_first(step, batch):
        first.setdefault("batch", batch)
        return batch

    _patch_train(monkeypatch, keep_first)
    summary = ft.finetune(_args(tiny_dir, data_dir, tmp_path / "mp", steps=2, loss="multi_positive"), quiet=True)
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
    got = _losses(tmp_path / "mp")[1]
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
    ft.finetune(_args(tiny_dir, data_dir, tmp_path / "run", steps=2, eval_every=0), quiet=True)
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
    ft.finetune(_args(tiny_dir, data_dir, tmp_path / "run", steps=2, eval_every=0), quiet=True)
    assert seen and all(groups == expected for groups, expected in seen)
