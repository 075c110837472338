"""Where a GPU train step's time goes between the host and the device (issue 7), all in one process:

- sync: each step evaluated before the next is built (what `mlxclip bench` times per step);
- host: building the step's graph (the compiled call) and encoding its kernels (`mx.async_eval` returns once every
  kernel is queued on the GPU stream), then the wait for the device to finish. MLX lets at most 10 command buffers
  (~100 kernels each) be in flight and blocks the encoding thread until one completes, so "encode" includes waiting
  for the device whenever a step has more than ~1,000 kernels: the encoding thread's CPU time (it blocks on a
  condition variable there, it does not spin) is what tells host-bound from device-bound;
- pipelined: as the training loop runs (mlx_clip/train/loop.py): step n+1 built and queued with `mx.async_eval`,
  then step n waited for, so the host's work for step n+1 overlaps the device's work for step n; and the peak memory
  of both ways (two steps in flight may hold more).

    python -m benchmarks.gpu_host --arch ViT-B-32 --batch 256
MLX reads MLX_MAX_OPS_PER_BUFFER (kernels per CUDA graph; its default on H100/H200 is 100) at start-up: run the
script once per value to compare them.
"""

import argparse
import os
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.batches import add_card_step_args, parse_caption_tokens
from benchmarks.workloads_mlx import mlx_workload
from mlx_clip.config import get_config


ENV = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER", "MLX_USE_CUDA_GRAPHS")


def _sync(load) -> float:
    start = time.perf_counter()
    mx.eval(load.launch())
    return time.perf_counter() - start


def _split(load) -> tuple[float, float, float, float]:
    """build, encode, wait (wall) and the encoding thread's CPU time while encoding (it blocks, not spins, on MLX's
    in-flight limit: CPU time well under the encode time means the device set the pace)."""
    start = time.perf_counter()
    outputs = load.launch()
    built = time.perf_counter()
    cpu = time.thread_time()
    mx.async_eval(outputs)
    queued, cpu = time.perf_counter(), time.thread_time() - cpu
    mx.eval(outputs)
    done = time.perf_counter()
    return built - start, queued - built, done - queued, cpu


def _pipelined(load, steps: int) -> float:
    start = time.perf_counter()
    previous = None
    for _ in range(steps):
        outputs = load.launch()
        mx.async_eval(outputs)
        if previous is not None:
            mx.eval(previous)
        previous = outputs
    mx.eval(previous)
    return (time.perf_counter() - start) / steps


def _peak_gib(fn, *args) -> float:
    mx.eval(mx.zeros(1))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    fn(*args)
    return (mx.get_peak_memory() - base) / 2**30


def main():
    ap = argparse.ArgumentParser()
    add_card_step_args(ap)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pipeline", type=int, default=8, help="steps in each pipelined timing")
    args = ap.parse_args()
    load = mlx_workload(get_config(args.arch), "train", args.batch, "compiled", args.dtype,
                        words=parse_caption_tokens(args.caption_tokens))
    for _ in range(3):
        load.run()
    sync, split, piped = [], [], []
    for _ in range(args.rounds):  # alternating, so machine drift hits all three alike
        sync.append(_sync(load))
        split.append(_split(load))
        piped.append(_pipelined(load, args.pipeline))
    peaks = _peak_gib(lambda: [_sync(load) for _ in range(3)]), _peak_gib(_pipelined, load, 3)
    build, encode, wait, encode_cpu = (1e3 * float(np.median(col)) for col in zip(*split))
    ms = {name: 1e3 * float(np.median(t)) for name, t in (("sync", sync), ("pipelined", piped))}
    graphs = " ".join(f"{k}={os.environ[k]}" for k in ENV if k in os.environ) or "MLX defaults"
    print(f"{args.arch} b{args.batch} {args.dtype} [{graphs}]: sync {ms['sync']:.1f} ms "
          f"({args.batch / ms['sync'] * 1e3:.0f} img/s); host build {build:.1f} + encode {encode:.1f} ms "
          f"(thread CPU while encoding {encode_cpu:.1f} ms), then device wait {wait:.1f} ms; "
          f"pipelined x{args.pipeline} {ms['pipelined']:.1f} ms/step "
          f"({args.batch / ms['pipelined'] * 1e3:.0f} img/s); peak above resident: sync {peaks[0]:.2f} GiB, "
          f"pipelined {peaks[1]:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
