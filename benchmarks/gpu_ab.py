"""Same-process A/B of code-path variants on a bench workload (issue 7), on the GPU or the CPU: each variant's graph is
traced with its switches set, then the variants are timed in alternation, so machine drift hits them all alike.

    python -m benchmarks.gpu_ab --arch ViT-B-32 --batch 256 --variants sdpa,fused
    python -m benchmarks.gpu_ab --arch ViT-B-32 --task embed-image --batch 16 --dtype float32 \
        --variants default,layernorm=mlx
A variant is `default` (the process's settings) or settings joined by `+`:
- attention=sdpa|padded|matmul|fused|aligned (MLXCLIP_GPU_ATTENTION; a bare mode means attention=MODE), dqrows=16|32
  (MLXCLIP_GPU_DQ_ROWS, mlx_clip/gpu_attention.py), dkdvrows=16|32 (MLXCLIP_GPU_DKDV_ROWS), ldmatrix=0|1|2
  (MLXCLIP_GPU_LDMATRIX), dqstep=16|32 (MLXCLIP_GPU_DQ_STEP), dkdvstep=16|32 (MLXCLIP_GPU_DKDV_STEP), dkdvwarps=4|8
  (MLXCLIP_GPU_DKDV_WARPS), dqwarps=4|8 (MLXCLIP_GPU_DQ_WARPS), fwdrows=16|32 (MLXCLIP_GPU_FWD_ROWS), fwdwarps=4|8
  (MLXCLIP_GPU_FWD_WARPS);
- memlimit=GiB (mx.set_memory_limit), optimizer=per-param|multi (MLXCLIP_MULTI_TENSOR, mlx_clip/train/multi_tensor.py),
  norm=auto|dot|reduce|concat|kernel|flat (step.NORM_SQUARES; "auto" is "kernel" on CUDA since session 27, "flat"
  before);
- layernorm=ours|mlx (MLXCLIP_CPU_LAYER_NORM, mlx_clip/layer_norm.py), split=on|off (CPU batch-parallel mode,
  mlx_clip/cpu_streams.py);
- grads=autodiff|rowmajor (the GPU weight gradients' layout, linear.ROW_MAJOR_GRADS_ON_GPU), gradcopy=0|1
  (MLXCLIP_GPU_CONTIGUOUS_GRADS);
- reduce=ours|mlx (MLXCLIP_GPU_REDUCE, mlx_clip/gpu_reduce.py), lnforward=ours|mlx (MLXCLIP_GPU_LAYER_NORM_FORWARD),
  activation=ours|mlx (MLXCLIP_GPU_ACTIVATION, mlx_clip/gpu_activation.py), actfused=1|0
  (MLXCLIP_GPU_ACTIVATION_FUSED), qkv=on|off (MLXCLIP_QKV_BLOCK, mlx_clip/qkv_block.py), fusedqkv=on|off
  (MLXCLIP_GPU_FUSED_QKV, mlx_clip/fused_qkv.py), gradorder=on|off (MLXCLIP_ORDERED_WEIGHT_GRADS, mlx_clip/linear.py),
  finish=0|1
  (MLXCLIP_GPU_REDUCE_FINISH), fold=1|0 (optim.FOLD_CLIP_GPU, MLXCLIP_GPU_FOLD_CLIP: the clip factor in AdamW's
  moment coefficients; on by default since session 22), moments=bf16|fp32 (optim.BF16_MOMENTS, MLXCLIP_BF16_MOMENTS:
  AdamW's moments for bf16 weights; bf16 by default since session 28).
`--torch` adds torch.compile's step (CUDA, or the CPU when MLX runs there) to the rotation. Peak memory measured here
depends on the order the variants were traced in (same-process allocations); compare memory across separate `mlxclip
bench` runs.
"""

import argparse
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.batches import add_card_step_args, parse_caption_tokens
from benchmarks.workloads_mlx import TASKS, mlx_workload
from mlx_clip import (cpu_streams, fastmath, fused_qkv, gpu_activation, gpu_attention, gpu_reduce, layer_norm, linear,
                      qkv_block)
from mlx_clip.config import get_config
from mlx_clip.memory import parse_bytes
from mlx_clip.train import multi_tensor, optim, step


