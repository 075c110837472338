"""What a compiled MLX train step is made of, and what it costs apart from its batch (issue 7).

- census: the traced step's graph nodes by primitive (fused kernels named by their ops), as MLX will evaluate them
  (`mx.export_to_dot` of the step's outputs). Views (Reshape, Transpose, ...) cost ~1 us each to evaluate on the CPU,
  kernels and GEMM calls more: the count is where per-step overhead starts.
- fixed: the step timed at several batch sizes and fitted as fixed + per-sample cost, the two numbers that say whether
  a backend is behind per sample (compute) or per step (optimizer, graph, launches).

- the GPU branch (`--gpu-branch`): the step as the product builds it off the CPU (cpu_streams.on_cpu() false: no
  batch-parallel slices, no CPU kernels; MLX's SDPA, LayerNorm and reductions), traced and run here. Our CUDA kernels
  (gpu_attention, gpu_reduce, gpu_activation, multi_tensor) need a CUDA device, so this is the Metal graph and, but
  for those kernels, the CUDA one: where a host-bound GPU step's graph nodes come from, counted without a card (the
  clip norm as CUDA takes it by default: `--norm-like-kernel`).
- same-process A/B (`--ab module.NAME=VALUE`): two workloads traced in one process, with the setting as it is and as
  VALUE (a module constant read when a step is traced), their steps run alternately for `--seconds`: the VM's drift
  (±15-30% within an hour here) moves both alike, which separate processes do not.
- step peak (`--peak`, with `--ab`): each workload's peak above its resident arrays, one step after warm-up; with
  `--norm-like-kernel` the clip norm takes the CUDA strided kernel's graph shape (one node reading 24 gradients, from
  MLX ops; wrong value, right shape): MLX's evaluation order, and so the peak, follows the graph's shape.
- without attention (`--no-attention`, with `--fit`): each attention replaced by its value input (projections kept;
  wrong numbers, right shapes), the upper bound of what a faster attention could save.

    python -m benchmarks.step_census --arch small --batch 32
    python -m benchmarks.step_census --arch small --fit 2,8,32
    python -m benchmarks.step_census --arch small --fit 32 --no-attention
    python -m benchmarks.step_census --arch ViT-B-32 --batch 2 --gpu-branch
    python -m benchmarks.step_census --arch small --batch 32 --ab mlx_clip.train.step.DOT_ROWS_MIN=2**40
    python -m benchmarks.step_census --arch ViT-B-32 --batch 64 --gpu-branch --dtype float32 --norm-like-kernel \
        --peak --ab mlx_clip.linear.ORDERED_WEIGHT_GRADS=False

The workload is `mlxclip bench`'s train step (benchmarks/workloads_mlx.py), in the product's CPU mode.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import tempfile
import time
import types

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from benchmarks.workloads_mlx import mlx_workload
from mlx_clip import cpu_streams, gpu_reduce, linear
from mlx_clip.config import get_config

VIEWS = {"Reshape", "Transpose", "ExpandDims", "Squeeze", "Flatten", "Unflatten", "Broadcast", "View", "Slice"}


DTYPE = "float32"  # bfloat16 with --gpu-branch, as a GPU trains


def _workload(arch: str, batch: int):
    words = None if arch in ("tiny", "small") else (5, 30)
    return mlx_workload(get_config(arch), "train", batch, "compiled", DTYPE, words=words)


def _step_dot(arch: str, batch: int) -> str:
    """The traced train step as `mx.export_to_dot` writes it (after a warm-up step, so the trace is the cached one)."""
    load = _workload(arch, batch)
    load.run()
    with cpu_streams.batch_parallel_mode(batch > 1):  # the mode the workload runs in (workloads_mlx._in_mode)
        outputs = load.launch()
    leaves = [v for _, v in tree_flatten(outputs) if isinstance(v, mx.array)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step.dot")
        mx.export_to_dot(path, *leaves)
        with open(path) as f:
            text = f.read()
    mx.eval(leaves)
    return text


def _primitives(text: str) -> dict[str, str]:
    """{node id: primitive name} of a dot graph (arrays are the other nodes)."""
    return {m.group(1): m.group(2).split()[0] for m in re.finditer(r'(\w+) \[label ?= ?"([^"]*)"', text)
            if m.group(2)}


def census(arch: str, batch: int) -> collections.Counter:
    """{primitive name: nodes} of one traced train step."""
    return collections.Counter(_primitives(_step_dot(arch, batch)).values())


def context(text: str, kind: str) -> collections.Counter:
    """{(the primitives making its inputs, the primitives reading its output): nodes} for every `kind` node: where a
    kind of node comes from in the step."""
    prims = _primitives(text)
    made_by, read_by = {}, collections.defaultdict(list)
    ins, outs = collections.defaultdict(list), collections.defaultdict(list)
    for a, b in re.findall(r'"?(\w+)"? -> "?(\w+)"?', text):
        if a in prims:  # primitive -> the array it makes
            made_by[b] = a
            outs[a].append(b)
        else:  # array -> the primitive reading it
            read_by[a].append(b)
            ins[b].append(a)
    pairs = collections.Counter()
    for node, name in prims.items():
        if name == kind:
            sources = tuple(prims.get(made_by.get(a), "input")[:40] for a in ins[node])
            readers = tuple(sorted({prims[r][:40] for o in outs[node] for r in read_by[o]})) or ("output",)
            pairs[(sources, readers)] += 1
    return pairs


def step_ms(arch: str, batch: int, steps: int) -> float:
    """Median ms of `steps` train steps after two warm-up steps."""
    load = _workload(arch, batch)
    load.run()
    load.run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        load.run()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def ab(arch: str, batch: int, setting: str, seconds: float) -> dict[str, list[float]]:
    """{label: step times in s} of two workloads traced in this process, `setting` ("pkg.module.NAME=VALUE", VALUE a
    Python literal or arithmetic of them) as it is and as VALUE, stepped alternately for `seconds` (at least once)."""
    loads = _ab_loads(arch, batch, setting)
    times = {label: [] for label in loads}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or not all(times.values()):
        for label, load in loads.items():
            start = time.perf_counter()
            load.run()
            times[label].append(time.perf_counter() - start)
    return times


def step_peak_gib(load) -> float:
    """GiB above the resident arrays at one step's peak (a traced, warm workload)."""
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    load.run()
    return (mx.get_peak_memory() - base) / 2**30


