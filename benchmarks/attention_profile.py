"""Kernel-level profile of one attention shape's forward + backward on a CUDA device (issue 7): the kernels that run
for value_and_grad of `fastmath.token_attention` under each MLXCLIP_GPU_ATTENTION mode, with their device times
(torch.profiler's CUPTI sees MLX's kernels too). Says which of the tiled kernels (mlx_clip/attention_kernels_tiled.py)
costs what, against cuDNN's fused attention on the padded sequence.

    python -m benchmarks.attention_profile --shape 256,12,197 --modes fused,padded
"""

import argparse

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.attention_modes import compiled_step, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="256,12,197", help="batch,heads,tokens")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--modes", default="fused,padded")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    batch, heads, tokens = (int(x) for x in args.shape.split(","))
    torch.cuda.init()
    for mode in args.modes.split(","):
        shape, mask = (batch, heads, tokens, 64), "causal" if args.causal else None
        step = compiled_step(shape, mask, mode)
        _, ms, peak = run(shape, mask, mode, runs=5, step=step)  # also traces and compiles it before the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
        rows = sorted(((e.key, e.count / args.steps, e.self_device_time_total / args.steps / 1e3)
                       for e in prof.key_averages() if e.self_device_time_total > 0), key=lambda r: -r[2])
        print(f"== {mode}: {ms:.2f} ms a step (wall), {peak:.0f} MiB peak; device {sum(r[2] for r in rows):.2f} ms")
        for name, count, device_ms in rows[:args.top]:
            print(f"  {device_ms:7.3f} ms  x{count:4.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