SETTINGS = {  # name -> (module, attribute, values); unnamed settings keep the process's own (environment) values
    "attention": (fastmath, "GPU_ATTENTION", fastmath.GPU_ATTENTION_MODES),
    "optimizer": (multi_tensor, "ENABLED", {"per-param": False, "multi": True}),
    "layernorm": (layer_norm, "ENABLED", {"ours": True, "mlx": False}),
    "split": (cpu_streams, "ALLOWED", {"on": True, "off": False}),  # CPU batch-parallel mode (when a task has one)
    "norm": (step, "NORM_SQUARES", {"auto": "auto", "dot": "dot", "reduce": "reduce", "concat": "concat",
                                    "kernel": "kernel", "flat": "flat"}),  # clip norm
    "grads": (linear, "ROW_MAJOR_GRADS_ON_GPU", {"autodiff": False, "rowmajor": True}),  # GPU weight-gradient layout
    "gradcopy": (linear, "CONTIGUOUS_GRADS_ON_GPU", {"0": False, "1": True}),  # autodiff's layout copied to W's
    "dqrows": (gpu_attention, "DQ_ROWS", {"16": 16, "32": 32}),  # the tiled dq kernel's query rows per warp
    "dkdvrows": (gpu_attention, "DKDV_ROWS", {"16": 16, "32": 32}),  # the tiled dk/dv kernel's key rows per warp
    "ldmatrix": (gpu_attention, "LDMATRIX", {"0": 0, "1": 1, "2": 2}),  # the tiled kernels' operand loads
    "dqstep": (gpu_attention, "DQ_STEP", {"16": 16, "32": 32}),  # the tiled dq kernel's key rows a step
    "dkdvstep": (gpu_attention, "DKDV_STEP", {"16": 16, "32": 32}),  # the tiled dk/dv kernel's query rows a step
    "dkdvwarps": (gpu_attention, "DKDV_WARPS", {"4": 4, "8": 8}),  # the tiled dk/dv kernel's warps a block
    "dqwarps": (gpu_attention, "DQ_WARPS", {"4": 4, "8": 8}),  # the tiled dq kernel's warps a block
    "fwdrows": (gpu_attention, "FWD_ROWS", {"16": 16, "32": 32}),  # the tiled forward's query rows a warp
    "fwdwarps": (gpu_attention, "FWD_WARPS", {"4": 4, "8": 8}),  # the tiled forward's warps a block
    "reduce": (gpu_reduce, "ENABLED", {"ours": True, "mlx": False}),  # bias / LayerNorm gradients' column sums
    "activation": (gpu_activation, "ENABLED", {"ours": True, "mlx": False}),  # the MLP's GELU forward and backward
    "actfused": (gpu_activation, "FUSED", {"1": True, "0": False}),  # its backward as one kernel or two
    "qkv": (qkv_block, "ENABLED", {"on": True, "off": False}),  # LayerNorm-1 recomputed in the backward
    "fusedqkv": (fused_qkv, "ENABLED", {"on": True, "off": False}),  # q, k, v as one product (CUDA)
    "gradorder": (linear, "ORDERED_WEIGHT_GRADS", {"on": True, "off": False}),  # weight-gradient GEMMs in order
    "lnforward": (gpu_reduce, "LN_FORWARD", {"ours": True, "mlx": False}),  # the GPU LayerNorm forward's kernel
    "fold": (optim, "FOLD_CLIP_GPU", {"1": True, "0": False}),  # the clip factor in AdamW's moment coefficients
    "moments": (optim, "BF16_MOMENTS", {"bf16": True, "fp32": False}),  # AdamW's moments for bf16 weights
    "finish": (gpu_reduce, "FINISH_KERNEL", {"1": True, "0": False}),  # the column sums' partials summed by our kernel
}
DEFAULTS = {name: getattr(module, attr) for name, (module, attr, _) in SETTINGS.items()}
_LIMIT = mx.get_memory_limit()  # MLX's own memory limit, put back for each variant; memlimit=GiB sets another


def _set(variant: str):
    for name, value in DEFAULTS.items():
        setattr(SETTINGS[name][0], SETTINGS[name][1], value)
    mx.set_memory_limit(_LIMIT)
    for item in filter(None, variant.split("+")):
        if item == "default":
            continue
        name, _, value = item.rpartition("=")
        if name == "memlimit":  # MLX holds back queued work while its active memory is over the limit
            mx.set_memory_limit(parse_bytes(f"{value}GiB"))
            continue
        module, attr, values = SETTINGS.get(name or "attention", (None, None, ()))
        if value not in values:
            raise SystemExit(f"--variants: {item!r}: expected default or NAME=VALUE with NAME one of "
                             f"{', '.join(SETTINGS)} (values: " + "; ".join(
                                 f"{n}: {', '.join(v)}" for n, (_, _, v) in SETTINGS.items()) + ")")
        setattr(module, attr, values[value] if isinstance(values, dict) else value)


def main():
    ap = argparse.ArgumentParser()
    add_card_step_args(ap)
    ap.add_argument("--task", default="train", choices=TASKS)
    ap.add_argument("--variants", default="default,optimizer=multi")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--torch", action="store_true",
                    help="also time torch.compile(open_clip)'s step (the bench's torch side) in the same rotation")
    args = ap.parse_args()
    config, words = get_config(args.arch), parse_caption_tokens(args.caption_tokens)
    variants = args.variants.split(",")
    loads, peaks = {}, {}
    for variant in variants:  # trace (and warm) each variant with its switches; memory measured alone
        _set(variant)
        loads[variant] = mlx_workload(config, args.task, args.batch, "compiled", args.dtype, words=words)
        for _ in range(3):
            loads[variant].run()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loads[variant].run()
        peaks[variant] = (mx.get_peak_memory() - base) / 2**30
        print(f"{variant}: traced; step peak above resident {peaks[variant]:.2f} GiB, resident {base / 2**30:.2f} GiB",
              flush=True)
    if args.torch:  # after MLX's peaks are read; torch's own peak is its allocator's high-water mark
        import torch

        from benchmarks.workloads_torch import torch_workload
        cuda = mx.default_device() == mx.gpu  # else the CPU: torch on the same device as MLX
        loads["torch.compile"] = torch_workload(config, args.task, args.batch, "compiled", args.dtype,
                                                device="cuda" if cuda else "cpu", words=words)
        for _ in range(3):
            loads["torch.compile"].run()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loads["torch.compile"].run()
        peaks["torch.compile"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        variants.append("torch.compile")
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            if variant != "torch.compile":
                _set(variant)  # settings read at run time too (split=)
            start = time.perf_counter()
            loads[variant].run()
            times[variant].append(time.perf_counter() - start)
    for variant in variants:
        t = float(np.median(times[variant]))
        host = getattr(loads[variant], "host_s", None)  # an MLX train step's main-thread CPU time, the timed runs'
        host = f", host {1e3 * float(np.median(host[-args.rounds:])):.1f} ms" if host else ""
        print(f"{args.arch} {args.task} b{args.batch} {variant}: {1e3 * t:.1f} ms p50, {args.batch / t:.0f} img/s, "
              f"step peak {peaks[variant]:.2f} GiB{host}", flush=True)


if __name__ == "__main__":
    main()
