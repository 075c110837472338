"""The built-in demo end to end: synthetic domain data -> bundled base model -> fine-tune -> zero-shot before/after.

The default run uses a short version (fewer images and steps); the full demo with its ≥ 85% bar is `slow`.
"""

import mlx_clip  # noqa: F401

import json

import mlx.core as mx

import numpy as np
import pytest

from mlx_clip.eval import class_embeddings, encode_images, iter_eval_batches, load_templates
from mlx_clip.data.sources import open_source
from mlx_clip.io import load
from mlx_clip.train.demo import heldout_accuracy, run_demo


def numpy_top1(model_dir, data_dir) -> float:
    """Zero-shot top-1 recomputed from embeddings with plain numpy (independent of zeroshot_metrics)."""
    model, tokenizer, preprocess = load(model_dir)
    source = open_source(data_dir / "test.csv")
    batches = list(iter_eval_batches(source.records, preprocess, 64))
    images = np.concatenate([encode_images(model, None, b["images"]) for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    classifier = class_embeddings(model, tokenizer, source.classnames, load_templates(data_dir / "templates.txt"))
    return float(np.mean(np.argmax(images @ classifier.T, axis=1) == labels))


def test_short_demo_improves_zero_shot(tmp_path, capsys):
    result = run_demo(out=str(tmp_path / "demo"), n=600, quiet=True, epochs=3, batch_size=48, eval_every=0,
                      save_every=0)
    data = tmp_path / "demo" / "data"
    assert result["after"] == pytest.approx(numpy_top1(result["final_model"], data))
    assert result["before"] == pytest.approx(numpy_top1("builtin", data))
    assert result["after"] >= result["before"] + 0.3, result
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    records = [json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("top1" in r for r in records)


def test_builtin_loads_in_float32():
    model, tokenizer, _ = load("builtin")
    assert model.visual_projection.weight.dtype == mx.float32
    assert tokenizer.context_length == model.config.text_config.max_position_embeddings


@pytest.mark.slow
def test_full_demo_reaches_bar(tmp_path):
    result = run_demo(out=str(tmp_path / "demo"), quiet=True)
    assert result["after"] >= 0.85 and result["after"] > result["before"] + 0.3, result
    assert result["minutes"] <= 10, result
    assert heldout_accuracy(result["final_model"], tmp_path / "demo" / "data") == pytest.approx(result["after"])
