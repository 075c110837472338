"""benchmarks.gpu_regime: the per-step counters and the fast / slow split that name a host-side change of pace."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.gpu_regime import _GcClock, measure_step, summarise


class _Load:
    """A stand-in workload: one matmul chain per launch, as gpu_host's split calls it."""

    def __init__(self):
        self.x = mx.random.normal((256, 256))

    def launch(self):
        y = self.x
        for _ in range(8):
            y = mx.tanh(y @ self.x)
        return [y]


def test_a_step_row_adds_up_and_counts_the_main_thread():
    load, clock = _Load(), _GcClock()
    mx.eval(load.launch())
    row = measure_step(load, clock)
    clock.close()
    assert np.isclose(row["ms"], row["build_ms"] + row["encode_ms"] + row["wait_ms"])
    assert row["ms"] > 0 and row["utime_ms"] >= 0 and row["minflt"] >= 0
    assert "main" in row["threads_ms"] and row["main_cpu_ms"] == row["threads_ms"]["main"]
    assert set(row["threads_core"]) <= set(row["threads_ms"])
    assert row["cache_mib"] >= 0 and row["active_mib"] > 0


def test_the_garbage_collectors_time_is_counted_once():
    clock = _GcClock()
    junk = [[i] for i in range(200_000)]
    for a, b in zip(junk, junk[1:]):
        a.append(b)  # reference chains, so a collection has work to do
    import gc
    gc.collect()
    first = clock.read()
    clock.close()
    assert first > 0 and clock.read() == 0.0
    gc.collect()  # closed: no longer counted
    assert clock.read() == 0.0


def test_summary_sets_the_slowest_third_against_the_fastest():
    rows = [{"ms": ms, "stime_ms": s, "cpu": c} for ms, s, c in
            [(40, 1, 0), (41, 2, 0), (42, 1, 0), (55, 9, 3), (56, 11, 3), (54, 10, 2)]]
    out = summarise(rows)
    assert out["fast"]["steps"] == [0, 1] and out["slow"]["steps"] == [3, 4]
    assert out["fast"]["ms"] == 40.5 and out["slow"]["ms"] == 55.5
    assert out["slow"]["stime_ms"] == 10.0 and out["fast"]["cpus"] == [0] and out["slow"]["cpus"] == [3]
    assert "cpu" not in out["fast"]


def test_pace_free_work_holds_when_the_core_slows():
    # Same work, the core at two paces: the probe and every host time scale together, so the ratios do not move.
    rows = [{"probe_ms": p, "main_cpu_ms": 7 * p, "build_ms": 1 * p, "encode_cpu_ms": 4 * p}
            for p in (6.0, 6.2, 9.0, 12.0)]
    from benchmarks.gpu_regime import pace_free
    out = pace_free(rows)
    assert np.isclose(out["main_cpu"], 6.0) and np.isclose(out["build"], 1.0) and np.isclose(out["encode_cpu"], 4.0)


def test_the_pace_probe_times_a_fixed_amount_of_work():
    from benchmarks.host_pace import probe_ms
    short, long = min(probe_ms(20_000) for _ in range(3)), min(probe_ms(200_000) for _ in range(3))
    assert 0 < short < long  # ten times the loop: a timer of the work, not a constant


def test_the_settled_probe_waits_for_leftover_threads_first():
    import time
    from benchmarks import host_pace
    start = time.perf_counter()
    assert host_pace.settled_probe_ms() > 0
    assert time.perf_counter() - start >= host_pace.SETTLE_S
