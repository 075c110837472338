"""fp32 matmul rate of MLX on this CPU with the fast BLAS mlx_clip preloads, and without it (the wheel's own BLAS).

Each variant runs in a fresh process, because the BLAS is chosen when `mlx.core` is first loaded.

    python -m benchmarks.blas [--sizes 512,1024,2048] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

CHILD = """
import json, sys
import mlx_clip
from mlx_clip import _blas
from mlx_clip.doctor import matmul_gflops
sizes = [int(s) for s in sys.argv[1].split(",")]
print(json.dumps({"blas": _blas.LOADED or "bundled", "gflops": {n: matmul_gflops(n, repeats=5) for n in sizes}}))
"""


def measure(sizes: str, blas_env: str | None) -> dict:
    env = dict(os.environ)
    if blas_env is None:
        env.pop("MLXCLIP_BLAS", None)
    else:
        env["MLXCLIP_BLAS"] = blas_env
    out = subprocess.run([sys.executable, "-c", CHILD, sizes], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    fast = measure(args.sizes, None)
    slow = measure(args.sizes, "none")
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
    rows = [f"| {n} | {slow['gflops'][n]:.1f} | {fast['gflops'][n]:.1f} | {fast['gflops'][n] / slow['gflops'][n]:.0f}x |"
            for n in fast["gflops"]]
    table = "\n".join([
        f"# MLX fp32 matmul rate, {date.today()}",
        f"Machine: {machine}. Fast BLAS: `{fast['blas']}`. Median of 5 after a warm-up (GFLOP/s).",
        "",
        "| n (n×n @ n×n) | wheel's reference BLAS | with mlx_clip's preload | speed-up |",
        "|---|---|---|---|",
        *rows,
    ])
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "blas.md").write_text(table + "\n")
    (out / "blas.json").write_text(json.dumps({"machine": machine, "fast": fast, "reference": slow}, indent=2) + "\n")


if __name__ == "__main__":
    main()
