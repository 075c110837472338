"""Same-process A/B of the CPU LayerNorm (mlx_clip/layer_norm.py) against MLX's own, on a bench workload (issue 7): each
side's graph is traced with its switch set, then the two are timed in alternation (order flipped every round), so the
drift of a shared machine hits both alike.

    python -m benchmarks.cpu_ab --arch ViT-B-32 --task embed-image --batch 16 --rounds 10
"""

import argparse
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import numpy as np

from benchmarks.batches import CAPTION_HELP, parse_caption_tokens
from benchmarks.workloads_mlx import TASKS, mlx_workload
from mlx_clip import layer_norm
from mlx_clip.config import get_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--task", default="train", choices=TASKS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--caption-tokens", default="5-30", help=CAPTION_HELP)
    args = ap.parse_args()
    words = parse_caption_tokens(args.caption_tokens)
    loads = {}
    for enabled in (True, False):
        layer_norm.ENABLED = enabled
        loads[enabled] = mlx_workload(get_config(args.arch), args.task, args.batch, "compiled", "float32", words=words)
        for _ in range(2):
            loads[enabled].run()
    times = {True: [], False: []}
    for turn in range(args.rounds):
        for enabled in ((True, False) if turn % 2 == 0 else (False, True)):
            start = time.perf_counter()
            loads[enabled].run()
            times[enabled].append(time.perf_counter() - start)
    ours, mlx = (1e3 * float(np.median(times[k])) for k in (True, False))
    print(f"{args.arch} {args.task} b{args.batch}: layer_norm.py {ours:.1f} ms, mx.fast.layer_norm {mlx:.1f} ms "
          f"p50 ({mlx / ours:.3f}x)")


if __name__ == "__main__":
    main()
