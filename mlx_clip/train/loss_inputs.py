"""Step inputs beyond (images, ids, labels) for the losses that need them, built outside the compiled step.

- mined_negative: a `NegativeBank` of recent text and image embeddings, explicit state kept here. Its full arrays
  (one shape from step 1 on, unfilled slots masked) go into the step as inputs; the step writes the global batch's
  detached, normalized features to `outputs`; `after_step` pushes them into the bank. The bank is saved with each
  checkpoint, so a resumed run equals the uninterrupted one.
- negclip: the batch captions perturbed by `perturb_captions`, seeded by (seed, step) so a resumed run draws the same,
  tokenized; their text features are extra image->text negatives. A caption no swap can change is masked out.
- --temperature scheduled: the step's logit-scale multiplier, an input (a Python float would be a constant of the
  compiled graph and retrace it every step).
- multiscale: the loader's views (`LoaderConfig.views`, images (B, V, H, W, 3)); nothing per step.

The step's inputs are then a dict (`"labels"` plus the above) in the place of the labels array. `outputs` rides in the
compiled step's state as the model's private `_loss_outputs`: it is in `model.state`, which the step takes and
returns, but not a parameter (MLX skips names starting with '_'), so it survives every wrapper of the loss.
"""

from __future__ import annotations

import math
import random
import zlib

import mlx.core as mx
import numpy as np

from mlx_clip.losses import TEMPERATURE_KINDS, NegativeBank, parse_loss_spec, perturb_captions, temperature_schedule
from mlx_clip.tokenizer import trim_padding
from mlx_clip.train import distributed as dist

EXTRA_INPUT_LOSSES = ("mined_negative", "negclip", "multiscale")
MAX_LOGIT_SCALE = 100.0  # the clamp of a learnable scale, and a scheduled one's default end


def loss_names(args) -> set[str]:
    return {name for name, _ in parse_loss_spec(args.loss)}


# ---- option parsing: every error names its flag ---------------------------------------------------------------------


