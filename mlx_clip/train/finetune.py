"""`finetune(args)`: build model, data, optimizer and step from TrainingArgs, run the loop, write the run dir."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_clip import _blas, cpu_cache, cpu_streams, gpu_buffers, host_malloc
from mlx_clip.adapters import FEATURE_METHODS
from mlx_clip.data.pipeline import Loader, LoaderConfig
from mlx_clip.data.sources import open_source
from mlx_clip.eval import evaluate_retrieval, evaluate_zeroshot, iter_eval_batches, load_classnames, load_templates
from mlx_clip.io import load, save
from mlx_clip.memory import (apply_model_options, batch_limit, build_train_step, choose_batch_size, is_auto,
                              limit_to_one_step, limited_memory)
from mlx_clip.precision import max_bad_steps
from mlx_clip.resolution import loader_preprocess, train_batches, training_resolutions
from mlx_clip.losses import SIGLIP_INIT_LOGIT_BIAS, parse_loss_spec
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train import distributed as dist
from mlx_clip.train.checkpoint import load_checkpoint, load_loss_state, resolve_resume, save_checkpoint
from mlx_clip.train.loop import LoopHooks, text_rows_for, train
from mlx_clip.train.loss_inputs import LossInputs, check_loss_options, loss_names, parse_views
from mlx_clip.train.optim import build_optimizer, freeze_towers, lr_schedule
from mlx_clip.train.report import write_report
from mlx_clip.train.step import make_loss_fn
from mlx_clip.train.tracking import MetricsLog


def prepare_model(args: TrainingArgs):
    model, tokenizer, preprocess = load(args.model, image_size=args.image_size or None)  # position embeddings resampled
    apply_model_options(model, args)  # precision policy, attention chunks, gradient checkpointing
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
    if args.temperature in ("fixed", "scheduled"):  # scheduled: the step gets the multiplier as an input
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
    if args.domain and not args.templates and not beside.is_file():  # the domain preset's prompts
        from mlx_clip.domains import get_preset

        templates = list(get_preset(args.domain).templates)
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
    # On the CPU every batch is cut over the cores (cpu_streams.py); ranks sharing a machine already use its cores.
    # Freed buffers kept for the next step rather than faulted back in (cpu_cache.py).
    with (limited_memory(args.memory_limit), cpu_streams.batch_parallel_mode(dist.world_size() == 1),
          cpu_cache.for_training()):
        return _finetune(args, quiet)


def _finetune(args: TrainingArgs, quiet: bool) -> dict:
    if args.adapter in FEATURE_METHODS:  # frozen towers: trained on features (train/adapt.py)
        from mlx_clip.train.adapt import finetune_adapter

        return finetune_adapter(args, quiet)
    # a bad --loss (or loss option) fails before the run dir is touched
    check_loss_options(args)
    names = loss_names(args)
    views, view_weights = parse_views(args) if "multiscale" in names else ((), None)
    outputs = {} if "mined_negative" in names else None  # the batch's features, written by the step for the bank
    loss_fn = make_loss_fn(args.loss, outputs, beta=args.hn_beta, tau_plus=args.hn_tau_plus, k=args.bank_k,
                           weights=view_weights)
    batch = dist.per_rank_batch(args.batch_size)  # --batch-size is global; under mlx.launch each rank loads its share
    main = dist.is_main()  # rank 0 alone writes the run dir and evaluates (on the whole val set)
    run_dir = Path(args.out)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(args.seed)
    model, tokenizer, preprocess, lora = prepare_model(args)
    sizes = training_resolutions(args, model.config.vision_config)  # [] unless training at several sizes
    train_source = _source(args.train_data, args, "train-data")
    if args.normalize_from_data:  # the data's own mean/std (mlx_clip.domains), saved with the final model
        from mlx_clip.domains import with_data_stats

        preprocess = with_data_stats(preprocess, train_source.records)
    if args.batch_size == 0:  # --batch-size auto: the largest that fits --memory-budget, measured at the largest size
        batch = choose_batch_size(model, args, loss_fn, max(sizes or [model.config.vision_config.image_size]),
                                  limit=batch_limit(train_source.records, dist.world_size()))
        dist.check_same(batch, "--batch-size auto's choice (measured peaks differ; give --batch-size)")
        args.batch_size = batch * dist.world_size()
    if is_auto(args.memory_limit):  # one step's measured peak and a tenth more (limited_memory puts MLX's back after)
        limit_to_one_step(model, args, loss_fn, batch, max(sizes or [model.config.vision_config.image_size]))
    loader = Loader(train_source.records, loader_preprocess(preprocess, sizes), LoaderConfig(
        batch_size=batch, train=True, seed=args.seed, crop_scale=args.scale_range, hflip=args.hflip,
        rotate90=args.rotate90, views=views,
        num_threads=args.workers, prefetch=max(args.prefetch, 1) * batch, max_bad_fraction=args.max_bad_fraction,
        rank=dist.rank(), world_size=dist.world_size()), tokenize=tokenizer.tokenize_numpy)
    total = args.steps or args.epochs * _batches_per_epoch(loader, args)
    optimizer = build_optimizer(model, args, total)
    extra = LossInputs(args, model, tokenizer, total, outputs)  # before the step is built: it adds to model.state
    extra = extra if extra.needed else None
    checkpoint = resolve_resume(run_dir, args.resume)
    start, history = 0, {}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        loader.load_state_dict(dist.rank_data_state(state))
        start, history = state["step"], state.get("history", {})
        if extra:
            extra.load_state_arrays(load_loss_state(checkpoint))
    dist.check_same(start, "the step to resume from (every rank must see the same run dir or checkpoint)")
    if main:
        args.save(run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if checkpoint else None, trackers=args.report_to,
                     run_dir=run_dir, quiet=quiet) if main else (lambda record: None)
    evaluate = make_evaluator(args, model, tokenizer, preprocess) if main else None
    if evaluate and checkpoint is None:
        history["before"] = evaluate(0)
        log({"step": 0, **history["before"]})
    step_fn = build_train_step(model, optimizer, loss_fn, args)
    schedule = lr_schedule(args.lr, total, args.warmup, args.schedule, args.min_lr_ratio)

    def checkpoint_hook(step, _extra):
        data = dist.data_state(loader.state_dict())  # collective: every rank's data position
        if main:
            save_checkpoint(run_dir, step, model, optimizer, {**data, "history": history, "args": args.to_dict()},
                            args.keep_last, loss_state=extra.state_arrays() if extra else None)

    hooks = LoopHooks(log=log, evaluate=evaluate, checkpoint=checkpoint_hook, lr_at=lambda s: schedule(s).item(),
                      progress=None if quiet or not main else _progress(total, start),
                      step_inputs=extra.inputs if extra else None, after_step=extra.after_step if extra else None)
    started = time.perf_counter()
    last = train(step_fn, train_batches(loader.forever(), sizes, args, total, start), start, total, hooks,
                 args.log_every, args.eval_every, args.save_every, max_bad_steps=max_bad_steps(args.dtype),
                 state_fn=lambda: [model.state, optimizer.state], seed=args.seed,
                 text_rows=text_rows_for(model, extra is not None, args.accum_freq))
    train_seconds = time.perf_counter() - started
    if extra and extra.schedule:  # the saved model carries the temperature the run ended at
        model.logit_scale = mx.array(math.log(extra.logit_scale_at(total + 1)), dtype=model.logit_scale.dtype)
    if total > start:
        checkpoint_hook(total, None)
    if evaluate:
        history["after"] = evaluate(total)
        log({"step": total, **history["after"]})
    skipped = dist.sum_int(loader.skips.skipped)
    final = _save_final(run_dir, model, tokenizer, preprocess, lora) if main else run_dir / "final"
    summary = {"steps": total, "resumed_from": start, "final_loss": last.get("loss", math.nan),
               "train_seconds": round(train_seconds, 1), "images_per_s_last": last.get("images_per_s", math.nan),
               "peak_memory_gb": _run_peak_gb(log.records() if main else []), "final_model": str(final),
               **{f"{k}_before": v for k, v in history.get("before", {}).items() if k != "eval_seconds"},
               **{f"{k}_after": v for k, v in history.get("after", {}).items() if k != "eval_seconds"},
               "skipped_images": skipped,
               "host_malloc": host_malloc.in_use(),  # a GPU step's speed depends on it (host_malloc.py)
               "gpu_ops_per_buffer": gpu_buffers.in_force(),  # and on MLX's CUDA command buffers (gpu_buffers.py)
               "blas": _blas.describe()}  # and a CPU step's on this (MKL, oneDNN's sgemm: onednn_blas.py)
    if main:
        write_report(run_dir, summary, log.records())
    return summary


def _run_peak_gb(records: list[dict]) -> float:
    """The run's peak: metrics.jsonl holds each log interval's own peak (the loop resets it after each record)."""
    return max([r["peak_memory_gb"] for r in records if "peak_memory_gb" in r] + [mx.get_peak_memory() / 1e9])


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
