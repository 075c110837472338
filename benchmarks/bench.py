"""`mlxclip bench`: MLX (eager, compiled) against torch (eager, torch.compile) on the same device, batch and dtype.

Every (backend, mode, task) is measured in its own process (`benchmarks.bench_worker`, which documents the memory
figures): warm-up, then the median and spread of N timed runs; img/s (pairs/s for train), batch-1 latency for the
embedding tasks, peak memory, and MFU: the model's FLOPs (benchmarks/flops.py) per item times items/s over MLX's matmul
rate measured on the same device and dtype (n×n, once a run). Results go to BENCH.jsonl / .md / .png under `out`, with
the machine named.

    python -m benchmarks.bench --arch ViT-B-32 --task train,embed-image,embed-text --batch 32 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import flops
from benchmarks.batches import CAPTION_HELP, parse_caption_tokens
from benchmarks.bench_report import phase_note, ratio_lines, write_report
from benchmarks.workloads_mlx import MODES, TASKS
from mlx_clip import host_malloc
from mlx_clip.memory import is_auto, parse_bytes

BACKENDS = ("mlx", "torch")
LATENCY_TASKS = ("embed-image", "embed-text")  # also timed at batch 1: the latency of one request
# train steps queued per timed run on a GPU (`bench`'s steps_per_run): a training loop's pace, not a step's latency
TRAIN_STEPS_PER_RUN = 4


def resolve_device(name: str = "auto") -> str:
    """cpu | cuda | mps. "auto" is the accelerator MLX sees (Metal on a Mac, CUDA elsewhere), as torch_ref picks mps >
    cuda > cpu; both backends are then told the same device explicitly."""
    name = (name or "auto").lower()
    if name in ("cpu", "cuda", "mps"):
        return name
    if name not in ("auto", "gpu"):
        raise ValueError(f"device must be auto, cpu, cuda, mps or gpu, got {name!r}")
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        return "mps" if sys.platform == "darwin" else "cuda"
    if name == "gpu":
        raise ValueError("device 'gpu': MLX has no GPU here")
    return "cpu"


def _split(value, allowed, what: str) -> list[str]:
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"{what} must be a comma-separated subset of {', '.join(allowed)}, got {value!r}")
    return items


def _env(backend: str, device: str, dtype: str, task: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # MLX runs under the malloc the product would give it (host_malloc.py: mimalloc or jemalloc on a GPU and for CPU
    # training, as `mlxclip finetune` runs), torch under the one torch users run it with
    library, _ = host_malloc.choose(os.environ.get("MLXCLIP_MALLOC"), on_gpu=device != "cpu", training=task == "train")
    env = host_malloc.with_preload(env, library) if backend == "mlx" and library else \
        host_malloc.without_preload(env, library)
    if backend == "torch":
        env["MLXCLIP_BLAS"] = "none"  # torch brings its own MKL; keep the MLX preload out of the torch process
    if backend == "mlx" and device == "cuda" and dtype == "float32":
        env.setdefault("MLX_ENABLE_TF32", "0")  # torch's default fp32 matmul is full fp32, not TF32
    return env


def _json_lines(module: str, *args: str, env: dict) -> tuple[list[dict], str]:
    """(the JSON lines it printed, error text: its stderr's last line if it failed) of `python -m module args`."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return records, error


def run_one(spec: dict) -> tuple[list[dict], str]:
    """(records, error text) of one worker process."""
    return _json_lines("benchmarks.bench_worker", json.dumps(spec),
                       env=_env(spec["backend"], spec["device"], spec["dtype"], spec["task"]))


def measure_peak(device: str, dtype: str) -> dict:
    """MLX's matmul rate on `device` in `dtype` (benchmarks/flops.py), in a process of its own with the MLX worker's
    environment (so TF32 and the BLAS are those the MLX rows ran under; the malloc a train row's, which a large
    matmul's rate does not depend on)."""
    records, error = _json_lines("benchmarks.flops", device, dtype, env=_env("mlx", device, dtype, "train"))
    if error or not records:
        raise RuntimeError(f"measuring the {dtype} matmul rate on {device} failed: {error or '(no output)'}")
    return records[-1]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(arch: str, backends="mlx,torch", tasks="train,embed-image,embed-text", batch: int = 32, device: str = "auto",
          out=None, as_json: bool = False, dtype: str = "float32", modes="eager,compiled", runs: int = 5,
          warmup: int = 2, seed: int = 0, caption_tokens: str | None = None, rounds: int = 1,
          memory_limit: str | None = None, steps_per_run: int | None = None) -> list[dict]:
    """Measure and (with `out`) write the report files; returns the records. With `as_json`, stdout carries the
    JSON lines only (one per measurement); progress and ratios go to stderr.

    With `rounds` > 1 every measurement is repeated that many times, the backends taking turns (MLX, torch; then
    torch, MLX; ...), and each row reports the round with the median items/s (`round_items_per_s` lists them all):
    on a machine whose speed drifts by 10-40% over minutes (a shared VM), one process per side would put the drift
    into the ratio.

    `memory_limit` ("19GiB", "8GB", ...) sets MLX's memory limit in its measuring processes (`mx.set_memory_limit`,
    as `mlxclip finetune --memory-limit` does): MLX then holds queued work back while its active memory is over it,
    which lowers the peak that in-flight kernels' buffers add, at some speed; torch's side runs as it is. "auto": one
    un-queued run's measured peak and a tenth more (`mlx_clip.memory.one_step_limit`), measured in each MLX process
    before its warm-up, so that only queued work waits.

    `steps_per_run` (train): each timed run queues that many steps back to back, reading each step's loss once the
    next is queued, and waits for the last, as a training loop does (`mlx_clip.train.loop.train`; torch's reference
    step the same way), and reports the time per step.
    Default (None): TRAIN_STEPS_PER_RUN on a GPU, where a step's host work would otherwise leave the device idle at
    every step's start, 1 on the CPU, where host and computation share the cores."""
    backends, tasks = _split(backends, BACKENDS, "backend"), _split(tasks, TASKS, "task")
    modes = _split(modes, MODES, "mode")
    if batch < 1 or runs < 1 or rounds < 1 or (steps_per_run is not None and steps_per_run < 1):
        raise ValueError("batch, runs, rounds and steps_per_run must be >= 1")
    parse_caption_tokens(caption_tokens)  # a bad spec fails here, not in every worker
    limit = "auto" if is_auto(memory_limit) else parse_bytes(memory_limit) if memory_limit else None
    device = resolve_device(device)
    if steps_per_run is None:
        steps_per_run = 1 if device == "cpu" else TRAIN_STEPS_PER_RUN
    from benchmarks.machine import machine_info
    from converters.convert import arch_config

    machine = machine_info(device)
    # MFU: the model's FLOPs (benchmarks/flops.py) at each row's items/s over MLX's measured matmul rate on this
    # device and dtype, measured once, before the measuring processes start, in a process like theirs
    config = arch_config(arch)
    machine["matmul_peak"] = measure_peak(device, dtype)
    records, failures = [], []
    plan = [(task, b) for task in tasks for b in ([1, batch] if task in LATENCY_TASKS and batch > 1 else [batch])]
    for task, size in plan:
        measured = {}
        for turn in range(rounds):
            for backend in (backends if turn % 2 == 0 else backends[::-1]):
                for mode in modes:
                    spec = dict(backend=backend, mode=mode, task=task, arch=arch, batch=size, device=device,
                                dtype=dtype, runs=runs, warmup=warmup, seed=seed, caption_tokens=caption_tokens,
                                memory_limit=limit, steps_per_run=steps_per_run)
                    got, error = run_one(spec)
                    if error:
                        failures.append(f"{task} batch {size} {backend} {mode}: {error}")
                        _say(f"{arch} {task} batch {size} {backend} {mode}: failed: {error}")
                    for rec in got:
                        measured.setdefault((backend, mode, rec["batch"]), []).append(rec)
        for (backend, mode, _), runs_of_it in sorted(measured.items(), key=lambda kv: backends.index(kv[0][0])):
            rec = _median_round(runs_of_it)
            rec["machine"], rec["settings"] = machine["label"], machine["settings"]
            rec.update(flops.utilisation(rec, config, machine["matmul_peak"]["tflops"]))
            records.append(rec)
            if as_json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"{arch} {task} batch {rec['batch']} {backend} {mode} ({device}, {dtype}): "
                      f"{rec['items_per_s']:.2f} items/s, {rec['latency_ms_p50']:.1f} ms p50, "
                      f"peak {rec['peak_mem_bytes'] / 2**20:.0f} MiB" + phase_note(rec) + _host_note(rec)
                      + f", MFU {100 * rec['mfu']:.1f}%"
                      + _rounds_note(rec), flush=True)
    for line in ratio_lines(records):
        (_say if as_json else print)(line)
    if out is not None:
        paths = write_report(records, machine, out, arch, device, dtype, batch, failures, caption_tokens)
        _say("wrote " + ", ".join(str(p) for p in paths))
    return records


