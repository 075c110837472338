"""benchmarks.trace_steps against a numpy timeline: per-step device busy time, idle gaps and lead on random traces."""

import gzip
import json

import numpy as np

from benchmarks.trace_steps import GAP_US, format_rows, load_events, summarize


def _random_trace(rng, steps=3):
    """Steps of random length, each with random (sometimes overlapping) kernels inside, plus noise outside them."""
    events, t = [], 100
    for i in range(steps):
        wall = int(rng.integers(2_000, 5_000))
        events.append(dict(ph="X", cat="user_annotation", name=f"step {i}", ts=t, dur=wall))
        events.append(dict(ph="X", cat="gpu_user_annotation", name=f"step {i}", ts=t + 5, dur=wall))  # ignored
        for _ in range(int(rng.integers(5, 40))):
            start = t + int(rng.integers(0, wall))
            events.append(dict(ph="X", cat=str(rng.choice(["kernel", "gpu_memset"])), name="k",
                               ts=start, dur=int(rng.integers(1, 300))))
        events.append(dict(ph="X", cat="cpu_op", name="aten::mm", ts=t + 1, dur=10))  # not a device event
        t += wall + int(rng.integers(0, 500))
    events.append(dict(ph="X", cat="kernel", name="k", ts=t + 50, dur=10))  # after the last step: in none
    return events


def _reference(events):
    """Per step from a 1-us boolean timeline of the device events that start inside it."""
    rows = []
    for s in (e for e in events if e["cat"] == "user_annotation"):
        inside = [e for e in events if e["cat"] in ("kernel", "gpu_memset") and s["ts"] <= e["ts"] < s["ts"] + s["dur"]]
        lo, hi = min(e["ts"] for e in inside), max(e["ts"] + e["dur"] for e in inside)
        timeline = np.zeros(hi - lo, bool)
        for e in inside:
            timeline[e["ts"] - lo : e["ts"] + e["dur"] - lo] = True
        edges = np.flatnonzero(np.diff(timeline.astype(np.int8)))  # off stretches lie between a fall and a rise
        falls, rises = edges[timeline[edges]], edges[~timeline[edges]]
        gaps = [r - f for f, r in zip(falls, rises)]
        rows.append(dict(busy=timeline.sum() / 1e3, idle=(~timeline).sum() / 1e3, gaps=sum(g > GAP_US for g in gaps),
                         kernels=sum(e["dur"] for e in inside) / 1e3, lead=(lo - s["ts"]) / 1e3,
                         wall=s["dur"] / 1e3, launches=len(inside)))
    return rows


def test_summary_matches_a_timeline_reference(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(20):
        events = _random_trace(rng)
        path = tmp_path / f"t{trial}.json.gz"
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": events}, f)
        got, want = summarize(load_events(str(path))), _reference(events)
        assert [r["step"] for r in got] == list(range(len(want)))
        for g, w in zip(got, want):
            for key in w:
                assert abs(g[key] - w[key]) < 1e-9, (trial, key, g[key], w[key])
            assert abs(sum(g["by_kind"].values()) - w["kernels"]) < 1e-9
        assert len(format_rows(got)) == len(want)


def test_kinds_follow_the_given_classifier():
    events = [dict(ph="X", cat="user_annotation", name="step 0", ts=0, dur=100),
              dict(ph="X", cat="kernel", name="nvjet_gemm", ts=10, dur=20),
              dict(ph="X", cat="kernel", name="my_attention", ts=40, dur=30)]
    (row,) = summarize(events, kind=lambda name: "gemm" if "gemm" in name else "other")
    assert row["by_kind"] == {"gemm": 0.02, "other": 0.03}
    assert row["idle"] == 0.01 and row["gaps"] == 0 and row["lead"] == 0.01