def parse_views(args) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(--scales, --view-weights) as tuples: one area scale per view, one weight per view (uniform by default)."""
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        raise ValueError(f"--scales {args.scales!r}: expected comma-separated numbers, e.g. '1.0,0.4,0.4'") from None
    if not all(0 < s <= 1 for s in scales):
        raise ValueError(f"--scales {args.scales!r}: each view's area scale must be in (0, 1]")
    if not args.view_weights.strip():
        return scales, (1.0,) * len(scales)
    try:
        weights = tuple(float(w) for w in args.view_weights.split(","))
    except ValueError:
        raise ValueError(f"--view-weights {args.view_weights!r}: expected comma-separated numbers") from None
    if len(weights) != len(scales):
        raise ValueError(f"--view-weights {args.view_weights!r}: {len(weights)} weights for {len(scales)} "
                         "--scales views")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--view-weights {args.view_weights!r}: weights must be finite, >= 0 and not all 0")
    return scales, weights


def parse_temperature_schedule(text: str, default_start: float = MAX_LOGIT_SCALE) -> tuple[str, float, float]:
    """'[KIND:]START:END' -> (kind, start, end) logit-scale multipliers; '' -> cosine from `default_start` to 100."""
    if not text.strip():
        return "cosine", float(default_start), MAX_LOGIT_SCALE
    parts = [p.strip() for p in text.split(":")]
    kind = parts.pop(0) if len(parts) == 3 else "cosine"
    problem = None
    if len(parts) != 2 or kind not in TEMPERATURE_KINDS or kind == "fixed":
        problem = "expected [KIND:]START:END with KIND one of linear, cosine, exp (e.g. 'cosine:10:100')"
    else:
        try:
            start, end = float(parts[0]), float(parts[1])
        except ValueError:
            start = end = math.nan
        if not (1 <= start <= MAX_LOGIT_SCALE and 1 <= end <= MAX_LOGIT_SCALE):
            problem = f"START and END are logit-scale multipliers (1/temperature) in [1, {MAX_LOGIT_SCALE:g}]"
    if problem:
        raise ValueError(f"--temperature-schedule {text!r}: {problem}")
    return kind, start, end


def loss_option_problems(args) -> list[str]:
    """What is wrong with the loss options and their combinations (each naming its flag); [] when all is well."""
    try:
        names = loss_names(args)
    except ValueError as exc:
        return [f"--loss: {exc}"]
    problems = []
    checks = [(args.bank_size >= 1, f"--bank-size must be >= 1, got {args.bank_size}"),
              (args.bank_k >= 1, f"--bank-k must be >= 1, got {args.bank_k}")]
    if "mined_negative" in names:
        problems += [msg for ok, msg in checks if not ok]
        if args.bank_k > args.bank_size >= 1:
            problems.append(f"--bank-k {args.bank_k} is larger than --bank-size {args.bank_size}")
    if "multiscale" in names:
        try:
            parse_views(args)
        except ValueError as exc:
            problems.append(str(exc))
        if args.resolutions or args.progressive_resolution:
            problems.append("--loss multiscale cannot be combined with --resolutions / --progressive-resolution "
                            "(the views already set the image scales)")
    if args.temperature == "scheduled":
        try:
            parse_temperature_schedule(args.temperature_schedule)
        except ValueError as exc:
            problems.append(str(exc))
    needs_inputs = sorted(names & set(EXTRA_INPUT_LOSSES))
    if needs_inputs and args.batch_size == 0:
        problems.append(f"--batch-size auto cannot be combined with --loss {','.join(needs_inputs)} yet (the memory "
                        "probe runs plain batches); give --batch-size")
    encoded_extra = sorted(names & {"negclip", "multiscale"})
    if encoded_extra and args.accum_freq > 1:
        problems.append(f"--accum-freq {args.accum_freq} cannot be combined with --loss {','.join(encoded_extra)} "
                        "(their extra captions / views are encoded inside the step)")
    return problems


def check_loss_options(args) -> None:
    problems = loss_option_problems(args)
    if problems:
        raise ValueError("invalid loss options: " + "; ".join(problems))


def sample_ids(batch: dict) -> np.ndarray:
    """Who may not be a sample's mined negative: its class label when labelled (same-class captions are near-
    duplicates, not negatives), else the sample itself (a stable id from its key, seen again next epoch). Never -1."""
    keys = [zlib.crc32(str(k).encode()) & 0x3FFFFFFF for k in batch["keys"]]
    labels = np.asarray(batch["labels"], dtype=np.int64)
    return np.where(labels >= 0, labels, -2 - np.asarray(keys, dtype=np.int64)).astype(np.int32)


# ---- the per-step inputs ----------------------------------------------------------------------------------------


class LossInputs:
    """`inputs(step, batch, labels)` -> the step's third argument; `after_step(applied)` refreshes the bank.

    `outputs` is the dict the loss writes the batch's features to (`make_loss_fn(..., outputs=)`); for mined_negative
    it is put in the model's state as `_loss_outputs`, so build the step after this. `state_arrays` /
    `load_state_arrays` carry the bank through checkpoints.
    """

    def __init__(self, args, model, tokenizer, total_steps: int, outputs: dict | None):
        names = loss_names(args)
        self.seed, self.total = args.seed, total_steps
        self.tokenize = tokenizer.tokenize_numpy if "negclip" in names else None
        self.bank = self.outputs = None
        if "mined_negative" in names:
            dim = model.config.projection_dim
            self.bank, self.outputs = NegativeBank(args.bank_size, dim), outputs
            # the step's outputs start at their final shapes, so the compiled step traces once
            outputs.update(image=mx.zeros((args.batch_size, dim)), text=mx.zeros((args.batch_size, dim)),
                           ids=mx.zeros((args.batch_size,), dtype=mx.int32))
            model._loss_outputs = outputs
        self.schedule = None
        if args.temperature == "scheduled":
            start = math.exp(model.logit_scale.item())
            self.schedule = parse_temperature_schedule(args.temperature_schedule, min(start, MAX_LOGIT_SCALE))

    @property
    def needed(self) -> bool:
        return any(x is not None for x in (self.tokenize, self.bank, self.schedule))

    def logit_scale_at(self, step: int) -> float:
        """The scheduled multiplier of 1-based `step` (as the LR schedule: step 1 sees the start value)."""
        kind, start, end = self.schedule
        return temperature_schedule(kind, step - 1, self.total, start, end)

    def inputs(self, step: int, batch: dict, labels: mx.array) -> dict:
        out = {"labels": labels}
        if self.bank is not None:
            image, text, ids = self.bank.arrays()
            out.update(bank_image=image, bank_text=text, bank_ids=ids, sample_ids=mx.array(sample_ids(batch)))
        if self.tokenize is not None:
            captions = list(batch["texts"])
            perturbed = perturb_captions(captions, random.Random(dist.step_seed(self.seed, step)))
            out["neg_ids"] = mx.array(trim_padding(self.tokenize(perturbed)))
            out["neg_valid"] = mx.array([p != c for p, c in zip(perturbed, captions)])
        if self.schedule is not None:
            out["logit_scale"] = mx.array(self.logit_scale_at(step), dtype=mx.float32)
        return out

    def after_step(self, applied: bool) -> None:
        """Push the step's features into the bank; a skipped (non-finite) step's features are not kept."""
        if self.bank is not None and applied:
            self.bank.update(self.outputs["image"], self.outputs["text"], self.outputs["ids"])

    def state_arrays(self) -> dict[str, mx.array] | None:
        return None if self.bank is None else {f"bank.{k}": v for k, v in self.bank.state_dict().items()}

    def load_state_arrays(self, arrays: dict[str, mx.array] | None) -> None:
        if self.bank is None:
            return
        if not arrays:
            raise ValueError("the checkpoint has no negative bank: resume --loss mined_negative runs from checkpoints "
                             "written with it")
        self.bank.load_state_dict({k.removeprefix("bank."): v for k, v in arrays.items() if k.startswith("bank.")})