def norm_like_kernel(grads: list[mx.array]) -> mx.array:
    """The strided norm kernel's graph shape (multi_tensor.sum_of_squares_strided, CUDA only) from MLX ops, for the
    CPU: one node reading 24 gradients (`mx.depends`) per launch, the launches' outputs summed. Its value is not the
    norm (it is 1): the step's shape, and so its memory, is what it stands for."""
    parts = [mx.depends([mx.zeros((1,))], grads[i:i + 24])[0] for i in range(0, len(grads), 24)]
    return mx.concatenate(parts).sum() + 1.0


def norm_like_kernel_settings() -> list[tuple]:
    """(module, name, value) to set so that the clip norm takes `norm_like_kernel`'s shape where CUDA's kernel would
    run (tests set them with monkeypatch)."""
    from mlx_clip.train import multi_tensor, step

    return [(step, "NORM_SQUARES", "kernel"),
            (multi_tensor, "applies", lambda arrays, switched_on=None: bool(switched_on)),
            (multi_tensor, "sum_of_squares_strided", norm_like_kernel)]


def _ab_loads(arch: str, batch: int, setting: str) -> dict:
    """{label: traced, warm workload} with `setting` as it is and as its VALUE (see `ab`)."""
    target, _, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not value or not module_name:
        raise ValueError(f"--ab wants module.NAME=VALUE, got {setting!r}")
    module = importlib.import_module(module_name)
    old, new = getattr(module, name), eval(value, {"__builtins__": {}})  # a literal or 2**40: the user's own input
    loads = {}
    try:
        for label, v in ((f"{name}={old!r}", old), (f"{name}={new!r}", new)):
            setattr(module, name, v)  # read while the step is traced, in the warm-up steps
            loads[label] = _workload(arch, batch)
            loads[label].run()
            loads[label].run()
    finally:
        setattr(module, name, old)
    return loads


def gpu_branch_settings() -> list[tuple]:
    """(module, name, value) to set so that steps are built as off the CPU (tests set them with monkeypatch)."""
    from mlx_clip.train import optim

    off_cpu = lambda: False  # noqa: E731  (read through cpu_streams by everything but optim, which imported it)
    # On CUDA the dense layers take their hand-written backward (linear._dense) for the bias gradient's kernel; here
    # the same backward, its column sums MLX's (the kernel is CUDA's), so the census counts the GPU's dense nodes
    sums = types.SimpleNamespace(column_sum_fits=lambda *shape: True, column_sum=gpu_reduce.column_sum)
    return [(cpu_streams, "on_cpu", off_cpu), (optim, "on_cpu", off_cpu), (linear, "gpu_reduce", sums)]


