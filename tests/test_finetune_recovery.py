"""Fine-tuning that survives: an interrupted run resumed equals the uninterrupted one (dropout RNG included),
checkpoints kept, listed and written atomically, a non-finite step skipped as if it never happened, three in a row
stopping with the last checkpoint intact, and logit_scale clamped. On the `tiny` config and a synthetic dataset."""

import math
from pathlib import Path

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest

import mlx_clip.train.finetune as ft
import mlx_clip.train.loop as loop
from mlx_clip.io import load
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.checkpoint import checkpoint_dirs, load_checkpoint, resolve_resume, save_checkpoint
from mlx_clip.train.optim import GroupedAdamW, build_optimizer, freeze_towers, param_hparams
from mlx_clip.train.step import make_loss_fn, make_step
# helpers shared with the other fine-tuning tests (their fixtures data_dir, tiny_dir, run_a: tests/conftest.py);
# tests/ is on sys.path under pytest
from finetune_util import (assert_same, metric_records, nan_at, patch_train, run_args, saved_weights,  # noqa: E402
                           snapshot, step_losses)

LN100 = float(np.float32(math.log(100.0)))


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
    assert max(step_losses(args.out)) == at_step - 1
    return ft.finetune(TrainingArgs(**(args.to_dict() | {"resume": "latest"})), quiet=True)


