"""Data-parallel scaling of `mlxclip finetune`: training throughput with 1 process and with N under `mlx.launch`.

Each setting is a real `mlxclip finetune` run (random-init model of --arch, synthetic images). Weak scaling: each
process keeps --batch-size pairs, so N processes train a global batch N× larger, as one uses N GPUs. Throughput is global pairs / second over the steps after --skip (the first
ones compile); efficiency = throughput(N) / (N × throughput(1)).

    python -m benchmarks.scaling --arch ViT-B-32 --batch-size 8 --procs 1,2 --backend ring          # CPU, localhost
    python -m benchmarks.scaling --arch ViT-B-32 --batch-size 256 --procs 1,2 --backend nccl --workers 8  # 2 GPUs

Prints a markdown table and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx

from benchmarks.blas import cpu_name

# `mlx.launch` is a console script; a `pip install --target` has none on PATH, so run its module the same way.
LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; "
          "sys.exit(main())"]


def prepare(root: Path, arch: str, pairs: int) -> tuple[Path, Path]:
    """A random-init model dir and a synthetic training CSV with at least `pairs` training pairs."""
    from converters.convert import init_model
    from mlx_clip.data.synth import synthesize

    model = root / f"model-{arch}"
    if not (model / "model.safetensors").exists():
        init_model(arch, 0, model)
    data = root / "data"
    n = max(200, int(pairs / 0.8) + 20)  # synth keeps 80% for training
    if not (data / "train.csv").exists() or len((data / "train.csv").read_text().splitlines()) - 1 < pairs:
        shutil.rmtree(data, ignore_errors=True)
        synthesize("industrial", data, n=n, seed=0, image_size=64)
    return model, data / "train.csv"


def run(procs: int, backend: str, model: Path, train_csv: Path, out: Path, args) -> float:
    """Global pairs / second of one `mlxclip finetune` run with `procs` processes."""
    flags = ["-m", "mlx_clip", "finetune", "--model", str(model), "--train-data", str(train_csv), "--out", str(out),
             "--steps", str(args.steps), "--batch-size", str(args.batch_size * procs), "--log-every", "1",
             "--workers", str(args.workers), "--lr", "1e-5", "--dtype", args.dtype]
    env = dict(os.environ)
    if procs == 1:
        cmd = [sys.executable, *flags]
    else:
        cmd = [*LAUNCH, "-n", str(procs), "--backend", backend, "--starting-port", str(_free_port())]
        if backend == "ring":  # ranks share this host's cores: split the BLAS threads between them
            threads = max(1, (os.cpu_count() or 1) // procs)
            cmd += ["--env", f"MKL_NUM_THREADS={threads}", "--env", f"OMP_NUM_THREADS={threads}"]
        cmd += ["--", sys.executable, *flags]
    result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    metrics = out / "metrics.jsonl"
    if not (out / "final").exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    timed = [r for r in records if "images_per_s" in r and r["step"] > args.skip]
    pairs = args.batch_size * procs * len(timed)
    return pairs / sum(args.batch_size * procs / r["images_per_s"] for r in timed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    gpu = ""
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True).stdout.split("\n")
            gpu = f", {names[0].strip()} ×{len([n for n in names if n.strip()])}"
        except OSError:
            gpu = ", CUDA GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.machine()}; MLX {mx.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per process per step")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--backend", default="ring", help="mlx.launch backend: ring, nccl, jaccl, mpi")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (compilation)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--workdir", default="", help="where to keep the model and data between runs")
    parser.add_argument("--json", default="", help="write the results here too")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mlxclip-scaling-"))
    procs = [int(p) for p in args.procs.split(",")]
    model, train_csv = prepare(root, args.arch, args.batch_size * max(procs))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for p in procs:
        out = root / f"run-{p}"
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"procs": p, "global_batch": args.batch_size * p,
                     "pairs_per_s": run(p, args.backend, model, train_csv, out, args)})
    base = rows[0]["pairs_per_s"] / rows[0]["procs"]
    for r in rows:
        r["efficiency"] = r["pairs_per_s"] / (r["procs"] * base)
    result = {"date": str(date.today()), "machine": machine(), "arch": args.arch, "backend": args.backend,
              "dtype": args.dtype, "per_process_batch": args.batch_size, "steps": args.steps, "skip": args.skip,
              "load_average_before": load, "rows": rows}
    print(f"{result['machine']}; {args.arch}, {args.batch_size} pairs/process, backend {args.backend}")
    print("| processes | global batch | pairs/s | scaling efficiency |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['global_batch']} | {r['pairs_per_s']:.3g} | {r['efficiency']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
