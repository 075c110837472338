"""What the host does differently when MLX's step changes pace within one process (issue 7).

On the lent card ViT-B-32's host-bound step runs ~42 ms for a few steps, then ~55 ms for the rest of the process
(sessions 13-15, 23, 24), and the ViT-B-32 bars hang on it. This runs many steps in one process, each evaluated
before the next is built (as `benchmarks.gpu_host`'s split), and records beside each step's build / encode / wait
times the counters that would name a host-side cause:

- the process's user and system CPU time, minor page faults and context switches (getrusage): a kernel-side
  cause (driver calls, page faults) shows as system time, a contended core as involuntary switches;
- the CPU the main thread last ran on (/proc/self/stat): a move to another core or NUMA node;
- CPU time of every thread of the process (/proc/self/task): a helper thread (MLX's completion workers, the CUDA
  driver's) that takes over a core;
- Python's garbage collector (time in collections, via gc.callbacks);
- MLX's allocator: active and cached bytes;
- a fixed pure-Python probe timed on the main thread after each step, and the machine's steal time (/proc/stat):
  if the probe slows with the step, the core itself got slower (clock, a noisy neighbour, the hypervisor); if it
  holds while the step slows, the cause is in the process's own state (memory layout, caches).

The summary sets the slowest third of the steps against the fastest third, counter by counter. Session 25's answer
(results/gpu-s25-h200.md): the probe slows with the step (correlation with the main thread's CPU 0.66-0.94) and
nothing else moves, so it is the core's pace. The probe runs right after each step, unsettled (host_pace.SETTLE_S is
for torch's spinning workers; MLX's threads block), to follow the pace step by step.

    python -m benchmarks.gpu_regime --arch ViT-B-32 --steps 60 --out regime.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.batches import add_card_step_args, parse_caption_tokens
from benchmarks.gpu_host import _split
from benchmarks.host_pace import probe_ms
from benchmarks.workloads_mlx import mlx_workload
from mlx_clip.config import get_config

RUSAGE = ("ru_utime", "ru_stime", "ru_minflt", "ru_majflt", "ru_nvcsw", "ru_nivcsw")


class _GcClock:
    """Seconds spent in Python's garbage collections since the last read."""

    def __init__(self):
        self.total, self._start = 0.0, None
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None

    def read(self) -> float:
        out, self.total = self.total, 0.0
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._on)


def _last_cpu(task: str = "self") -> int:
    # Field 39 of /proc/.../stat (processor); the comm field may hold spaces, so count from its closing paren.
    path = "/proc/self/stat" if task == "self" else f"/proc/self/task/{task}/stat"
    with open(path) as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, keyed by tid ("main" for the main thread): schedstat's nanosecond
    run time where the kernel keeps it, else stat's clock ticks (10 ms, too coarse for one step)."""
    pid, out = os.getpid(), {}
    for tid in os.listdir("/proc/self/task"):
        name = "main" if int(tid) == pid else tid
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[name] = int(f.read().split()[0]) / 1e9
        except FileNotFoundError:  # the thread ended between listdir and open, or no schedstat
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except FileNotFoundError:
                continue
    return out


def _thread_cores(names) -> dict[str, int]:
    """The core each named thread last ran on (two busy threads on one core, or on hyperthread siblings, slow both)."""
    out = {}
    for name in names:
        try:
            out[name] = _last_cpu("self" if name == "main" else name)
        except FileNotFoundError:
            continue
    return out


