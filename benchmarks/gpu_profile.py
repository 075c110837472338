"""Kernel-level profile of a train step on a CUDA device (issue 7), for MLX or torch, through torch.profiler: CUPTI
records every kernel of the process, MLX's (launched from CUDA graphs) included. Prints the device time of the step's
kernels against its wall time (the difference is the device waiting for the host) and the kernels that take the most
time, grouped by kind.

    python -m benchmarks.gpu_profile --backend mlx --arch ViT-B-32 --batch 256
    python -m benchmarks.gpu_profile --backend mlx --arch ViT-B-16 --steps 10 --trace out/trace.json

`--trace` also writes the profiled steps' timeline (Chrome trace format: chrome://tracing or ui.perfetto.dev) and
prints each step's wall time, to see where a slow step's device sits idle next to a fast one's.
"""

import argparse
import re
import time
from collections import defaultdict

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.batches import add_card_step_args, parse_caption_tokens
from benchmarks.trace_steps import STEP_NAME, format_rows, load_events, summarize
from mlx_clip.config import get_config

# Kernel name patterns, first match wins: where the device time goes, by kind of work.
KINDS = [("gemm", r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_"), ("attention", r"attention|flash|fmha|sdpa"),
         ("optimizer", r"adamw|sumsq|multi_tensor|foreach"), ("reduce", r"reduce|norm|softmax|sum"),
         ("copy", r"copy|memcpy|memset|cat|concat|fill"), ("elementwise", r".")]


def _kind(name: str) -> str:
    lowered = name.lower()
    return next(kind for kind, pattern in KINDS if re.search(pattern, lowered))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("mlx", "torch"), default="mlx")
    add_card_step_args(ap)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", help="write the profiled steps' timeline here (Chrome trace JSON)")
    ap.add_argument("--queued", type=int, default=1, help="steps queued back to back per annotated group (as the "
                    "training loop and `mlxclip bench --steps-per-run` run them); times per group")
    args = ap.parse_args()
    config, words = get_config(args.arch), parse_caption_tokens(args.caption_tokens)
    torch.cuda.init()
    if args.backend == "mlx":
        from benchmarks.workloads_mlx import mlx_workload
        load = mlx_workload(config, "train", args.batch, "compiled", args.dtype, words=words)
    else:
        from benchmarks.workloads_torch import torch_workload
        load = torch_workload(config, "train", args.batch, "compiled", args.dtype, device="cuda", words=words)
    group = (lambda: load.run_steps(args.queued)) if args.queued > 1 else load.run
    for _ in range(3):
        group()
    steps = []
    # CPU activity only for the `step N` annotations that trace_steps cuts the timeline by
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            start = time.perf_counter()
            with record_function(f"step {i}"):
                group()
            steps.append(time.perf_counter() - start)
    wall = sum(steps) / args.steps / args.queued
    if args.trace:
        prof.export_chrome_trace(args.trace)
        what = "steps" if args.queued == 1 else f"groups of {args.queued} queued steps"
        print(f"timeline of {args.steps} {what} in {args.trace}; each: "
              + ", ".join(f"{1e3 * t:.1f}" for t in steps) + " ms")
        print("\n".join(format_rows(summarize(load_events(args.trace), kind=_kind))))
    # device events only: with CPU activity on (--trace), the CPU ops' rows also carry their kernels' time, and the
    # `step N` annotations have a device-side copy spanning the step
    per = args.steps * args.queued  # rows per train step
    rows = [(e.key, e.count / per, e.self_device_time_total / per / 1e3) for e in prof.key_averages()
            if e.self_device_time_total > 0 and e.device_type != DeviceType.CPU and not STEP_NAME.match(e.key)]
    device = sum(ms for _, _, ms in rows)
    kinds = defaultdict(lambda: [0.0, 0.0])
    for name, count, ms in rows:
        kinds[_kind(name)][0] += count
        kinds[_kind(name)][1] += ms
    print(f"{args.backend} {args.arch} b{args.batch} {args.dtype}: wall {1e3 * wall:.1f} ms/step, kernels "
          f"{device:.1f} ms/step ({sum(c for _, c, _ in rows):.0f} launches)")
    print("  by kind: " + ", ".join(f"{k} {ms:.1f} ms ({n:.0f})" for k, (n, ms) in
                                    sorted(kinds.items(), key=lambda kv: -kv[1][1])))
    for name, count, ms in sorted(rows, key=lambda r: -r[2])[: args.top]:
        print(f"  {ms:7.2f} ms {count:6.0f}x  {name[:110]}")


if __name__ == "__main__":
    main()