def _gpu_branch() -> None:
    global DTYPE
    for module, name, value in gpu_branch_settings():
        setattr(module, name, value)
    DTYPE = "bfloat16"


def _cut_attention() -> None:
    # the model calls fastmath.token_attention for every non-pooled attention; the pooled last block's is kept
    from mlx_clip import fastmath

    fastmath.token_attention = lambda q, k, v, heads, scale, mask=None: v + 0 * (q + k)


def fit(batches: list[int], ms: list[float]) -> tuple[float, float]:
    """(fixed ms, ms per sample): the least-squares line through (batch, ms)."""
    per_sample, fixed = np.polyfit(np.array(batches, float), np.array(ms, float), 1)
    return float(fixed), float(per_sample)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--batch", type=int, default=32, help="the census's batch")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fit", default="", help="comma-separated batch sizes: time the step at each and fit fixed + "
                                              "per-sample cost (instead of the census)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-attention", action="store_true", help="time the steps with attention cut out (see above)")
    ap.add_argument("--gpu-branch", action="store_true", help="the step as built off the CPU (see above)")
    ap.add_argument("--ab", default="", help="module.NAME=VALUE: same-process A/B of a setting read at trace time "
                                             "(see above)")
    ap.add_argument("--seconds", type=float, default=60.0, help="--ab's time")
    ap.add_argument("--dtype", default="", help="the workload's dtype (default float32, bfloat16 with --gpu-branch; "
                                                "bf16 products are slow on a CPU)")
    ap.add_argument("--peak", action="store_true", help="with --ab: each workload's step peak above its resident "
                                                        "arrays instead of times")
    ap.add_argument("--norm-like-kernel", action="store_true", help="the clip norm in the CUDA strided kernel's graph "
                                                                    "shape, from MLX ops (wrong value; see above)")
    ap.add_argument("--context", default="", help="comma-separated primitive names: for each, what makes its inputs "
                                                  "and what reads its output, most common first")
    args = ap.parse_args()
    global DTYPE
    if args.gpu_branch:
        _gpu_branch()
    DTYPE = args.dtype or DTYPE
    if args.no_attention:
        _cut_attention()
    if args.norm_like_kernel:
        for module, name, value in norm_like_kernel_settings():
            setattr(module, name, value)
    if args.ab and args.peak:
        for label, load in _ab_loads(args.arch, args.batch, args.ab).items():
            print(f"{args.arch} train b{args.batch} {label}: step peak {step_peak_gib(load):.3f} GiB above resident")
        return
    if args.ab:
        for label, times in ab(args.arch, args.batch, args.ab, args.seconds).items():
            ms = 1e3 * np.array(times)
            print(f"{args.arch} train b{args.batch} {label}: {np.median(ms):.1f} ms median of {len(ms)} steps "
                  f"(quartiles {np.percentile(ms, 25):.1f}-{np.percentile(ms, 75):.1f})")
        return
    if args.fit:
        batches = [int(b) for b in args.fit.split(",")]
        ms = [step_ms(args.arch, b, args.steps) for b in batches]
        for b, t in zip(batches, ms):
            print(f"{args.arch} train b{b}: {t:.1f} ms")
        if len(batches) < 2:
            return
        fixed, per_sample = fit(batches, ms)
        print(f"{args.arch}: fixed {fixed:.1f} ms per step + {per_sample:.2f} ms per sample")
        return
    if args.context:
        text = _step_dot(args.arch, args.batch)
        for kind in args.context.split(","):
            print(f"== {kind}: inputs made by -> output read by")
            for (sources, readers), n in context(text, kind).most_common(args.top):
                print(f"{n:6d}  {', '.join(sources)} -> {', '.join(readers)}")
        return
    counts = census(args.arch, args.batch)
    views = sum(n for name, n in counts.items() if name in VIEWS)
    print(f"{args.arch} train b{args.batch}: {sum(counts.values())} nodes, {views} of them views, "
          f"{counts.get('Matmul', 0) + counts.get('AddMM', 0)} GEMM nodes, "
          f"{sum(n for name, n in counts.items() if name.startswith('Compiled'))} fused kernels")
    for name, n in counts.most_common(args.top):
        print(f"{n:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
