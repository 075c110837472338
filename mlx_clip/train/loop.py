"""The training loop: a plain function over batches, a compiled step, and callbacks for eval, checkpoints and logs."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from mlx_clip import cpu_streams
from mlx_clip.switches import env_switch
from mlx_clip.tokenizer import pack_rows, trim_padding
from mlx_clip.train import distributed as dist

# Text batches packed on the CPU (tokenizer.pack_rows; `packed_rows`): the text tower's dense layers run on real
# tokens only. MLXCLIP_PACK_TEXT=0 keeps the padded rows. Their attention by key windows where the rows allow
# (mlx_clip.packed_attention); MLXCLIP_PACK_WINDOWS=0 keeps the (T, T) mask.
PACK_TEXT = env_switch("MLXCLIP_PACK_TEXT", True)
PACK_WINDOWS = env_switch("MLXCLIP_PACK_WINDOWS", True)
# What a queued step hands the device at once: its loss, gradient norm and flag, and (QUEUE_STATE, the default) the
# parameter and moment updates. MLX keeps only 10 command buffers in flight, so the device's lead over the host when a
# step is queued is what its last ~1,000 ops take: ~8 ms of the optimizer's small kernels, less than the ~12-16 ms the
# host then spends tracing the next step (ViT-B/16 on an H200: the device idles 6-15 ms a step,
# benchmarks/results/gpu-s21-h200.md). MLXCLIP_QUEUE_STATE=0 leaves the updates to the next step's queueing (its
# forward needs them), so the last ops in flight are the backward's and the norm's, heavier ones. The same speed on
# the CPU (small b32: 323.8 vs 320.1 ms) and on an H200 (session 22, ViT-B/16, alternating processes: 89.4 / 93.4 ms
# against 91.6 / 92.8 with the default, benchmarks/results/gpu-s22-h200.md §1): opt-in.
QUEUE_STATE = env_switch("MLXCLIP_QUEUE_STATE", True)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is left intact."""


@dataclass
class LoopHooks:
    """What the loop calls out to. Each receives the 1-based number of the step just finished."""

    log: Callable[[dict], None] = lambda record: None
    evaluate: Callable[[int], dict] | None = None
    checkpoint: Callable[[int, dict], None] | None = None
    lr_at: Callable[[int], float] = lambda step: float("nan")
    progress: object = None  # tqdm-like: update(n), set_postfix(dict)
    extra_state: dict = field(default_factory=dict)
    # Losses that need more than the batch (loss_inputs.LossInputs): step inputs built from the batch, and what to do
    # once the step has run (refresh a negative bank); called with the step's number, its batch and labels.
    step_inputs: Callable[[int, dict, mx.array], object] | None = None
    after_step: Callable[[bool], None] | None = None


def trimmed_rows(ids: np.ndarray) -> mx.array:
    """Token rows as the step gets them: padding after the longest caption cut (exact: tokenizer.trim_padding); a few
    shapes, so a few traces."""
    return mx.array(trim_padding(ids))


def packed_rows(model) -> Callable[[np.ndarray], mx.array | dict]:
    """Token rows packed for `model`'s text tower (tokenizer.pack_rows), one group per slice batch-parallel mode cuts
    the batch into, as a dict of arrays `CLIP.encode_text` takes; trimmed rows where packing does not apply. Each
    packed length (a multiple of 32 tokens) is one trace of the compiled step."""
    def rows(ids: np.ndarray):
        trimmed = trim_padding(ids)
        eot = np.array(model.text_model.eot_positions(trimmed))
        packed = pack_rows(trimmed, eot, cpu_streams.groups_for(len(trimmed)), windowed=PACK_WINDOWS)
        return mx.array(trimmed) if packed is None else {k: mx.array(v) for k, v in packed.items()}

    return rows


