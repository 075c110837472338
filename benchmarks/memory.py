"""Peak memory and speed of training steps with none / each / all memory techniques, for full fine-tuning and LoRA.

Each case runs in its own process (`mlxclip memory --json`), so no case inherits another's allocations or compiled
graphs. MLX picks the device (CPU here; the GPU of a CUDA or Metal build), and the file names say which.

    python -m benchmarks.memory                                  # this CPU: small and ViT-B-32 at batch 8/16/32
    python -m benchmarks.memory --archs ViT-B-32,ViT-L-14 --batches 32,64,128,256 \\
        --techniques none,chunk,ckpt,bf16,all --chunk 128        # a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx

from benchmarks.machine import machine_info

# technique name -> `mlxclip memory` flags ({chunk} is --chunk); "all" combines the others that were asked for
TECHNIQUES = {
    "none": [],
    "chunk": ["--attention-chunk", "{chunk}"],
    "ckpt": ["--grad-checkpoint"],
    "bf16": ["--dtype", "bf16-mixed"],
}
LABELS = {"none": "none", "chunk": "sliced attention", "ckpt": "grad checkpoint", "bf16": "bf16-mixed", "all": "all"}
MODES = {"full": [], "lora": ["--lora-rank", "8"]}
# The bars of issue 5, checked when their cases were run: (arch, mode, batch, technique set) -> GB.
BARS = [("ViT-B-32", "full", 256, 16.0), ("ViT-L-14", "lora", 64, 16.0)]


def device_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def _machine() -> dict:
    """benchmarks.machine's record, with the accelerator as MLX names it (torch need not see the GPU)."""
    info = machine_info("cpu")
    if device_name() != "cpu":
        info.update(device=device_name(), gpu=mx.device_info().get("device_name", device_name()))
        info["label"] = f"{info['gpu']} ({info['device']}); MLX {info['mlx']}, {info['date']}"
    return info


def case_flags(technique: str, techniques: list[str], chunk: int) -> list[str]:
    parts = [t for t in techniques if t not in ("none", "all")] if technique == "all" else [technique]
    return [flag.format(chunk=chunk) for t in parts for flag in TECHNIQUES[t]]


def run_case(arch: str, mode: str, batch: int, technique: str, args) -> dict:
    command = [sys.executable, "-m", "mlx_clip", "memory", "--arch", arch, "--batch", str(batch), "--steps",
               str(args.steps), "--json", *MODES[mode], *case_flags(technique, args.techniques, args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:  # out of memory or a failure: recorded, the table says so
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def key(arch, mode, batch, technique) -> str:
    return f"{arch}|{mode}|{batch}|{technique}"


def measure(args, out_json: Path) -> dict:
    """Run every case not already in `out_json` (so an interrupted run picks up where it stopped)."""
    report = json.loads(out_json.read_text()) if out_json.exists() and args.resume else {}
    report.setdefault("machine", _machine())
    report["settings"] = {"steps": args.steps, "chunk": args.chunk, "techniques": args.techniques}
    cases = report.setdefault("cases", {})
    for arch in args.archs:
        for mode in args.modes:
            for batch in args.batches:
                for technique in args.techniques:
                    name = key(arch, mode, batch, technique)
                    if name in cases:
                        continue
                    cases[name] = run_case(arch, mode, batch, technique, args)
                    print(name, cases[name], flush=True)
                    out_json.write_text(json.dumps(report, indent=1))
    return report


def _cell_gb(case: dict, base: dict | None) -> str:
    if "error" in case:
        return "not run" if case["error"] == "not run" else "failed"
    text = f"{case['peak_gb']:.2f}"
    if base and "error" not in base and case is not base:
        text += f" ({100 * (case['peak_gb'] / base['peak_gb'] - 1):+.0f}%)"
    return text


def _cell_speed(case: dict, base: dict | None) -> str:
    if "error" in case:
        return "-"
    if case is base or not base or "error" in base:
        return f"{case['images_per_s']:.1f} img/s"
    return f"{100 * (case['step_seconds'] / base['step_seconds'] - 1):+.0f}%"


def to_markdown(report: dict, args) -> str:
    m, cases, techniques = report["machine"], report["cases"], report["settings"]["techniques"]
    lines = [f"# Training memory by technique ({m['label']})", "",
             f"Random-init models, synthetic batches, AdamW; {args.steps} steps per case in a fresh process (peak over "
             f"all of them, the first traces; speed from the steps after the first). Sliced attention uses chunks of "
             f"{args.chunk} tokens; LoRA is rank 8 on q/k/v/out/fc1/fc2. Peak is MLX's peak active memory "
             "(`mx.get_peak_memory`) with MLX's default memory limit, under which it may allocate a little ahead of the "
             "computation; the percentage is the change against no technique. The speed columns give the throughput "
             "of no technique and the step-time cost of each technique against it.", ""]
    if args.note:
        lines += [args.note, ""]
    head = [f"peak GB: {LABELS[t]}" for t in techniques] + [f"speed: {LABELS[t]}" for t in techniques]
    lines += ["| model | mode | batch | " + " | ".join(head) + " |", "|---" * (3 + len(head)) + "|"]
    rows = {tuple(name.split("|")[:3]) for name in cases}  # every (arch, mode, batch) measured, this run or before
    order = {arch: i for i, arch in enumerate(dict.fromkeys(name.split("|")[0] for name in cases))}
    for arch, mode, batch in sorted(rows, key=lambda r: (order[r[0]], r[1], int(r[2]))):
        row = [cases.get(key(arch, mode, batch, t), {"error": "not run"}) for t in techniques]
        base = row[0] if techniques[0] == "none" else None
        cells = [_cell_gb(c, base) for c in row] + [_cell_speed(c, base) for c in row]
        lines.append(f"| {arch} | {mode} | {batch} | " + " | ".join(cells) + " |")
    lines += _bars(cases, techniques)
    return "\n".join(lines) + "\n"


def _bars(cases: dict, techniques: list[str]) -> list[str]:
    out = []
    for arch, mode, batch, limit in BARS:
        runs = {t: cases[key(arch, mode, batch, t)] for t in techniques if key(arch, mode, batch, t) in cases}
        fits = [(c["peak_gb"], t) for t, c in runs.items() if "error" not in c and c["peak_gb"] < limit]
        if runs:
            verdict = f"met with {LABELS[min(fits)[1]]} ({min(fits)[0]:.2f} GB)" if fits else "not met"
            out.append(f"- Bar: {arch} {mode} at batch {batch} under {limit:g} GB: {verdict}.")
    return ["", *out] if out else []


def main(argv=None):
    gpu = mx.default_device() != mx.cpu
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="ViT-B-32,ViT-L-14" if gpu else "small,ViT-B-32")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--batches", default="32,64,128,256" if gpu else "8,16,32")
    parser.add_argument("--techniques", default="none,chunk,ckpt,bf16,all" if gpu else "none,chunk,ckpt,all",
                        help="From none, chunk, ckpt, bf16, all (bf16 is off on CPU: MLX-CPU bf16 matmul is a scalar loop).")
    parser.add_argument("--chunk", type=int, default=128 if gpu else 32, help="Sliced-attention chunk (tokens).")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="Seconds per case.")
    parser.add_argument("--note", default="", help="A line for the report (e.g. the machine's load).")
    parser.add_argument("--resume", action="store_true", help="Keep the cases already in the JSON.")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    for name in ("archs", "modes", "techniques"):
        setattr(args, name, [x.strip() for x in getattr(args, name).split(",") if x.strip()])
    args.batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{device_name()}"
    report = measure(args, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(to_markdown(report, args))
    print(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
