"""Fixtures and helpers shared by the fine-tuning tests (test_finetune.py, test_finetune_recovery.py): the `tiny` model,
a synthetic industrial dataset, the uninterrupted reference run (registered once, in tests/conftest.py), and readers of
a run's files."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_clip.train.finetune as ft
from converters.convert import init_model
from mlx_clip.data.synth import synthesize
from mlx_clip.train.args import TrainingArgs


# ---- fixtures and helpers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "industrial"
    synthesize("industrial", out, n=120, seed=0, image_size=32)  # 96 train, 12 val, 12 test
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 0, tmp_path_factory.mktemp("model") / "tiny")


def run_args(tiny_dir, data_dir, out, **overrides) -> TrainingArgs:
    base = dict(model=str(tiny_dir), train_data=str(Path(data_dir) / "train.csv"), out=str(out), steps=10,
                batch_size=16, lr=1e-3, log_every=1, workers=1, prefetch=1)
    return TrainingArgs(**(base | overrides))


def metric_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_records(run_dir) if "loss" in r}


def saved_weights(path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def snapshot(tree) -> dict[str, np.ndarray]:
    mx.eval(tree)
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def patch_train(monkeypatch, edit_batch=None, wrap_step=None):
    """Route `finetune`'s batches through edit_batch(step, batch) and its step function through wrap_step."""
    real = ft.train

    def train(step_fn, batches, start, *args, **kwargs):
        def edited():
            for step, batch in enumerate(batches, start + 1):
                yield edit_batch(step, batch) if edit_batch else batch
        step_fn = wrap_step(step_fn, kwargs["state_fn"]) if wrap_step else step_fn
        return real(step_fn, edited(), start, *args, **kwargs)

    monkeypatch.setattr(ft, "train", train)


def nan_at(steps):
    return lambda step, batch: ({**batch, "images": np.full_like(batch["images"], np.nan)} if step in steps else batch)


@pytest.fixture(scope="session")
def run_a(tiny_dir, data_dir, tmp_path_factory):
    """The uninterrupted reference run (10 steps of 16 cross an epoch of 96), keeping the in-memory final model."""
    args = run_args(tiny_dir, data_dir, tmp_path_factory.mktemp("runs") / "A", val_data=str(data_dir / "val.csv"),
                 eval_every=5, save_every=4)
    kept, real = {}, ft._save_final

    def save_final(run_dir, model, *rest):
        kept["model"] = model
        return real(run_dir, model, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "_save_final", save_final)
        summary = ft.finetune(args, quiet=True)
    return SimpleNamespace(dir=Path(args.out), args=args, summary=summary, model=kept["model"])