def text_rows_for(model, losses_need_rows: bool, accum_freq: int):
    """The training loop's token rows: packed on the CPU (MLXCLIP_PACK_TEXT), unless a loss input works on the rows
    themselves (negclip's perturbed captions join them), gradient accumulation cuts them into micro-batches, or the
    text tower's attention is sliced (`--attention-chunk`: causal or no mask only)."""
    sliced = any(layer.self_attn.chunk for layer in model.text_model.encoder.layers)
    pack = PACK_TEXT and cpu_streams.on_cpu() and not (losses_need_rows or sliced) and accum_freq == 1
    return packed_rows(model) if pack else trimmed_rows


def unique_missing_labels(labels: np.ndarray) -> np.ndarray:
    """Unlabelled pairs (-1) become distinct negative ids, so label-aware losses treat each as its own class."""
    missing = labels < 0
    return np.where(missing, -1 - np.arange(len(labels)), labels) if missing.any() else labels


def train(step_fn, batches: Iterator[dict], start_step: int, total_steps: int, hooks: LoopHooks,
          log_every: int = 10, eval_every: int = 0, save_every: int = 0, max_bad_steps: int = 3,
          state_fn: Callable[[], list] = lambda: [], seed: int = 0,
          text_rows: Callable[[np.ndarray], object] = trimmed_rows) -> dict:
    """Run `step_fn(images, ids, labels)` from `start_step` to `total_steps`; return the last train record.

    `labels` is the batch's label array, or `hooks.step_inputs(step, batch, labels)` when that hook is set; `ids` is
    `text_rows(batch["input_ids"])` (trimmed, or packed: `text_rows_for`).

    Steps are pipelined: step s + 1 is built and queued before step s's numbers are read, so the host's work on the
    next step (tracing the graph, encoding its kernels) overlaps the device's on this one. On a GPU that work is a
    large part of a step (ViT-B/16 on an H200: the device sat idle for the first 11-18 ms of each ~95 ms step,
    benchmarks/results/gpu-s21-h200.md). A step whose state a hook needs (evaluation, checkpoint, the loss inputs'
    hooks) is finished before the next one is queued or its batch drawn, so they see that step's model and data
    position; the numbers, logs and the non-finite stop are the same as one step at a time."""
    books = _Books(hooks, log_every, eval_every, save_every, total_steps, max_bad_steps)
    pending = None
    for step in range(start_step + 1, total_steps + 1):
        if pending is not None and books.needs_state(pending.step):
            books.finish(pending)
            pending = None
        try:
            batch = next(batches)
        except BaseException:  # the data ran out or failed: the step already run is still logged
            if pending is not None:
                books.finish(pending)
            raise
        launched = _launch(step_fn, step, batch, hooks, seed, text_rows, state_fn)
        if pending is not None:
            books.finish(pending)
        pending = launched
    if pending is not None:
        books.finish(pending)
        mx.eval(state_fn())
    return books.record


@dataclass
class _Launched:
    """A step handed to the device, not yet read back."""

    step: int
    pairs: int  # this rank's image-text pairs
    loss: mx.array
    norm: mx.array
    applied: mx.array


def _launch(step_fn, step: int, batch: dict, hooks: LoopHooks, seed: int, text_rows, state_fn) -> _Launched:
    # Randomness inside the step (dropout) depends only on (seed, step): a resumed run draws the same numbers.
    mx.random.seed(dist.step_seed(seed, step))
    images, ids = mx.array(batch["images"]), text_rows(batch["input_ids"])
    labels = mx.array(unique_missing_labels(batch["labels"]).astype(np.int32))
    inputs = hooks.step_inputs(step, batch, labels) if hooks.step_inputs else labels
    loss, norm, applied = step_fn(images, ids, inputs)
    queue(loss, norm, applied, state=state_fn())
    return _Launched(step, len(batch["texts"]), loss, norm, applied)


