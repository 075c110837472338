"""One measurement process of `mlxclip bench`: one backend, mode, task and batch; prints a JSON line on stdout.

Each measurement runs in a fresh process so that neither library's threads, caches or compiled kernels touch the
other's numbers, and so that the peak memory belongs to that measurement alone.

Peak memory (`peak_mem_bytes`, with `peak_mem_source` saying which):
- CUDA: the allocator's peak since just before the model was built: `mx.get_peak_memory()` for MLX,
  `torch.cuda.max_memory_allocated()` for torch (parameters, gradients, optimizer state, activations; no cache).
- CPU (and MPS): the growth of the process's resident set from just before the model was built to its high-water mark
  (Linux `VmHWM`, reset through /proc/self/clear_refs before each measurement; `ru_maxrss` elsewhere, which is not
  reset and also carries the parent's peak across exec), the same count for both backends. It includes allocator
  caches and, for torch.compile, the compiler's own memory. MLX's allocator peak is given too
  (`mlx_allocator_peak_bytes`).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time

from benchmarks.host_pace import settled_probe_ms

PACE_PROBES = 3  # host-pace probes before and after a row's timed runs
MIN_LATENCY_RUNS = 20  # batch-1 runs are short and their median is the latency: take more of them


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): growth is then counted from the process's own high-water mark
        return _rss_high_water()


def _rss_high_water() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def measure(run, warmup: int, runs: int, per_run: int = 1, mark=lambda phase: None) -> dict:
    """Time `runs` calls after `warmup` untimed ones (at least one: it pays for compilation and is reported apart, as
    the whole call). A call that does `per_run` iterations (train steps queued back to back) is timed per iteration.
    Around the timed calls, not between them (they run back to back, as before), a fixed loop is timed PACE_PROBES
    times before and after (benchmarks.host_pace): the host core's pace while the row ran. `mark(phase)` is called
    after each phase ("build" before the first call, "first_run", "warmup", "timed" after each timed call): the
    memory's peak per phase (`_Memory.mark`), read outside the timed spans."""
    mark("build")
    tick = time.perf_counter()
    run()
    first = time.perf_counter() - tick
    mark("first_run")
    for _ in range(max(warmup, 1) - 1):
        run()
    mark("warmup")
    pace = [settled_probe_ms() for _ in range(PACE_PROBES)]
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        run()
        times.append((time.perf_counter() - tick) / per_run)
        mark("timed")  # after the clock: a host-side counter read and reset, no device sync
    pace += [settled_probe_ms() for _ in range(PACE_PROBES)]
    return {"first_run_s": first, "times_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "host_probe_ms": pace, "host_probe_ms_p50": statistics.median(pace)}


def _builder(spec: dict):
    from benchmarks.batches import parse_caption_tokens
    from converters.convert import arch_config

    config = arch_config(spec["arch"])
    words = parse_caption_tokens(spec.get("caption_tokens"))
    if spec["backend"] == "mlx":
        import mlx.core as mx

        from benchmarks.workloads_mlx import mlx_workload

        mx.set_default_device(mx.cpu if spec["device"] == "cpu" else mx.gpu)
        if spec.get("memory_limit") and spec["memory_limit"] != "auto":  # MLX holds queued work back over it
            mx.set_memory_limit(int(spec["memory_limit"]))
        return lambda batch: mlx_workload(config, spec["task"], batch, spec["mode"], spec["dtype"], spec["seed"],
                                          words)
    from benchmarks.workloads_torch import torch_workload
    from torch_ref.device import pick_device

    device = pick_device(spec["device"])
    return lambda batch: torch_workload(config, spec["task"], batch, spec["mode"], spec["dtype"], device, spec["seed"],
                                        words)


class _Memory:
    """Peak memory of one measurement, by the rule in the module docstring, and the allocator's peak per phase
    (`mark`): a row's peak may be its first run's (compilation, state made on first use) or the steady runs'
    (queued steps), and only the split says which (session 28: ViT-B-32's un-queued step on an H200 peaked
    at 11.4 GiB over a row and 8.4 GiB in one run)."""

    def __init__(self, spec: dict):
        self.backend, self.device = spec["backend"], spec["device"]
        self.limit = spec.get("memory_limit") if self.backend == "mlx" else None
        self.rss_start = _rss_now()
        self.phases: dict[str, int] = {}  # phase -> the allocator's peak in it (the highest, for "timed")
        self.timed_peaks: list[int] = []
        self.allocator = self._allocator()  # the backend is imported by now (run_worker builds it first)

    def _allocator(self):
        """(peak since the last reset, reset) of the measuring allocator: MLX's on any device, torch's on CUDA; None
        where there is none (torch on the CPU: its peak is the resident set's)."""
        if self.backend == "mlx":
            import mlx.core as mx

            return mx.get_peak_memory, mx.reset_peak_memory
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats
        return None

    def mark(self, phase: str) -> None:
        """Close `phase`: its allocator peak is recorded and the allocator's peak counter restarts (the row's peak
        stays the highest of all phases: `read`)."""
        if self.allocator is None:
            return
        peak, reset = self.allocator
        got = int(peak())
        self.phases[phase] = max(self.phases.get(phase, 0), got)
        if phase == "timed":
            self.timed_peaks.append(got)
        reset()

    def _allocator_peak(self) -> int:
        """The allocator's peak over the whole measurement: the phases `mark` closed and the one still open."""
        return int(max(self.allocator[0](), *self.phases.values()))

    def reset(self) -> None:
        gc.collect()
        if self.backend == "mlx":
            import mlx.core as mx

            mx.clear_cache()
            mx.reset_peak_memory()
        elif self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _reset_high_water()
        self.rss_start = _rss_now()

    def read(self) -> dict:
        out = {"rss_growth_bytes": _rss_high_water() - self.rss_start}
        if self.backend == "mlx":
            out["mlx_allocator_peak_bytes"] = self._allocator_peak()
        if self.device == "cuda":
            source = "mx.get_peak_memory" if self.backend == "mlx" else "torch.cuda.max_memory_allocated"
            out.update(peak_mem_bytes=self._allocator_peak(), peak_mem_source=source)
        else:
            out.update(peak_mem_bytes=out["rss_growth_bytes"], peak_mem_source="rss growth")
        if self.phases:  # the allocator's, also where the row's peak is the resident set's (MLX on the CPU)
            out.update(peak_by_phase_bytes=dict(self.phases), peak_timed_runs_bytes=list(self.timed_peaks))
        if self.limit:
            import mlx.core as mx

            limit = int(mx.get_memory_limit())  # read back from MLX: the run's limit
            how = ", auto" if self.limit == "auto" else ""
            out.update(mlx_memory_limit_bytes=limit,
                       peak_mem_source=out["peak_mem_source"] + f" (limit {limit / 2**30:.1f} GiB{how})")
        return out


def _limit_to_one_run(run, memory: "_Memory") -> None:
    """--memory-limit auto: MLX's limit at one un-queued run's peak (the second run's: the first traces and compiles)
    and a tenth more, as `mlxclip finetune --memory-limit auto` sets it from one step. Both runs' peaks stay in the
    row's (phases "first_run" and "limit_probe"). These runs come before the warm-up, so the row's first run no
    longer includes the compilation."""
    import mlx.core as mx

    from mlx_clip.memory import one_step_limit

    memory.mark("build")
    run()
    memory.mark("first_run")
    run()
    memory.mark("limit_probe")
    mx.set_memory_limit(one_step_limit(memory.phases["limit_probe"]))


def run_worker(spec: dict) -> dict:
    build = _builder(spec)  # imports the backend first: its libraries are not the workload's memory
    memory = _Memory(spec)
    memory.reset()
    workload = build(spec["batch"])
    if spec["backend"] == "mlx" and spec.get("memory_limit") == "auto":
        _limit_to_one_run(workload.run, memory)
    runs = max(spec["runs"], MIN_LATENCY_RUNS) if workload.items == 1 else spec["runs"]
    load_before = os.getloadavg()[0]
    per_run = spec.get("steps_per_run", 1) if workload.run_steps else 1
    run = workload.run if per_run == 1 else (lambda: workload.run_steps(per_run))
    timing = measure(run, spec["warmup"], runs, per_run, memory.mark)
    record = {k: spec[k] for k in ("backend", "mode", "task", "arch", "device", "dtype")}
    record["caption_tokens"] = spec.get("caption_tokens")
    record.update(batch=workload.items, items_per_s=workload.items / timing["median_s"],
                  items_per_s_best=workload.items / timing["min_s"],  # the least disturbed run, on a shared machine
                  latency_ms_p50=1e3 * timing["median_s"],
                  spread_pct=100 * (timing["max_s"] - timing["min_s"]) / timing["median_s"],
                  runs=runs, warmup=max(spec["warmup"], 1), steps_per_run=per_run, **timing, **memory.read(),
                  load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)])  # other jobs on the machine
    if spec["backend"] == "mlx":  # a host-bound GPU step's speed depends on the malloc (torch's process: glibc's)
        from mlx_clip import host_malloc

        record["malloc"] = host_malloc.in_use()
    if spec["task"] == "train":
        record["pairs_per_s"] = record["items_per_s"]  # one image and one caption per pair
    if getattr(workload, "host_s", None):  # MLX's train step: the timed runs' host time (workloads_mlx.Workload)
        host = workload.host_s[-runs * per_run:]  # per step
        record.update(host_s=host, host_ms_p50=1e3 * statistics.median(host))
    return record


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec["backend"] == "mlx":
        import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
    print(json.dumps(run_worker(spec)), flush=True)
