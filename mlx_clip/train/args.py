"""`TrainingArgs`: every option of `mlxclip finetune`, from defaults < YAML < command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def int_or_auto(value) -> int:
    """A batch size: a positive int, or 'auto' (stored as 0) for the largest batch that fits --memory-budget."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    return int(value)


def opt(default, help: str, **meta):
    """A dataclass field carrying its `--help` text (and optional click choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainingArgs:
    # what and where
    model: str = opt("builtin", "Base model: a model dir, a Hugging Face CLIP dir, a hub id, or 'builtin'.")
    train_data: str = opt("", "Training pairs: CSV/TSV, JSONL, class-folder root, or WebDataset shards (brace patterns).")
    val_data: str = opt("", "Validation data (same formats); zero-shot eval when it has labels, retrieval otherwise.")
    out: str = opt("runs/finetune", "Run dir: config, metrics.jsonl, checkpoints/, final/ model dir, report.")
    classnames: str = opt("", "Class names file (one per line, label order); default: classes.txt beside the val data.")
    templates: str = opt("", "Zero-shot templates file ('{}' per line); default: templates.txt beside the val data.")
    csv_image_key: str = opt("filepath", "CSV/JSONL column holding the image path.")
    csv_caption_key: str = opt("caption", "CSV/JSONL column holding the caption.")
    csv_label_key: str = opt("label", "CSV/JSONL column holding the integer class label (optional).")
    # schedule
    epochs: int = opt(1, "Passes over the training data (ignored when --steps is set).")
    steps: int = opt(0, "Total optimizer steps; overrides --epochs when > 0.")
    batch_size: int = opt(32, "Pairs per step, across all processes under mlx.launch (fixed shape: the last partial batch of an "
                          "epoch is dropped); 'auto': the "
                          "largest batch whose measured peak memory fits --memory-budget.", parse=int_or_auto)
    memory_budget: str = opt("16GB", "Memory budget for --batch-size auto (e.g. 16GB, 800MB, 12GiB).")
    memory_limit: str = opt("", "MLX's memory limit for the run (e.g. 19GiB): over it MLX waits for running work before "
                            "queueing more, which lowers the peak (on a GPU: the buffers of kernels in flight) at some "
                            "speed. 'auto': one step's measured peak and 10% more, so only queued work waits. "
                            "Default: MLX's own; --batch-size auto sets it to --memory-budget.")
    lr: float = opt(1e-5, "Peak learning rate.")
    warmup: int = opt(0, "Linear warm-up steps.")
    schedule: str = opt("cosine", "LR schedule after warm-up.", choices=["cosine", "const"])
    min_lr_ratio: float = opt(0.0, "Final LR as a fraction of --lr for the cosine schedule.")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (not applied to biases, norms, logit_scale, embeddings).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.98, "AdamW beta2.")
    eps: float = opt(1e-6, "AdamW epsilon.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    seed: int = opt(0, "Seed for initialisation, data order, augmentation and dropout.")
    # model handling
    image_size: int = opt(0, "Image size to train and save the model at, position embeddings resampled (0: the model's own).")
    resolutions: str = opt("", "Comma-separated image sizes, e.g. '48,64': each step trains at one drawn from the set.")
    progressive_resolution: bool = opt(False, "Train at --resolutions from the smallest to the largest in equal phases "
                                       "(RECLIP); without --resolutions, at half then full size.")
    patch_dropout: float = opt(0.0, "Fraction of image patch tokens dropped in training steps (not in evaluation).")
    dtype: str = opt("auto", "Precision policy: auto (float32 on CPU, bfloat16 on GPU), float32, bf16-mixed (bf16 compute, "
                     "fp32 master weights and optimizer state), bfloat16, float16 (dynamic loss scaling).",
                     choices=["auto", "float32", "bf16-mixed", "bfloat16", "float16"])
    attention_chunk: int = opt(0, "Compute attention in chunks of N tokens (online softmax): same output, no full score "
                               "matrix; 0: off. A CPU / Metal technique: on CUDA the fused attention keeps no score "
                               "matrix, and chunks raised the peak there (+14-23%, benchmarks/results/memory-cuda.md).")
    grad_checkpoint: bool = opt(False, "Recompute each transformer block in the backward pass instead of storing its "
                                "activations (less memory, about a third more compute).")
    lock_image: bool = opt(False, "Freeze the image tower (LiT when the text tower trains).")
    lock_text: bool = opt(False, "Freeze the text tower.")
    unlock_last: int = opt(0, "With a locked tower, keep its last N transformer layers (and final norm/projection) trainable.")
    layer_decay: float = opt(1.0, "Layer-wise LR decay: layer i of L gets lr * decay**(L - i); 1.0 disables.")
    lora_rank: int = opt(0, "LoRA rank; > 0 trains low-rank adapters only (base frozen).")
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path.")
    lora_targets: str = opt("q_proj,k_proj,v_proj,out_proj,fc1,fc2", "Comma-separated layer names that get adapters.")
    loss: str = opt("clip", "Loss spec NAME[:weight],... from clip, siglip, multi_positive, hard_negative, "
                    "mined_negative, negclip, multiscale (e.g. 'clip', 'multi_positive', 'clip:1,siglip:0.5', "
                    "'clip:1,negclip:0.5').")
    hn_beta: float = opt(1.0, "hard_negative: hardness beta (0 = plain InfoNCE negatives).")
    hn_tau_plus: float = opt(0.0, "hard_negative: debiasing class prior tau+ (0 = no debiasing).")
    bank_size: int = opt(1024, "mined_negative: entries in the FIFO bank of recent (detached) text and image "
                         "embeddings; saved with checkpoints.")
    bank_k: int = opt(16, "mined_negative: the k hardest bank entries not matching a sample (another class, or for "
                      "unlabelled pairs another sample) added as its negatives.")
    scales: str = opt("1.0,0.4,0.4", "multiscale: one view per entry, a random-resized crop whose area range is "
                      "--augment-scale times the entry (1.0: the global view, first; 0.4: a local crop), all at the "
                      "model's image size.")
    view_weights: str = opt("", "multiscale: comma-separated weight per --scales view (normalised; default uniform).")
    temperature: str = opt("learnable", "logit_scale: 'learnable' (the default for fine-tuning: starts at the "
                           "checkpoint's value, pretrained CLIPs sit at 100 = temperature 0.01, clamped to "
                           "exp <= 100), 'fixed' at the model's value, or 'scheduled' (--temperature-schedule).",
                           choices=["learnable", "fixed", "scheduled"])
    temperature_schedule: str = opt("", "scheduled temperature: '[KIND:]START:END', the logit-scale multiplier (1/T, "
                                    "in [1, 100]) from START at step 1 to END at the last step, KIND cosine (default), "
                                    "linear or exp; '' = cosine from the model's value to 100. The final model "
                                    "keeps END.")
    accum_freq: int = opt(1, "Encode each batch in this many micro-batches (GradCache): less memory, same gradient.")
    # domain presets and adapters (mlx_clip.domains, mlx_clip.adapters)
    domain: str = opt("", "Domain preset filling the options not given: prompt templates, augmentation policy and "
                      "recommended method/hyper-parameters.", choices=["", "medical", "industrial", "scientific"])
    adapter: str = opt("full", "Method: full, lit (image tower locked), lora, clip-adapter, tip-adapter (training-free "
                       "cache; with --steps > 0 the keys are fine-tuned: Tip-Adapter-F), coop (learned prompt context).",
                       choices=["full", "lit", "lora", "clip-adapter", "tip-adapter", "coop"])
    adapter_ratio: float = opt(0.2, "clip-adapter: residual ratio (weight of the adapted feature).")
    tip_alpha: float = opt(1.0, "tip-adapter: weight of the cache logits.")
    tip_beta: float = opt(5.5, "tip-adapter: sharpness of the cache affinities.")
    coop_ctx: str = opt("a photo of a", "coop: the learned context's initial words (their count is the context length).")
    normalize_from_data: bool = opt(False, "Normalise images with per-channel mean/std computed from --train-data "
                                    "(see `mlxclip data stats`); saved with the final model.")
    # augmentation and loading
    augment_scale: str = opt("0.6,1.0", "Random-resized-crop area range 'lo,hi' for training images.")
    hflip: bool = opt(False, "Random horizontal flips in training.")
    rotate90: bool = opt(False, "Random rotations by multiples of 90 degrees in training (images without an 'up': "
                         "micrographs, surfaces; not charts or anatomy).")
    workers: int = opt(2, "Decoding/augmentation threads.")
    prefetch: int = opt(2, "Batches prepared ahead.")
    max_bad_fraction: float = opt(0.01, "Abort when more than this fraction of images is unreadable.")
    # bookkeeping
    eval_every: int = opt(0, "Evaluate on --val-data every N steps (0: only at the end).")
    save_every: int = opt(0, "Write a checkpoint every N steps (0: only at the end).")
    keep_last: int = opt(2, "Checkpoints to keep.")
    resume: str = opt("", "'latest' or a checkpoint dir to continue from.")
    log_every: int = opt(10, "Write a metrics line every N steps.")
    report_to: str = opt("", "Extra trackers: comma-separated from tensorboard, mlflow.")
    eval_batch_size: int = opt(64, "Batch size for evaluation.")

    @property
    def scale_range(self) -> tuple[float, float]:
        lo, hi = (float(x) for x in self.augment_scale.split(","))
        return lo, hi

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainingArgs)}


def load_yaml(path) -> dict:
    """A YAML mapping of TrainingArgs fields (dashes or underscores); unknown keys are an error naming them."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return {k: _typed(k, v, path) for k, v in data.items()}