def queue(*outputs: mx.array, state) -> None:
    """Hand a step's `outputs` (loss, norm, flag) to the device without waiting, and its `state` with QUEUE_STATE;
    without it the updates are evaluated with the next step, or by whoever reads them (a checkpoint, the loop's end)."""
    if QUEUE_STATE:
        mx.async_eval(*outputs, state)
    else:
        mx.async_eval(*outputs)


class _Books:
    """What the loop keeps between steps: the run of non-finite steps, the log window, the last record."""

    def __init__(self, hooks: LoopHooks, log_every: int, eval_every: int, save_every: int, total_steps: int,
                 max_bad_steps: int):
        self.hooks, self.log_every, self.total_steps, self.max_bad_steps = hooks, log_every, total_steps, max_bad_steps
        self.eval_every, self.save_every = eval_every, save_every
        self.bad_in_a_row, self.record, self.window = 0, {}, []
        self.tick = time.perf_counter()
        mx.reset_peak_memory()  # each record's peak_memory_gb is the peak of its own log interval

    def evaluates(self, step: int) -> bool:
        return bool(self.hooks.evaluate and self.eval_every and step % self.eval_every == 0)

    def saves(self, step: int) -> bool:
        return bool(self.hooks.checkpoint and self.save_every and step % self.save_every == 0)

    def needs_state(self, step: int) -> bool:
        """Whether finishing `step` uses the model, the optimizer or the data position as that step left them."""
        return bool(self.hooks.after_step or self.hooks.step_inputs or self.evaluates(step) or self.saves(step))

    def finish(self, done: _Launched) -> None:
        """Read `done`'s numbers (waiting for it), then log, count a skipped step, evaluate and checkpoint."""
        hooks, step, applied = self.hooks, done.step, bool(done.applied.item())
        if hooks.after_step:  # before any checkpoint of this step, which must hold what the step left
            hooks.after_step(applied)
        loss_value = done.loss.item()
        self.window.append(loss_value)
        if not applied:
            self.bad_in_a_row += 1
            print(f"step {step}: non-finite loss/gradient ({loss_value}, grad norm {done.norm.item()}); update "
                  "skipped", file=sys.stderr)
        else:
            self.bad_in_a_row = 0
        if hooks.progress is not None:  # tqdm shows steps/s and the ETA; images/s and loss ride in the postfix
            hooks.progress.update(1)
            steps_per_s = (getattr(hooks.progress, "format_dict", {}) or {}).get("rate") or 0.0
            rate = done.pairs * dist.world_size() * steps_per_s  # global images/s
            hooks.progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
        if step % self.log_every == 0 or step == self.total_steps or not applied:
            now = time.perf_counter()
            self.record = _train_record(step, loss_value, self.window, done.norm.item(), hooks.lr_at(step - 1),
                                        done.pairs * dist.world_size() * len(self.window) / (now - self.tick),
                                        applied)  # global images/s
            hooks.log(self.record)
            self.tick, self.window = now, []
            mx.reset_peak_memory()
        if self.bad_in_a_row >= self.max_bad_steps:  # after logging: metrics.jsonl shows the step that stopped it
            raise NonFiniteLossError(f"{self.bad_in_a_row} non-finite steps in a row at step {step}; stopping "
                                     "(the last checkpoint is intact; lower --lr or check the data)")
        if self.evaluates(step) and step != self.total_steps:
            hooks.log({"step": step, **hooks.evaluate(step)})
        if self.saves(step) and step != self.total_steps and not self.bad_in_a_row:
            hooks.checkpoint(step, hooks.extra_state)


def _train_record(step, loss, window, grad_norm, lr, images_per_s, applied) -> dict:
    finite = [x for x in window if math.isfinite(x)]
    return {
        "step": step,
        "loss": loss,  # this step's loss: equal across resumed and uninterrupted runs
        "loss_avg": sum(finite) / len(finite) if finite else float("nan"),  # mean since the last record
        "grad_norm": grad_norm,
        "lr": lr,
        "images_per_s": images_per_s,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,  # since the previous record
        "applied": applied,
    }
