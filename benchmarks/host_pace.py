"""The host core's pace, as one fixed loop's time (issue 7).

On the lent H200 the host's vCPUs ran the same instructions up to 2x slower for minutes at a time, within one
process (results/gpu-s25-h200.md: a fixed pure-Python loop slowed with MLX's host-bound step, correlation 0.8-0.94),
and this 2-core VM drifts too. Timing this loop beside a measurement says at what pace it ran: a slower row with a
slower probe is the machine, one with the same probe is the code.
"""

from __future__ import annotations

import time

PROBE_ITERATIONS = 100_000
# After a run a process's own threads may still hold a core: torch's OpenMP workers spin-wait after each parallel
# region, and on this 2-vCPU VM the probe right after a torch `small` train run read 5.6-5.9 ms against 5.0 ms after
# 0.1 s (the same process, alternating): what a row reports is the machine's pace, so it waits this long first.
SETTLE_S = 0.1


def probe_ms(n: int = PROBE_ITERATIONS) -> float:
    """A fixed CPU-bound loop on the calling thread, ms: a few small Python ints, no arrays, nothing of MLX's or
    torch's, so its time follows the core's pace and not the process's state (~6 ms on the H200 host at its fast
    pace, ~5 ms on this VM)."""
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i & 7
    return 1e3 * (time.perf_counter() - start)


def settled_probe_ms() -> float:
    """probe_ms after SETTLE_S of sleep: the machine's pace, not the last run's leftover threads."""
    time.sleep(SETTLE_S)
    return probe_ms()
