"""Memory as a measured resource: sliced attention, per-block gradient checkpointing, the training step with every
technique switched by TrainingArgs, a batch-size search against a memory budget, and a peak-memory measurement.

The model imports the two kernels here (`sliced_attention`, `checkpointed`), so this module imports nothing of the
project at load time; the training pieces are imported where they are used.
"""

from __future__ import annotations

import gc
import re
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

# ---- attention in chunks -------------------------------------------------------------------------------------------


def sliced_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None, chunk: int = 128) -> mx.array:
    """softmax(q k^T * scale [+ causal mask]) v for (B, H, L, Dh) inputs, computed `chunk` queries against `chunk` keys
    at a time with an online softmax (flash attention's running max and sum), so no (L, L) score matrix ever exists:
    the forward pass keeps only the output and each row's log-sum-exp, and the backward pass recomputes each block's
    probabilities from them (flash attention's backward). `mask` is None or "causal".

    MLX schedules independent branches of a graph side by side (breadth first, up to 20 wide), which would put every
    block's scores in memory at once; `mx.depends` chains the blocks so that they run one after another.
    """
    if not (mask is None or isinstance(mask, str) and mask == "causal"):  # `in` would compare an array elementwise
        raise ValueError(f"sliced attention supports mask=None or 'causal', got {type(mask).__name__}")
    return _sliced(int(chunk), float(scale), mask == "causal")(q, k, v)[0]


def _blocks(n_queries: int, n_keys: int, chunk: int, causal: bool):
    """(query start, query stop, [(key start, key stop), ...]) per query chunk; causal skips keys past the queries."""
    for qs in range(0, n_queries, chunk):
        qe = min(qs + chunk, n_queries)
        stop = min(n_keys, qe) if causal else n_keys
        yield qs, qe, [(ks, min(ks + chunk, stop)) for ks in range(0, stop, chunk)]


def _scores(q, k, qs, ks, scale, causal):
    """One block of scaled scores in fp32, -inf where a key lies after its query (causal)."""
    s = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale  # (B, H, q block, k block)
    if causal and ks + k.shape[2] - 1 > qs:  # this block reaches past the diagonal
        visible = mx.arange(ks, ks + k.shape[2])[None, :] <= mx.arange(qs, qs + q.shape[2])[:, None]
        s = mx.where(visible, s, -mx.inf)
    return s


def _after(x: mx.array, previous):
    return x if previous is None else mx.depends(x, previous)