def _typed(name: str, value, path):
    """A YAML value as its field's type. PyYAML reads `1e-5` (no dot) as a string, so floats are parsed here."""
    kind = type(FIELDS[name].default)
    if "parse" in FIELDS[name].metadata:
        try:
            return FIELDS[name].metadata["parse"](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: option {name}: {exc}") from exc
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{path}: option {name} expects {kind.__name__}, got {value!r}")


def resolve_args(flags: dict, config_file: str | None = None) -> TrainingArgs:
    """defaults < YAML < flags; `flags` holds only the options given on the command line."""
    values = load_yaml(config_file) if config_file else {}
    values.update(flags)
    from mlx_clip.domains import fill_defaults

    values = fill_defaults(values)  # --domain preset and --adapter method fill what neither YAML nor flags gave
    for name in values:  # values given as text (Python callers), e.g. batch_size="auto"
        if "parse" in FIELDS[name].metadata:
            values[name] = FIELDS[name].metadata["parse"](values[name])
    args = TrainingArgs(**values)
    _validate(args)
    return args


def _validate(args: TrainingArgs) -> None:
    problems = []
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(args, name) not in choices:
            problems.append(f"{name} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    if args.batch_size < 0:
        problems.append("batch_size must be >= 1 or 'auto'")
    if not 0 <= args.patch_dropout < 1:
        problems.append("patch_dropout must be in [0, 1)")
    if args.attention_chunk < 0:
        problems.append("attention_chunk must be >= 0")
    if args.lr <= 0:
        problems.append("lr must be > 0")
    try:
        lo, hi = args.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError
    except ValueError:
        problems.append(f"augment_scale must be 'lo,hi' with 0 < lo <= hi <= 1, got {args.augment_scale!r}")
    from mlx_clip.train.loss_inputs import loss_option_problems

    problems += loss_option_problems(args)
    if problems:
        raise ValueError("invalid training options: " + "; ".join(problems))
