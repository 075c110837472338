"""Per-step summary of a profiled timeline (issue 7): where a slow step's time goes next to a fast one's.

`benchmarks.gpu_profile --trace` wraps each step in a `step N` annotation and exports torch.profiler's Chrome trace,
whose device events (kernels, memcpy, memset) share the annotations' clock. For each step this prints:

- wall: the annotation's length (host: the step's call, including its final sync);
- kernels: the sum of the device events' durations that start inside it, and `busy`, their union (equal unless
  two streams overlap);
- idle: the device's gaps between its first and last event (the host not keeping the queue full), and how many of
  them are over 50 us; lead: from the step's start to its first device event (the host building the graph);
- the kernels' time by kind (gpu_profile.KINDS), to see whether the kernels themselves ran slower.

A step whose kernels take as long as a fast step's but whose idle grew is paced by the host; one whose kernels grew
is paced by the device (clocks, memory).

    python -m benchmarks.trace_steps out/trace.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import re

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_NAME = re.compile(r"^step (\d+)$")
GAP_US = 50.0


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """(total length covered, the gaps between covered stretches) of [start, end) intervals."""
    covered, gaps, end = 0.0, [], None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None:
                gaps.append(start - end)
            covered += stop - start
            end = stop
        elif stop > end:
            covered += stop - end
            end = stop
    return covered, gaps


def summarize(events: list[dict], kind=None) -> list[dict]:
    """One row per `step N` annotation (times in ms): wall, kernels, busy, idle, gaps, lead, by_kind."""
    steps = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                    and STEP_NAME.match(str(e.get("name", "")))), key=lambda e: e["ts"])
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    rows = []
    for step in steps:
        start, stop = step["ts"], step["ts"] + step["dur"]
        inside = [e for e in device if start <= e["ts"] < stop]
        intervals = [(e["ts"], e["ts"] + e["dur"]) for e in inside]
        busy, gaps = _union(intervals)
        by_kind: dict[str, float] = {}
        for e in inside:
            name = kind(e["name"]) if kind else e.get("cat")
            by_kind[name] = by_kind.get(name, 0.0) + e["dur"] / 1e3
        first = min((a for a, _ in intervals), default=stop)
        rows.append(dict(step=int(STEP_NAME.match(step["name"]).group(1)), wall=step["dur"] / 1e3,
                         kernels=sum(e["dur"] for e in inside) / 1e3, busy=busy / 1e3, idle=sum(gaps) / 1e3,
                         gaps=sum(g > GAP_US for g in gaps), lead=(first - start) / 1e3, launches=len(inside),
                         by_kind=by_kind))
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        kinds = ", ".join(f"{k} {ms:.1f}" for k, ms in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]))
        lines.append(f"step {r['step']}: wall {r['wall']:.1f} ms, kernels {r['kernels']:.1f} (busy {r['busy']:.1f}, "
                     f"{r['launches']} events), idle {r['idle']:.1f} ({r['gaps']} gaps > {GAP_US:.0f} us), "
                     f"lead {r['lead']:.1f} | {kinds}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a Chrome trace JSON (.json or .json.gz) written by gpu_profile --trace")
    args = ap.parse_args()
    from benchmarks.gpu_profile import _kind  # the same kinds as the profile's table
    print("\n".join(format_rows(summarize(load_events(args.trace), kind=_kind))))


if __name__ == "__main__":
    main()