def _median_round(recs: list[dict]) -> dict:
    """One record for a measurement repeated in rounds: the round with the median items/s, with every round's items/s,
    the fastest and slowest run of them all and the highest peak memory."""
    if len(recs) == 1:
        return recs[0]
    rec = dict(sorted(recs, key=lambda r: r["items_per_s"])[len(recs) // 2])
    rec.update(round_items_per_s=[r["items_per_s"] for r in recs],
               items_per_s_best=max(r.get("items_per_s_best", r["items_per_s"]) for r in recs),
               min_s=min(r["min_s"] for r in recs), max_s=max(r["max_s"] for r in recs),
               peak_mem_bytes=max(r["peak_mem_bytes"] for r in recs))
    phases = [r["peak_by_phase_bytes"] for r in recs if "peak_by_phase_bytes" in r]
    if phases:  # each phase's highest over the rounds, as the row's peak is
        rec["peak_by_phase_bytes"] = {k: max(p.get(k, 0) for p in phases) for k in phases[0]}
    return rec


def _host_note(rec: dict) -> str:
    """MLX's host time a step, and the host core's pace (benchmarks.host_pace) the row ran at."""
    note = f", host {rec['host_ms_p50']:.1f} ms" if "host_ms_p50" in rec else ""
    return note + (f", pace {rec['host_probe_ms_p50']:.2f} ms" if "host_probe_ms_p50" in rec else "")


def _rounds_note(rec: dict) -> str:
    per_round = rec.get("round_items_per_s")
    return f" (median of {len(per_round)} rounds: " + ", ".join(f"{v:.2f}" for v in per_round) + ")" if per_round else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--backend", default="mlx,torch")
    ap.add_argument("--task", default="train,embed-image,embed-text")
    ap.add_argument("--mode", default="eager,compiled")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--caption-tokens", help=CAPTION_HELP)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement, the backends taking turns")
    ap.add_argument("--memory-limit", help="MLX's memory limit in its measuring processes, e.g. 19GiB, or auto (one "
                                           "run's measured peak and 10%% more)")
    ap.add_argument("--steps-per-run", type=int, help="train: steps queued back to back per timed run (default: "
                    f"{TRAIN_STEPS_PER_RUN} on a GPU, 1 on the CPU)")
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bench(a.arch, a.backend, a.task, a.batch, a.device, a.out, a.json, a.dtype, a.mode, a.runs, a.warmup,
          caption_tokens=a.caption_tokens, rounds=a.rounds, memory_limit=a.memory_limit, steps_per_run=a.steps_per_run)
    return 0


if __name__ == "__main__":
    import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

    raise SystemExit(main())