def _steal_ms() -> float:
    """The machine's steal time (all cores, ms): a hypervisor running something else on our vCPUs."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return 1e3 * int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def _deltas(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _rusage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {k: float(getattr(r, k)) for k in RUSAGE}


def measure_step(load, gc_clock: _GcClock) -> dict:
    """One step, split as gpu_host's, with the counters' changes over it."""
    usage, threads, steal = _rusage(), _thread_cpu(), _steal_ms()
    build, encode, wait, encode_cpu = _split(load)
    steal = _steal_ms() - steal
    row = {"ms": 1e3 * (build + encode + wait), "build_ms": 1e3 * build, "encode_ms": 1e3 * encode,
           "wait_ms": 1e3 * wait, "encode_cpu_ms": 1e3 * encode_cpu, "gc_ms": 1e3 * gc_clock.read(),
           "cpu": _last_cpu(), "active_mib": mx.get_active_memory() / 2**20,
           "cache_mib": mx.get_cache_memory() / 2**20, "steal_ms": steal, "probe_ms": probe_ms()}
    row.update({k[3:] + ("_ms" if k.endswith("time") else ""): v * (1e3 if k.endswith("time") else 1)
                for k, v in _deltas(_rusage(), usage).items()})
    busy = {k: v for k, v in _deltas(_thread_cpu(), threads).items() if v > 0}
    row["threads_ms"] = {k: round(1e3 * v, 1) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:6]}
    row["threads_core"] = _thread_cores(row["threads_ms"])
    row["main_cpu_ms"] = row["threads_ms"].get("main", 0.0)
    row["other_cpu_ms"] = sum(v for k, v in row["threads_ms"].items() if k != "main")
    return row


def summarise(rows: list[dict]) -> dict:
    """The mean of each numeric counter over the fastest and the slowest third of the steps."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["ms"])
    third = max(1, len(rows) // 3)
    groups = {"fast": sorted(order[:third]), "slow": sorted(order[-third:])}
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "cpu"]
    out = {}
    for name, steps in groups.items():
        out[name] = {k: float(np.mean([rows[i][k] for i in steps])) for k in keys}
        out[name].update(cpus=sorted({rows[i]["cpu"] for i in steps}), steps=steps)
    return out


def pace_free(rows: list[dict]) -> dict:
    """The host's work per step in units of the probe (median over steps): the same for a setting whatever pace the
    core ran at (the probe runs on the main thread, so its own time is taken out of the main thread's)."""
    def ratio(key, minus=0.0):
        return float(np.median([(r[key] - minus * r["probe_ms"]) / r["probe_ms"] for r in rows]))
    return {"main_cpu": ratio("main_cpu_ms", 1.0), "build": ratio("build_ms"), "encode_cpu": ratio("encode_cpu_ms")}


def _print_summary(summary: dict) -> None:
    fast, slow = summary["fast"], summary["slow"]
    for k in fast:
        if k in ("cpus", "steps"):
            print(f"  {k:>14}: fast {fast[k]}  slow {slow[k]}")
        else:
            print(f"  {k:>14}: fast {fast[k]:10.2f}  slow {slow[k]:10.2f}")


def main():
    ap = argparse.ArgumentParser()
    add_card_step_args(ap)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="write each step's row here (JSON lines)")
    args = ap.parse_args()
    load = mlx_workload(get_config(args.arch), "train", args.batch, "compiled", args.dtype,
                        words=parse_caption_tokens(args.caption_tokens))
    for _ in range(args.warmup):
        load.run()
    gc_clock = _GcClock()
    rows = []
    for i in range(args.steps):
        rows.append(measure_step(load, gc_clock))  # the probe's own time is in main_cpu_ms (pace_free takes it out)
        r = rows[-1]
        print(f"step {i:3d} {r['ms']:6.1f} ms (build {r['build_ms']:5.1f} encode {r['encode_ms']:5.1f} cpu "
              f"{r['encode_cpu_ms']:5.1f} wait {r['wait_ms']:5.1f}) sys {r['stime_ms']:5.1f} user "
              f"{r['utime_ms']:5.1f} minflt {r['minflt']:6.0f} ivcsw {r['nivcsw']:4.0f} cpu{r['cpu']} "
              f"probe {r['probe_ms']:.2f} steal {r['steal_ms']:.0f} gc {r['gc_ms']:.1f} cache {r['cache_mib']:.0f} "
              f"MiB threads {r['threads_ms']} on cores {r['threads_core']}", flush=True)
    gc_clock.close()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{args.arch} b{args.batch} {args.dtype}: median {np.median([r['ms'] for r in rows]):.1f} ms; "
          "fastest third vs slowest third:")
    _print_summary(summarise(rows))
    free = pace_free(rows)
    print(f"host work in probes (pace-free, median): main thread {free['main_cpu']:.2f}, build {free['build']:.2f}, "
          f"encode {free['encode_cpu']:.2f}; probe median {np.median([r['probe_ms'] for r in rows]):.2f} ms")


if __name__ == "__main__":
    main()
