"""Data-parallel training under `mlx.launch`: the process group, a feature gather that carries gradients, gradient
averaging, and the small bits of bookkeeping (per-rank batch, per-rank data state, dropout seeds) the engine needs.

Every helper is the identity (and issues no collective) when the group has one process, so a plain `mlxclip finetune`
runs exactly the code it ran before. Under `mlx.launch -n N`:
- `--batch-size` is the global batch; each rank loads batch_size / N pairs (positions r, r+N, ... of the epoch order);
- the loss is computed on the global batch (`global_batch`): each rank all-gathers the features of every rank, so every
  pair in the global batch is a negative for every other, and gradients flow back to each rank's own features;
- gradients are averaged (`average_gradients`), so all ranks take the same optimizer step and stay identical.

Why the gradient is exact: every rank evaluates the same global loss L. `gather_with_grad`'s backward sums the
cotangents of all ranks before taking its own slice (as torch.distributed.nn's all_gather does), so rank r's encoder
gradient is N * dL/d(its share) and the loss heads (logit_scale, bias) get dL/dθ on every rank; the average over ranks
is then exactly dL/dθ of the global batch. MLX's built-in all_gather VJP only slices (no sum), which would leave the
encoder gradient N times too small relative to the heads; hence the custom function.
"""

from __future__ import annotations

import json
from functools import lru_cache

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

_BUCKET_BYTES = 32 << 20  # gradients are summed in buckets of about this size: few collectives, bounded extra memory


@lru_cache(maxsize=1)
def group() -> mx.distributed.Group:
    """The global group: the ranks started by `mlx.launch` (ring, JACCL, MPI or NCCL), or a group of one."""
    return mx.distributed.init()


def world_size() -> int:
    return group().size()


def rank() -> int:
    return group().rank()


def is_main() -> bool:
    """Rank 0 alone writes the run dir: config, metrics, checkpoints, evaluation, report and final model."""
    return rank() == 0


def per_rank_batch(batch_size: int) -> int:
    """`--batch-size` is the global batch (what a step sees, as in one process); each rank loads its share."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must divide evenly over {n} processes")
    return batch_size // n


# ---- the global batch ----------------------------------------------------------------------------------------------


@mx.custom_function
def gather_with_grad(x: mx.array) -> mx.array:
    """All ranks' `x` stacked along axis 0 in rank order (rank-major), differentiable."""
    return mx.distributed.all_gather(x, group=group())


@gather_with_grad.vjp
def _gather_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    b = x.shape[0]
    summed = mx.distributed.all_sum(cotangent, group=group())  # every rank's loss depends on this rank's rows
    return summed[rank() * b : (rank() + 1) * b]


def global_batch(image_features: mx.array, text_features: mx.array, labels):
    """The features and labels of the whole global batch (unchanged in one process).

    Labels are gathered for label-aware losses. Unlabelled pairs carry negative ids that are unique only within a
    rank (`unique_missing_labels`), so they are renumbered by global position, as one process would number them.
    """
    if world_size() == 1:
        return image_features, text_features, labels
    labels = mx.distributed.all_gather(mx.array(labels), group=group())
    labels = mx.where(labels < 0, -1 - mx.arange(labels.shape[0], dtype=labels.dtype), labels)
    return gather_with_grad(image_features), gather_with_grad(text_features), labels


def average_gradients(grads):
    """The mean of every rank's gradient tree, summed in a few large buckets.

    Like `mlx.nn.average_gradients`, but the result keeps the input tree's exact structure (that one rebuilds it with
    `tree_unflatten`, which drops the empty dicts a partly frozen model's gradient tree holds).
    """
    n = world_size()
    if n == 1:
        return grads
    leaves = [g for _, g in tree_flatten(grads)]
    averaged = []
    for bucket in _buckets(leaves):
        flat = mx.concatenate([g.reshape(-1) for g in bucket])
        flat = mx.distributed.all_sum(flat, group=group()) / n
        offsets = [0]
        for g in bucket:
            offsets.append(offsets[-1] + g.size)
        averaged += [flat[lo:hi].reshape(g.shape) for g, lo, hi in zip(bucket, offsets[:-1], offsets[1:])]
    it = iter(averaged)
    return tree_map(lambda _: next(it), grads)


def _buckets(leaves: list) -> list[list]:
    """Consecutive leaves of one dtype, about _BUCKET_BYTES each (concatenation needs a common dtype)."""
    out, size = [], 0
    for g in leaves:
        if not out or out[-1][0].dtype != g.dtype or size >= _BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.nbytes
    return out


# ---- bookkeeping ---------------------------------------------------------------------------------------------------


def all_gather_objects(obj) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order (a list of one in one process)."""
    n = world_size()
    if n == 1:
        return [obj]
    data = mx.array(list(json.dumps(obj).encode()), dtype=mx.uint8)
    lengths = mx.distributed.all_gather(mx.array([data.size], dtype=mx.int32), group=group()).tolist()
    padded = mx.concatenate([data, mx.zeros((max(lengths) - data.size,), dtype=mx.uint8)])
    rows = mx.distributed.all_gather(padded[None], group=group())
    return [json.loads(bytes(row[:k].tolist()).decode()) for row, k in zip(rows, lengths)]


def check_same(value, what: str) -> None:
    """Stop every rank with one clear error when the ranks disagree on `value` (rather than hang in a collective)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the {world_size()} processes disagree on {what}: {values}")


def data_state(loader_state: dict) -> dict:
    """Checkpoint entries for the loader: rank 0's state under "data" (as one process writes it) and, with several
    ranks, every rank's under "data_ranks" (positions differ once a rank skips an unreadable image). Collective."""
    states = all_gather_objects(loader_state)
    return {"data": states[0]} if len(states) == 1 else {"data": states[0], "data_ranks": states}


def rank_data_state(checkpoint_state: dict) -> dict:
    """This rank's loader state from a checkpoint; a checkpoint of another world size yields one whose world size
    the loader refuses with a message naming both."""
    per_rank = checkpoint_state.get("data_ranks", [])
    return per_rank[rank()] if len(per_rank) == world_size() else checkpoint_state["data"]


def sum_int(value: int) -> int:
    """The sum over ranks of a small count (e.g. skipped images)."""
    return value if world_size() == 1 else sum(all_gather_objects(value))


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of a step (dropout): a function of (seed, step) as in one process, and distinct per rank, so ranks
    do not draw the same masks for their different pairs."""
    base = seed * 1_000_003 + step
    return base if world_size() == 1 else base * world_size() + rank()
