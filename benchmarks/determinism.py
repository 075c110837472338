"""Is the training step run-to-run deterministic on this device? The same steps twice from the same weights, then every
parameter and moment that differs, by how much (session 17: on an H200 the vision tower's weights differed after two
identical runs of `tests/test_finetune.py::test_a_nonfinite_step_is_as_if_it_never_happened`; on the CPU they do not).

    python -m benchmarks.determinism [--arch tiny] [--steps 1] [--batch 8] [--grad-clip 0] [--lazy-second]
                                     [--ids captions|uniform]

Each MLXCLIP_* switch applies as in training, so a suspect kernel can be switched off and the run repeated. One step
without clipping keeps a difference where it arose: the first moments (m = (1 - beta1) g after one step) name the
gradients that differ; with clipping, or after a second step, one differing gradient moves every array.

--lazy-second: the first run evaluates after every step (as the training loop does), the second builds all its steps
as one lazy graph evaluated at the end (as the skipped-step test's run without the bad step did). Session 18: two
identical runs agree bit for bit on an H200, yet that test fails there; this tells whether evaluation boundaries alone
change a CUDA step's result (on the H200 they did not: 0 of 392 arrays differed).

--ids captions (default): token rows shaped as real captions are (SOT, words from a 20-word vocabulary, EOT, zero
padding), so ids repeat within a batch as they do in the skipped-step test's captions ("a photo of a crack on
metal."); `uniform`: ids drawn from the whole vocabulary, nearly all distinct. A repeated id is where a GPU's
scatter-add into the token embedding's gradient may add in a different order run to run (atomics). Session 19 on an
H200, 2 steps: with MLX's scatter-add (MLXCLIP_GPU_EMBEDDING=0) 14 of 392 arrays differed, the token table first; with
mlx_clip/gpu_embedding.py's fixed-order sums (the default) 0 (benchmarks/results/gpu-s19-h200.md §1)."""

from __future__ import annotations

import argparse

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.batches import caption_rows
from mlx_clip.config import get_config

from mlx_clip.model import CLIP
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step


def _ids(rng, cfg, batch: int, kind: str) -> np.ndarray:
    vocab, ctx = cfg.text_config.vocab_size, cfg.text_config.max_position_embeddings
    if kind == "uniform":
        return rng.integers(1, vocab - 1, (batch, ctx)).astype(np.int32)
    return caption_rows(rng, batch, ctx, vocab, words=20, shortest=3, longest=min(12, ctx - 2))


def _run(arch: str, steps: int, batch: int, grad_clip: float, eval_each: bool = True,
         ids_kind: str = "captions") -> dict[str, np.ndarray]:
    mx.random.seed(0)
    cfg = get_config(arch)
    model = CLIP(cfg)
    optimizer = build_optimizer(model, TrainingArgs(lr=1e-3), total_steps=10)
    step = make_step(model, optimizer, make_loss_fn("clip"), grad_clip)
    rng = np.random.default_rng(0)
    size = cfg.vision_config.image_size
    for _ in range(steps):
        images = mx.array(rng.standard_normal((batch, size, size, 3)).astype(np.float32))
        ids = mx.array(_ids(rng, cfg, batch, ids_kind))
        outputs = step(images, ids, mx.arange(batch))
        if eval_each:
            mx.eval(outputs, model.parameters(), optimizer.state)
    tree = [model.parameters(), optimizer.state]
    mx.eval(tree)
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-clip", type=float, default=0.0, help="0: no clipping (see above)")
    ap.add_argument("--lazy-second", action="store_true", help="the second run evaluates once, at the end (see above)")
    ap.add_argument("--ids", choices=("captions", "uniform"), default="captions", help="token rows (see above)")
    args = ap.parse_args(argv)
    a, b = (_run(args.arch, args.steps, args.batch, args.grad_clip, not (second and args.lazy_second), args.ids)
            for second in (False, True))
    differ = [(k, float(np.max(np.abs(a[k].astype(np.float64) - b[k])))) for k in a if not np.array_equal(a[k], b[k])]
    how = "one evaluated step by step, one lazily" if args.lazy_second else "two identical runs"
    print(f"{args.arch}, {args.steps} steps of batch {args.batch} on {mx.default_device()}: "
          f"{len(differ)} of {len(a)} arrays differ between {how}")
    for k, d in differ:
        print(f"  {k}: max |a - b| = {d:.3e}")


if __name__ == "__main__":
    main()
