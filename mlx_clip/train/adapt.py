"""`finetune --adapter clip-adapter|tip-adapter|coop`: train a feature adapter on a frozen model, write RUN_DIR/adapter.

Both towers are frozen, so the training images are encoded once (eval preprocessing: no augmentation, so a preset's
augmentation policy does not apply here) and the adapter trains on those features: seconds, not minutes. Zero-shot
top-1 on the val set before, adapter top-1 after.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_clip.adapters import AdapterConfig, build_adapter, save_adapter, train_adapter, trainable_count
from mlx_clip.data.sources import open_source
from mlx_clip.eval import class_embeddings, encode_images, iter_eval_batches, load_classnames, load_templates
from mlx_clip.io import load


def encode_source(model, preprocess, spec: str, batch_size: int = 64, max_bad_fraction: float = 0.01):
    """(normalized image features (N, d) of the base model, labels (N,)) of a labelled source."""
    source = open_source(spec, caption_key=None)
    feats, labels = [], []
    for batch in iter_eval_batches(source.records, preprocess, batch_size, max_bad_fraction):
        feats.append(encode_images(model, None, batch["images"], batch_size))
        labels.append(batch["labels"])
    labels = np.concatenate(labels)
    if (labels < 0).any():
        raise ValueError(f"{spec}: adapters need a label for every image (a 'label' column or class folders)")
    return np.concatenate(feats), labels, source


def top1(adapted, features, labels) -> float:
    logits = np.array(adapted.logits_from_features(mx.array(features)))
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def zeroshot_top1(clip, tokenizer, cfg: AdapterConfig, features, labels) -> float:
    """The base model's zero-shot top-1 with the adapter's class names and templates (the 'before' number)."""
    classifier = class_embeddings(clip, tokenizer, cfg.classnames, cfg.templates)
    return float(np.mean(np.argmax(features @ classifier.T, axis=1) == labels))


def _templates(args, data: Path) -> list[str]:
    if args.templates:
        return load_templates(args.templates)
    if (data.parent / "templates.txt").is_file():
        return load_templates(data.parent / "templates.txt")
    if args.domain:
        from mlx_clip.domains import get_preset

        return list(get_preset(args.domain).templates)
    return load_templates(None)


def adapter_steps(args, n: int) -> int:
    """--steps, else --epochs over the features; tip-adapter is training-free unless --steps is given."""
    if args.steps or args.adapter == "tip-adapter":
        return args.steps
    return args.epochs * max(1, math.ceil(n / args.batch_size))


def finetune_adapter(args, quiet: bool = False) -> dict:
    """Train and save a feature adapter as configured by TrainingArgs; returns the summary (also summary.json)."""
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    args.save(run_dir / "config.yaml")
    mx.random.seed(args.seed)
    clip, tokenizer, preprocess = load(args.model)
    if not args.train_data:
        raise ValueError("--train-data is required")
    feats, labels, source = encode_source(clip, preprocess, args.train_data, args.eval_batch_size, args.max_bad_fraction)
    classnames = load_classnames(args.classnames) if args.classnames else source.classnames
    if not classnames:
        raise ValueError(f"{args.train_data}: no class names known; pass --classnames FILE")
    base = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model  # reloadable from any cwd
    cfg = AdapterConfig(method=args.adapter, base_model=base, classnames=list(classnames),
                        templates=_templates(args, Path(args.train_data)), ratio=args.adapter_ratio,
                        alpha=args.tip_alpha, beta=args.tip_beta, ctx_init=args.coop_ctx, seed=args.seed)
    model = build_adapter(clip, tokenizer, cfg, feats, labels)
    val = encode_source(clip, preprocess, args.val_data, args.eval_batch_size)[:2] if args.val_data else None
    before = zeroshot_top1(clip, tokenizer, cfg, *val) if val else None
    steps = adapter_steps(args, len(labels))
    mx.reset_peak_memory()
    started = time.perf_counter()
    losses = train_adapter(model, feats, labels, steps, args.batch_size, args.lr, args.weight_decay, args.seed,
                           log=None if quiet else lambda r: print(json.dumps(r), flush=True))
    summary = {"adapter": args.adapter, "steps": steps, "train_seconds": round(time.perf_counter() - started, 2),
               "final_loss": losses[-1] if losses else None, "peak_memory_gb": mx.get_peak_memory() / 1e9,
               "trainable_params": trainable_count(model) if steps else 0,
               "adapter_params": sum(v.size for v in model.adapter_weights().values()),
               "final_model": str(save_adapter(model, run_dir / "adapter"))}
    if val:
        summary |= {"top1_before": before, "top1_after": top1(model, *val)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
