"""Data-parallel scaling of the training step alone: each rank's batch already on its device, so the number measures
compute and the gradient all-reduce, not the input pipeline (benchmarks.scaling times whole `mlxclip finetune` runs).

    python -m benchmarks.scaling_step --arch ViT-B-32 --batch-size 256                       # 1 process
    mlx.launch -n 2 --backend nccl -- python -m benchmarks.scaling_step --arch ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx

from benchmarks.batches import random_batch
from converters.convert import arch_config
from mlx_clip.io import DTYPES, cast
from mlx_clip.model import CLIP, init_weights
from mlx_clip.train import distributed as dist
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per process")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    config = arch_config(args.arch)
    model = cast(init_weights(CLIP(config), 0), args.dtype)  # same init on every rank
    data = random_batch(config, args.batch_size, seed=dist.rank())  # each rank its own pairs
    images = mx.array(data["images"]).astype(DTYPES[args.dtype])
    ids, labels = mx.array(data["input_ids"]), mx.array(data["labels"])
    optimizer = build_optimizer(model, TrainingArgs(lr=1e-5), total_steps=1_000_000)
    step = make_step(model, optimizer, make_loss_fn("clip"))  # global-batch loss and averaged gradients under a launch
    times = []
    for i in range(args.warmup + args.steps):
        tick = time.perf_counter()
        mx.eval(step(images, ids, labels), model.state, optimizer.state)
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    seconds = statistics.median(times)
    result = {"arch": args.arch, "dtype": args.dtype, "processes": dist.world_size(), "pairs_per_process": args.batch_size,
              "step_s_p50": seconds, "pairs_per_s": args.batch_size * dist.world_size() / seconds,
              "device": str(mx.default_device())}
    if dist.is_main():
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