def test_interrupted_and_resumed_run_equals_uninterrupted(run_a, tiny_dir, data_dir, tmp_path, monkeypatch):
    args = run_args(tiny_dir, data_dir, tmp_path / "B", val_data=str(data_dir / "val.csv"), eval_every=5, save_every=4)
    summary = _interrupt_then_resume(args, 7, monkeypatch)
    assert summary["resumed_from"] == 4  # the checkpoint at 4, not the unsaved steps 5-6

    records_a, records_b = metric_records(run_a.dir), metric_records(args.out)
    train_steps = [r["step"] for r in records_b if "loss" in r]
    assert train_steps == list(range(1, 11))  # each step once, in order
    assert [r["step"] for r in records_b if "top1" in r] == [r["step"] for r in records_a if "top1" in r] == [0, 5, 10]
    losses_a, losses_b = step_losses(run_a.dir), step_losses(args.out)
    for step in range(1, 11):
        assert abs(losses_b[step] - losses_a[step]) <= 1e-6 * abs(losses_a[step]), step
    assert [r["top1"] for r in records_b if "top1" in r] == [r["top1"] for r in records_a if "top1" in r]
    wa = saved_weights(run_a.dir / "final" / "model.safetensors")
    wb = saved_weights(Path(args.out) / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_resume_restores_the_dropout_rng(tiny_dir, data_dir, tmp_path, monkeypatch):
    # LoRA dropout draws random masks inside the compiled step: the resumed run must draw the same ones.
    lora = dict(steps=6, save_every=3, lora_rank=4, lora_dropout=0.5, lr=1e-2)
    ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "U", **lora), quiet=True)
    summary = _interrupt_then_resume(run_args(tiny_dir, data_dir, tmp_path / "I", **lora), 5, monkeypatch)
    assert summary["resumed_from"] == 3
    losses_u, losses_i = step_losses(tmp_path / "U"), step_losses(tmp_path / "I")
    assert sorted(losses_i) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(losses_i[step] - losses_u[step]) <= 1e-6 * abs(losses_u[step]), step
    adapters_u = saved_weights(tmp_path / "U" / "adapters" / "adapters.safetensors")
    for k, v in saved_weights(tmp_path / "I" / "adapters" / "adapters.safetensors").items():
        np.testing.assert_allclose(v, adapters_u[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_resume_from_a_checkpoint_path(run_a, tiny_dir, data_dir, tmp_path):
    # keep_last=2 pruned step 4: saves at 4 and 8, then the final one at 10
    assert [p.name for p in checkpoint_dirs(run_a.dir)] == ["step-00000008", "step-00000010"]
    path = run_a.dir / "checkpoints" / "step-00000008"
    args = run_args(tiny_dir, data_dir, tmp_path / "C", resume=str(path))
    assert ft.finetune(args, quiet=True)["resumed_from"] == 8
    losses_a, losses_c = step_losses(run_a.dir), step_losses(args.out)
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
    saved = snapshot([model.trainable_parameters(), optimizer.state])
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
    assert_same(snapshot([model.trainable_parameters(), optimizer.state]), saved)
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
        first = snapshot(state())
        step(*_batch(tokenizer, 1))
        if with_bad_step:
            before = snapshot(state())
            images, ids, labels = _batch(tokenizer, 2)
            loss, norm, applied = step(images.at[0, 0, 0, 0].add(float("nan")), ids, labels)
            assert not applied.item() and math.isnan(loss.item())
            assert_same(snapshot(state()), before)  # parameters, moments, step count and lr untouched
            assert not np.array_equal(before["0.logit_scale"], first["0.logit_scale"])  # the good step did move
        loss, _, applied = step(*_batch(tokenizer, 3))
        assert applied.item() and math.isfinite(loss.item())
        finals.append(snapshot(state()))
    assert_same(*finals)


def test_single_nonfinite_step_in_a_run_is_skipped(tiny_dir, data_dir, tmp_path, monkeypatch):
    seen = {}

    def watch_step_3(step_fn, state_fn):
        count = [0]

        def step(*batch):
            count[0] += 1
            if count[0] == 3:
                seen["before"] = snapshot(state_fn())
            out = step_fn(*batch)
            if count[0] == 3:
                seen["after"] = snapshot(state_fn())
            return out
        return step

    patch_train(monkeypatch, nan_at({3}), watch_step_3)
    summary = ft.finetune(run_args(tiny_dir, data_dir, tmp_path / "run", steps=5), quiet=True)
    assert_same(seen["after"], seen["before"])
    train = {r["step"]: r for r in metric_records(tmp_path / "run") if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert [train[s]["applied"] for s in range(1, 6)] == [True, True, False, True, True]
    assert math.isnan(train[3]["loss"]) and math.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_three_nonfinite_steps_stop_with_the_last_checkpoint_intact(run_a, tiny_dir, data_dir, tmp_path, monkeypatch):
    args = run_args(tiny_dir, data_dir, tmp_path / "nan", save_every=2, keep_last=5)
    patch_train(monkeypatch, nan_at({6, 7, 8}))
    with pytest.raises(loop.NonFiniteLossError, match="3 non-finite steps in a row at step 8"):
        ft.finetune(args, quiet=True)
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(args.out)] == ["step-00000002", "step-00000004"]  # none after a bad step
    assert not (Path(args.out) / "final").exists()
    assert [r["applied"] for r in metric_records(args.out) if r["step"] >= 6] == [False, False, False]
    # The last good checkpoint is loadable and complete: resuming from it reproduces the clean run.
    ft.finetune(TrainingArgs(**(args.to_dict() | {"resume": "latest"})), quiet=True)
    losses_a, losses = step_losses(run_a.dir), step_losses(args.out)
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




def test_a_bfloat16_run_resumed_equals_the_uninterrupted_one(tiny_dir, data_dir, tmp_path, monkeypatch):
    """Under --dtype bfloat16 the optimizer's state mixes dtypes (m bf16, v fp32: optim.moment_dtypes, session 28):
    a checkpoint keeps each as it is, so an interrupted bf16 run resumed from step 4 ends with the uninterrupted run's
    weights, and its saved moments in those dtypes."""
    whole = run_args(tiny_dir, data_dir, tmp_path / "A", dtype="bfloat16", save_every=4)
    ft.finetune(whole, quiet=True)
    resumed = run_args(tiny_dir, data_dir, tmp_path / "B", dtype="bfloat16", save_every=4)
    assert _interrupt_then_resume(resumed, 7, monkeypatch)["resumed_from"] == 4
    saved = mx.load(str(checkpoint_dirs(resumed.out)[-1] / "optimizer.safetensors"))
    kinds = {(k.rsplit(".", 1)[-1], v.dtype) for k, v in saved.items() if k.endswith((".m", ".v"))}
    assert kinds == {("m", mx.bfloat16), ("v", mx.float32)}, kinds
    wa, wb = (mx.load(str(Path(run.out) / "final" / "model.safetensors")) for run in (whole, resumed))
    assert wa.keys() == wb.keys()
    for k in wa:  # bf16 values compared exactly, through fp32 (numpy has no bf16)
        np.testing.assert_array_equal(np.array(wb[k].astype(mx.float32)), np.array(wa[k].astype(mx.float32)),
                                      err_msg=k)
