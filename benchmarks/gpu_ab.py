"""Same-process A/B of GPU code-path variants on the bench's train step (issue 7): each variant's step is traced with
its switches set, then the variants are timed in alternation, so machine drift hits them all alike.

    python -m benchmarks.gpu_ab --arch ViT-B-32 --batch 256 --variants sdpa,fused
A variant is an MLXCLIP_GPU_ATTENTION mode: sdpa | padded | matmul | fused. Peak memory measured here depends on the
order the variants were traced in (same-process allocations); compare memory across separate `mlxclip bench` runs.
"""

import argparse
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.batches import parse_caption_tokens, CAPTION_HELP
from benchmarks.workloads_mlx import mlx_workload
from mlx_clip import fastmath
from mlx_clip.config import get_config


def _set(variant: str):
    if variant not in fastmath.GPU_ATTENTION_MODES:
        raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(fastmath.GPU_ATTENTION_MODES)}")
    fastmath.GPU_ATTENTION = variant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default="sdpa,fused")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--caption-tokens", default="5-30", help=CAPTION_HELP)
    args = ap.parse_args()
    config, words = get_config(args.arch), parse_caption_tokens(args.caption_tokens)
    variants = args.variants.split(",")
    loads, peaks = {}, {}
    for variant in variants:  # trace (and warm) each variant with its switches; memory measured alone
        _set(variant)
        loads[variant] = mlx_workload(config, "train", args.batch, "compiled", args.dtype, words=words)
        for _ in range(3):
            loads[variant].run()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loads[variant].run()
        peaks[variant] = (mx.get_peak_memory() - base) / 2**30
        print(f"{variant}: traced; step peak above resident {peaks[variant]:.2f} GiB, resident {base / 2**30:.2f} GiB",
              flush=True)
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            start = time.perf_counter()
            loads[variant].run()
            times[variant].append(time.perf_counter() - start)
    for variant in variants:
        t = float(np.median(times[variant]))
        print(f"{args.arch} b{args.batch} {variant}: {1e3 * t:.1f} ms p50, {args.batch / t:.0f} img/s, "
              f"step peak {peaks[variant]:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