@lru_cache(maxsize=None)
def _sliced(chunk: int, scale: float, causal: bool):
    @mx.custom_function
    def attention(q, k, v):
        outs, lses, previous = [], [], None
        for qs, qe, keys in _blocks(q.shape[2], k.shape[2], chunk, causal):
            row_max = total = acc = None
            for ks, ke in keys:
                qc = _after(q[:, :, qs:qe], previous)
                s = _scores(qc, k[:, :, ks:ke], qs, ks, scale, causal)
                # Key 0 is visible to every query, so the first block gives every row a finite max.
                new_max = s.max(-1, keepdims=True) if row_max is None else mx.maximum(row_max, s.max(-1, keepdims=True))
                p = mx.exp(s - new_max)
                part = (p.astype(v.dtype) @ v[:, :, ks:ke]).astype(mx.float32)  # (B, H, q block, Dh)
                if row_max is None:
                    total, acc = p.sum(-1, keepdims=True), part
                else:
                    correction = mx.exp(row_max - new_max)  # what was summed under the old max, rescaled
                    total, acc = total * correction + p.sum(-1, keepdims=True), acc * correction + part
                row_max, previous = new_max, [acc, total]  # both, or a block's p.sum could wait, keeping p alive
            outs.append((acc / total).astype(q.dtype))
            lses.append(row_max + mx.log(total))  # (B, H, q block, 1)
        return mx.concatenate(outs, axis=2), mx.concatenate(lses, axis=2)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v = primals
        out, lse = outputs
        d_out = cotangents[0].astype(mx.float32)
        delta = (d_out * out.astype(mx.float32)).sum(-1, keepdims=True)  # rowsum(dO * O): softmax's Jacobian term
        n_key_blocks = -(-k.shape[2] // chunk)
        dq_parts, dk, dv, previous = [], [None] * n_key_blocks, [None] * n_key_blocks, None
        for qs, qe, keys in _blocks(q.shape[2], k.shape[2], chunk, causal):
            dq = None
            for ks, ke in keys:
                qc = _after(q[:, :, qs:qe], previous)
                kc, vc, doc = k[:, :, ks:ke], v[:, :, ks:ke], d_out[:, :, qs:qe]
                p = mx.exp(_scores(qc, kc, qs, ks, scale, causal) - lse[:, :, qs:qe])  # this block's probabilities
                ds = p * (doc @ vc.astype(mx.float32).swapaxes(-1, -2) - delta[:, :, qs:qe]) * scale
                j = ks // chunk
                dv[j] = _add(dv[j], p.swapaxes(-1, -2) @ doc)
                dk[j] = _add(dk[j], ds.swapaxes(-1, -2) @ qc.astype(mx.float32))
                dq = _add(dq, ds @ kc.astype(mx.float32))
                previous = [dq, dk[j], dv[j]]
            dq_parts.append(dq)
        cat = lambda parts, like: mx.concatenate(parts, axis=2).astype(like.dtype)  # noqa: E731
        return cat(dq_parts, q), cat(dk, k), cat(dv, v)

    return attention


def _add(total, part):
    return part if total is None else total + part


# ---- gradient checkpointing ----------------------------------------------------------------------------------------


def checkpointed(layer, x: mx.array, *args, call=None) -> mx.array:
    """`layer(x, *args)` (or `call(x, *args)`, a method of the layer) whose activations are recomputed in the backward
    pass instead of kept (mx.checkpoint).

    The layer's trainable parameters are explicit inputs of the checkpointed function, so their gradients flow
    (mlx-lm's pattern); frozen ones are constants. Randomness inside the layer (LoRA dropout) would be redrawn on
    recomputation, so keep it off when checkpointing.
    """

    def run(params, x):
        layer.update(params)
        return (call or layer)(x, *args)

    return mx.checkpoint(run)(layer.trainable_parameters(), x)


def configure(model, attention_chunk: int | None = None, grad_checkpoint: bool | None = None):
    """Switch the memory techniques of every transformer in `model` (None leaves a switch as it is)."""
    for _, module in model.named_modules():
        if attention_chunk is not None and hasattr(module, "chunk") and hasattr(module, "q_proj"):
            module.chunk = int(attention_chunk)
        if grad_checkpoint is not None and hasattr(module, "grad_checkpoint"):
            module.grad_checkpoint = bool(grad_checkpoint)
    return model


# ---- the training step with every technique ------------------------------------------------------------------------


def build_train_step(model, optimizer, loss_fn, args):
    """`step(images, ids, labels) -> (loss, grad_norm, applied)` under --dtype's precision policy (master weights,
    loss scaling) and --patch-dropout; the compiled step itself is `make_step`'s."""
    from mlx_clip.precision import policy_loss, resolve_policy, scaled_step
    from mlx_clip.resolution import with_patch_dropout
    from mlx_clip.train.step import make_step

    policy = resolve_policy(args.dtype)
    if args.accum_freq > 1 and (policy.casts or policy.loss_scaling or args.patch_dropout > 0):
        raise ValueError(f"--accum-freq {args.accum_freq} cannot be combined with --dtype {policy.name} or "
                         "--patch-dropout yet (the micro-batch passes encode outside the policy's loss)")
    step = make_step(model, optimizer, policy_loss(loss_fn, policy, optimizer), args.grad_clip, args.accum_freq)
    if policy.loss_scaling:
        step = scaled_step(step, optimizer)
    return with_patch_dropout(step, model, args.patch_dropout)


# ---- the largest batch that fits -----------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'16GB' -> 16e9, '800MB', '12GiB', '1.5TB', or plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with a unit, e.g. 16GB, 800MB, 12GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# --memory-limit auto: one step's measured peak and a tenth more, so that a step's own work never waits on the limit and
# only queued work beyond it does. Why a limit at all: on CUDA MLX keeps every kernel's inputs until its command buffer
# completes, so a queued step's buffers pile onto the running one's (ViT-B/32 b256 on an H200: 13.1-14.8 GiB queued,
# benchmarks/results/gpu-s27-h200.md); a fixed limit below one step's need made each step wait (0.91x at 8 GiB).
AUTO_HEADROOM = 1.10


def one_step_limit(peak: int) -> int:
    """--memory-limit auto's limit for a step whose measured peak is `peak` bytes."""
    return int(peak * AUTO_HEADROOM)


def is_auto(text) -> bool:
    return isinstance(text, str) and text.strip().lower() == "auto"


@contextmanager
def limited_memory(text: str, flag: str = "--memory-limit"):
    """MLX's memory limit at `text` ('19GiB', '8GB', ...) inside the block, the previous one back after it; '' leaves
    MLX's own; 'auto' leaves it for the run to set from a measured step (`limit_to_one_step`), and puts the previous
    one back after the block too. Over the limit MLX holds queued work back until running work frees memory: on a
    GPU, where each kernel's inputs live until its command buffer completes, that bounds the buffers in flight, which
    otherwise set the peak (benchmarks/perf-notes.md, session 11)."""
    if not text:
        yield
        return
    if is_auto(text):
        previous = mx.get_memory_limit()
    else:
        try:
            limit = parse_bytes(text)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
        previous = mx.set_memory_limit(limit)
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def find_batch_size(peak_at: Callable[[int], float | None], budget: float, start: int = 1, limit: int = 4096):
    """The largest batch b in [start, limit] with peak_at(b) <= budget (None: it failed, e.g. out of memory), found by
    doubling from `start` and then bisecting; peak memory grows with the batch, so the first miss bounds the search.
    Returns (batch, [(batch tried, peak or None), ...])."""
    trials = []

    def fits(b):
        peak = peak_at(b)
        trials.append((b, peak))
        return peak is not None and peak <= budget

    if not fits(start):
        raise ValueError(f"even a batch of {start} does not fit the memory budget of {budget / 1e9:.3g} GB "
                         f"(peak {_gb(trials[-1][1])}); use a smaller model, LoRA, --grad-checkpoint or a larger budget")
    good, bad = start, None
    while bad is None and good < limit:
        b = min(good * 2, limit)
        good, bad = (b, None) if fits(b) else (good, b)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, trials


def synthetic_batch(config, batch: int, image_size: int, seed: int = 0):
    """Random pixels, token ids ending in EOT at a random length, and distinct labels: one step's input shapes."""
    rng = np.random.default_rng(seed)
    text = config.text_config
    ids = rng.integers(1, text.vocab_size - 1, (batch, text.max_position_embeddings))
    ends = rng.integers(1, text.max_position_embeddings, batch)
    ids[np.arange(batch), ends] = text.vocab_size - 1  # EOT, the largest id: argmax pooling finds it
    ids[np.arange(text.max_position_embeddings)[None, :] > ends[:, None]] = 0
    images = rng.standard_normal((batch, image_size, image_size, config.vision_config.num_channels))
    return mx.array(images.astype(np.float32)), mx.array(ids.astype(np.int32)), mx.arange(batch, dtype=mx.int32)


def step_peak(step_fn, state: list, config, batch: int, image_size: int, repeats: int = 2) -> int:
    """Peak memory (bytes) of a step at `batch` on synthetic data, the largest of `repeats` runs from the same state
    (the first call traces and may differ from later ones). Model and optimizer state are put back after each run, so
    no run sees a third copy of them; the random state is not (the training loop reseeds it before every step)."""
    saved = [[(k, v) for k, v in tree_flatten(s) if isinstance(v, mx.array)] for s in state]
    inputs = synthetic_batch(config, batch, image_size)
    mx.eval(inputs)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    try:
        for _ in range(repeats):
            mx.eval(step_fn(*inputs), state)
            _put_back(state, saved)
        return mx.get_peak_memory()
    finally:
        _put_back(state, saved)


def _put_back(state: list, saved: list) -> None:
    for root, leaves in zip(state, saved):
        for path, value in leaves:
            _set_path(root, path, value)


def _set_path(root, dotted: str, value) -> None:
    """Assign in place, inside the containers the compiled step holds (replacing them would detach it)."""
    *parents, last = dotted.split(".")
    for part in parents:
        root = root[int(part)] if isinstance(root, list) else root[part]
    root[int(last) if isinstance(root, list) else last] = value


def _to_stderr(line: str) -> None:
    """Where --batch-size auto and --memory-limit auto say what they chose, unless given a log."""
    print(line, file=sys.stderr, flush=True)


def _probe(model, args, loss_fn, use):
    """use(step_fn, state) with the real compiled step and a throwaway optimizer (the same state the run's will have),
    both freed after it: what --batch-size auto and --memory-limit auto measure."""
    from mlx_clip.train.optim import build_optimizer

    optimizer = build_optimizer(model, args, 1)
    step_fn = build_train_step(model, optimizer, loss_fn, args)
    try:
        return use(step_fn, [model.state, optimizer.state])
    finally:
        del optimizer, step_fn
        gc.collect()
        mx.clear_cache()


def choose_batch_size(model, args, loss_fn, image_size: int, limit: int = 4096, log=None) -> int:
    """--batch-size auto: the largest batch whose measured peak fits --memory-budget, trying the real compiled step
    (a throwaway optimizer with the same state) on synthetic batches. Says what it chose and why. Leaves MLX's memory
    limit at the budget."""
    log = log or _to_stderr
    budget = parse_bytes(args.memory_budget)

    def search(step_fn, state):
        # MLX allocates ahead of the computation up to its memory limit; at the budget, the probes and then the run
        # itself hold back to it (the limit stays set), so the run sees the peaks that were measured.
        mx.set_memory_limit(budget)
        return find_batch_size(lambda b: _try(step_fn, state, model.config, b, image_size), budget,
                               start=max(args.accum_freq, 1), limit=limit)

    batch, trials = _probe(model, args, loss_fn, search)
    tried = ", ".join(f"{b}: {_gb(p)}" for b, p in trials)
    log(f"--batch-size auto: {batch} per process, the largest whose measured peak fits {args.memory_budget} "
        f"({budget / 1e9:.3g} GB) at {image_size} px (peak by batch: {tried})")
    return batch


def limit_to_one_step(model, args, loss_fn, batch: int, image_size: int, log=None) -> int:
    """--memory-limit auto: MLX's memory limit set to one step's measured peak (the real compiled step on a synthetic
    batch of this size, captions at the full context) and AUTO_HEADROOM more; returns it. Losses with state of their
    own (a negatives bank) add theirs on top of what is measured here."""
    log = log or _to_stderr
    peak = _probe(model, args, loss_fn, lambda step_fn, state: step_peak(step_fn, state, model.config, batch,
                                                                         image_size))
    limit = one_step_limit(peak)
    mx.set_memory_limit(limit)
    log(f"--memory-limit auto: {_gb(limit)}, one step's measured peak ({_gb(peak)} at batch {batch}, {image_size} px) "
        f"and {AUTO_HEADROOM - 1:.0%} more")
    return limit


def batch_limit(records, world_size: int = 1, default: int = 4096) -> int:
    """The largest batch worth trying: one epoch's worth of this process's pairs (a stream has no length)."""
    try:
        return max(len(records) // world_size, 1)
    except TypeError:
        return default


def _try(step_fn, state, config, batch, image_size):
    try:
        return step_peak(step_fn, state, config, batch, image_size)
    except (RuntimeError, MemoryError):  # the allocator refused: this batch does not fit
        return None


def _gb(peak) -> str:
    return "failed" if peak is None else f"{peak / 1e9:.3f} GB"


# ---- the memory report ---------------------------------------------------------------------------------------------


def measure_training_memory(arch: str, batch: int, lora_rank: int = 0, attention_chunk: int = 0,
                            grad_checkpoint: bool = False, dtype: str = "auto", image_size: int = 0,
                            steps: int = 3, seed: int = 0) -> dict:
    """Peak memory and speed of full fine-tuning (or LoRA) steps of a random-init `arch` at `batch`, with the given
    techniques; the same model preparation and compiled step as `mlxclip finetune`. Peak covers every step (the first
    traces); speed the steps after the first."""
    from mlx_clip.config import get_config
    from mlx_clip.model import CLIP
    from mlx_clip.resolution import resize_image_size
    from mlx_clip.train.args import TrainingArgs
    from mlx_clip.train.lora import LoRAConfig, apply_lora
    from mlx_clip.train.optim import build_optimizer
    from mlx_clip.train.step import make_loss_fn

    mx.random.seed(seed)
    args = TrainingArgs(batch_size=batch, lora_rank=lora_rank, attention_chunk=attention_chunk,
                        grad_checkpoint=grad_checkpoint, dtype=dtype, image_size=image_size)
    model = CLIP(get_config(arch))
    if image_size:
        resize_image_size(model, image_size)
    apply_model_options(model, args)
    if lora_rank > 0:
        apply_lora(model, LoRAConfig(rank=lora_rank))
    size = model.config.vision_config.image_size
    optimizer = build_optimizer(model, args, steps)
    step_fn = build_train_step(model, optimizer, make_loss_fn("clip"), args)
    inputs = synthetic_batch(model.config, batch, size, seed)
    mx.eval(model.parameters(), optimizer.state, inputs)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(max(steps, 2)):
        tick = time.perf_counter()
        mx.eval(step_fn(*inputs), model.state, optimizer.state)
        times.append(time.perf_counter() - tick)
    step_seconds = float(np.median(times[1:]))
    return {"arch": arch, "batch": batch, "image_size": size, "lora_rank": lora_rank, "attention_chunk": attention_chunk,
            "grad_checkpoint": grad_checkpoint, "dtype": dtype, "peak_gb": mx.get_peak_memory() / 1e9,
            "step_seconds": step_seconds, "images_per_s": batch / step_seconds}


def apply_model_options(model, args):
    """The model-side options of TrainingArgs, after loading: precision policy (parameter dtype) and the memory
    techniques (attention chunks, gradient checkpointing)."""
    from mlx_clip.precision import apply_policy, resolve_policy

    apply_policy(model, resolve_policy(args.dtype))
    return configure(model, args.attention_chunk, args.grad_checkpoint)
