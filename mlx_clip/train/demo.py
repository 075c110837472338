"""The built-in demo (`mlxclip finetune` with no arguments): make a synthetic domain dataset, fine-tune the bundled
base model on it, and print zero-shot accuracy on the held-out test split before and after."""

from __future__ import annotations

import time
from pathlib import Path

from mlx_clip.data.sources import open_source
from mlx_clip.data.synth import synthesize
from mlx_clip.eval import evaluate_zeroshot, iter_eval_batches, load_templates
from mlx_clip.io import load
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.finetune import finetune

# The recipe the demo runs (chosen on the bundled model; see benchmarks/results/demo.md for what it reaches).
DEMO_RECIPE = dict(epochs=3, batch_size=64, lr=5e-4, warmup=10, weight_decay=0.05, loss="multi_positive",
                   eval_every=25, log_every=5, save_every=25, augment_scale="0.7,1.0")


def heldout_accuracy(model_dir, data_dir: Path, batch_size: int = 128) -> float:
    """Zero-shot top-1 of a model on the dataset's held-out test split, with its class names and templates."""
    model, tokenizer, preprocess = load(model_dir)
    source = open_source(data_dir / "test.csv")
    templates = load_templates(data_dir / "templates.txt")
    batches = list(iter_eval_batches(source.records, preprocess, batch_size))
    return evaluate_zeroshot(model, tokenizer, preprocess, batches, source.classnames, templates, batch_size)["top1"]


def run_demo(out: str = "runs/demo", domain: str = "industrial", n: int = 2000, model: str = "builtin", seed: int = 0,
             quiet: bool = False, **recipe) -> dict:
    started = time.perf_counter()
    out = Path(out)
    data = out / "data"
    if not (data / "info.json").exists():
        print(f"[demo] generating the synthetic '{domain}' dataset ({n} images) in {data}", flush=True)
        synthesize(domain, data, n=n, seed=seed)
    before = heldout_accuracy(model, data)
    print(f"[demo] zero-shot top-1 on the held-out test split before fine-tuning: {before:.1%}", flush=True)
    args = TrainingArgs(model=model, train_data=str(data / "train.csv"), val_data=str(data / "val.csv"),
                        out=str(out / "run"), seed=seed, **{**DEMO_RECIPE, **recipe})
    summary = finetune(args, quiet=quiet)
    after = heldout_accuracy(summary["final_model"], data)
    minutes = (time.perf_counter() - started) / 60
    print(f"[demo] zero-shot top-1 on the held-out test split: before {before:.1%} -> after {after:.1%} "
          f"({minutes:.1f} min in all; model in {summary['final_model']}, report in {out / 'run' / 'summary.md'})",
          flush=True)
    return {"domain": domain, "before": before, "after": after, "minutes": minutes, **summary}
