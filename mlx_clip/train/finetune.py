"""`finetune(args)`: build model, data, optimizer and step from TrainingArgs, run the loop, write the run dir."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_clip.data.pipeline import Loader, LoaderConfig
from mlx_clip.data.sources import open_source
from mlx_clip.eval import evaluate_retrieval, evaluate_zeroshot, iter_eval_batches, load_classnames, load_templates
from mlx_clip.io import cast, load, save
from mlx_clip.losses import SIGLIP_INIT_LOGIT_BIAS, parse_loss_spec
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from mlx_clip.train.loop import LoopHooks, train
from mlx_clip.train.optim import build_optimizer, freeze_towers, lr_schedule
from mlx_clip.train.report import write_report
from mlx_clip.train.step import make_loss_fn, make_step
from mlx_clip.train.tracking import MetricsLog


def compute_dtype(policy: str) -> str:
    """'auto' is float32 on CPU (MLX-CPU half-precision matmul is a scalar loop) and bfloat16 on a GPU."""
    if policy != "auto":
        return policy
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def prepare_model(args: TrainingArgs):
    model, tokenizer, preprocess = load(args.model)
    if args.image_size and args.image_size != model.config.vision_config.image_size:
        raise ValueError(f"--image-size {args.image_size}: this model was built for "
                         f"{model.config.vision_config.image_size} px and position-embedding resizing is not available yet")
    cast(model, compute_dtype(args.dtype))
    if "siglip" in dict(parse_loss_spec(args.loss)) and "logit_bias" not in model:
        # A sigmoid loss needs a learnable bias (SigLIP's init, -10); it is saved with the model and its config.
        model.config.logit_bias_init_value = SIGLIP_INIT_LOGIT_BIAS
        model.logit_bias = mx.array(SIGLIP_INIT_LOGIT_BIAS, dtype=mx.float32)
    lora = None
    if args.lora_rank > 0:
        from mlx_clip.train.lora import LoRAConfig, apply_lora

        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
        apply_lora(model, lora)
    else:
        freeze_towers(model, args.lock_image, args.lock_text, args.unlock_last)
    if args.temperature == "fixed":
        model.freeze(recurse=False, keys=["logit_scale"])
    return model, tokenizer, preprocess, lora


def _source(spec: str, args: TrainingArgs, what: str):
    if not spec:
        raise ValueError(f"--{what} is required (a CSV/TSV, JSONL, class-folder root or WebDataset shards)")
    return open_source(spec, image_key=args.csv_image_key, caption_key=args.csv_caption_key,
                       label_key=args.csv_label_key)


def make_evaluator(args: TrainingArgs, model, tokenizer, preprocess):
    """A function step -> metrics on the val set (zero-shot when it is labelled and class names are known, else
    retrieval). Val images are decoded once and kept."""
    if not args.val_data:
        return None
    source = _source(args.val_data, args, "val-data")
    classnames = load_classnames(args.classnames) if args.classnames else source.classnames
    beside = Path(args.val_data).parent / "templates.txt"
    templates = load_templates(args.templates or (beside if beside.is_file() else None))
    batches = list(iter_eval_batches(source.records, preprocess, args.eval_batch_size, args.max_bad_fraction))
    labelled = all((b["labels"] >= 0).all() for b in batches)

    def evaluate(step: int) -> dict:
        start = time.perf_counter()
        if classnames and labelled:
            result = evaluate_zeroshot(model, tokenizer, preprocess, batches, classnames, templates, args.eval_batch_size)
            result = {"top1": result["top1"], "top5": result["top5"]}
        else:
            result = evaluate_retrieval(model, tokenizer, preprocess, batches, args.eval_batch_size)
        return {**result, "eval_seconds": time.perf_counter() - start}

    return evaluate


def _progress(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def finetune(args: TrainingArgs, quiet: bool = False) -> dict:
    """Run a fine-tune as configured; returns the summary (also written to RUN_DIR/summary.md)."""
    # a bad --loss fails before the run dir is touched
    loss_fn = make_loss_fn(args.loss, beta=args.hn_beta, tau_plus=args.hn_tau_plus)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)
    model, tokenizer, preprocess, lora = prepare_model(args)
    train_source = _source(args.train_data, args, "train-data")
    loader = Loader(train_source.records, preprocess, LoaderConfig(
        batch_size=args.batch_size, train=True, seed=args.seed, crop_scale=args.scale_range, hflip=args.hflip,
        num_threads=args.workers, prefetch=max(args.prefetch, 1) * args.batch_size,
        max_bad_fraction=args.max_bad_fraction), tokenize=tokenizer.tokenize_numpy)
    total = args.steps or args.epochs * _batches_per_epoch(loader, args)
    optimizer = build_optimizer(model, args, total)
    checkpoint = resolve_resume(run_dir, args.resume)
    start, history = 0, {}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        loader.load_state_dict(state["data"])
        start, history = state["step"], state.get("history", {})
    args.save(run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if checkpoint else None, trackers=args.report_to,
                     run_dir=run_dir, quiet=quiet)
    evaluate = make_evaluator(args, model, tokenizer, preprocess)
    if evaluate and checkpoint is None:
        history["before"] = evaluate(0)
        log({"step": 0, **history["before"]})
    step_fn = make_step(model, optimizer, loss_fn, args.grad_clip, args.accum_freq)
    schedule = lr_schedule(args.lr, total, args.warmup, args.schedule, args.min_lr_ratio)

    def checkpoint_hook(step, _extra):
        save_checkpoint(run_dir, step, model, optimizer, {"data": loader.state_dict(), "history": history,
                                                           "args": args.to_dict()}, args.keep_last)

    hooks = LoopHooks(log=log, evaluate=evaluate, checkpoint=checkpoint_hook, lr_at=lambda s: schedule(s).item(),
                      progress=None if quiet else _progress(total, start))
    started = time.perf_counter()
    last = train(step_fn, loader.forever(), start, total, hooks, args.log_every, args.eval_every, args.save_every,
                 state_fn=lambda: [model.state, optimizer.state], seed=args.seed)
    train_seconds = time.perf_counter() - started
    if total > start:
        checkpoint_hook(total, None)
    if evaluate:
        history["after"] = evaluate(total)
        log({"step": total, **history["after"]})
    final = _save_final(run_dir, model, tokenizer, preprocess, lora)
    summary = {"steps": total, "resumed_from": start, "final_loss": last.get("loss", math.nan),
               "train_seconds": round(train_seconds, 1), "images_per_s_last": last.get("images_per_s", math.nan),
               "peak_memory_gb": mx.get_peak_memory() / 1e9, "final_model": str(final),
               **{f"{k}_before": v for k, v in history.get("before", {}).items() if k != "eval_seconds"},
               **{f"{k}_after": v for k, v in history.get("after", {}).items() if k != "eval_seconds"},
               "skipped_images": loader.skips.skipped}
    write_report(run_dir, summary, log.records())
    return summary


def _batches_per_epoch(loader: Loader, args: TrainingArgs) -> int:
    try:
        n = len(loader)
    except TypeError as exc:  # streamed shards have no length
        raise ValueError("--train-data is streamed (WebDataset): give --steps instead of --epochs") from exc
    if n == 0:
        raise ValueError(f"--train-data has fewer samples than one batch of {args.batch_size}")
    return n


def _save_final(run_dir: Path, model, tokenizer, preprocess, lora) -> Path:
    if lora is not None:
        from mlx_clip.train.lora import fuse_lora, save_adapters

        save_adapters(model, lora, run_dir / "adapters")
        fuse_lora(model)
    model.unfreeze()
    return save(model, tokenizer, run_dir / "final", preprocess)
