"""The benchmark as files: JSON lines (one per measurement), a markdown table with the MLX/torch ratios, a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.batches import DEFAULT_CAPTIONS

SERIES = [("mlx", "eager"), ("mlx", "compiled"), ("torch", "eager"), ("torch", "compiled")]
LABELS = {("mlx", "eager"): "MLX eager", ("mlx", "compiled"): "MLX mx.compile",
          ("torch", "eager"): "torch eager", ("torch", "compiled"): "torch.compile"}
COLORS = {("mlx", "eager"): "#9ecae1", ("mlx", "compiled"): "#3182bd",
          ("torch", "eager"): "#fdae6b", ("torch", "compiled"): "#e6550d"}


def _groups(records: list[dict]) -> dict[tuple[str, int], dict]:
    """(task, batch) -> {(backend, mode): record}, in the order measured."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        out.setdefault((r["task"], r["batch"]), {})[(r["backend"], r["mode"])] = r
    return out


def ratios(records: list[dict], key: str = "items_per_s") -> list[dict]:
    """Per (task, batch): MLX items/s over torch items/s (`key`: median or best run), mode for mode and best mode
    against best mode."""
    rows = []
    for (task, batch), got in _groups(records).items():
        speed = {k: r[key] for k, r in got.items()}
        row = {"task": task, "batch": batch}
        for mode in ("eager", "compiled"):
            if ("mlx", mode) in speed and ("torch", mode) in speed:
                row[mode] = speed[("mlx", mode)] / speed[("torch", mode)]
        mlx = [v for (b, _), v in speed.items() if b == "mlx"]
        torch = [v for (b, _), v in speed.items() if b == "torch"]
        if mlx and torch:
            row["best"] = max(mlx) / max(torch)
        if len(row) > 2:
            row["pace_gap"] = _pace_gap(got)
            rows.append(row)
    return rows


# Rows whose host paces (benchmarks.host_pace) differ by more than this ran on a machine going at different speeds:
# this VM's probe moves between ~5.0 and ~8.5 ms, the lent H200's between ~6 and ~12 (results/gpu-s25-h200.md).
PACE_GAP = 1.15


def _pace_gap(got: dict) -> str:
    """A note naming each backend's host pace when they differ by more than PACE_GAP (the ratio then says as much
    about the machine as about the code), else an empty string."""
    paces = {}
    for (backend, _), r in got.items():
        if "host_probe_ms_p50" in r:
            paces.setdefault(backend, []).append(r["host_probe_ms_p50"])
    paces = {b: sorted(v)[len(v) // 2] for b, v in paces.items()}
    if len(paces) < 2 or max(paces.values()) <= PACE_GAP * min(paces.values()):
        return ""
    return "host pace differed: " + ", ".join(f"{b} {v:.2f} ms" for b, v in sorted(paces.items()))


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def ratio_lines(records: list[dict]) -> list[str]:
    return [f"MLX/torch {r['task']} batch {r['batch']}: eager {_x(r.get('eager'))}, compiled {_x(r.get('compiled'))}, "
            f"best vs best {_x(r.get('best'))}" + (f" ({r['pace_gap']})" if r["pace_gap"] else "")
            for r in ratios(records)]


def _host_pace(r: dict) -> str:
    """The host probe's median and range around a row's timed runs (benchmarks.host_pace; older records have none)."""
    runs = r.get("host_probe_ms")
    return f"{r['host_probe_ms_p50']:.2f} ({min(runs):.2f}-{max(runs):.2f})" if runs else "—"


def _captions(records: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("caption_tokens") or DEFAULT_CAPTIONS) for r in records})) or DEFAULT_CAPTIONS


def _settings(env: dict[str, str]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in env.items()) or "none (every switch at its default)"


def markdown(records: list[dict], machine: dict, title: str, failures: list[str]) -> str:
    lines = [
        f"# {title}",
        "",
        f"Machine: {machine['label']}; MLX BLAS: `{machine['mlx_blas']}`; "
        f"MLX CPU kernel flags (`mlx_clip/cpu_jit.py`): {machine.get('mlx_cpu_jit', '—')}; "
        f"torch threads: {machine.get('torch_threads', '—')}; MLX's malloc (`mlx_clip/host_malloc.py`): "
        f"{machine.get('mlx_malloc', '—')}.",
        "",
        f"Settings (environment): {_settings(machine.get('settings', {}))}.",
        "",
        f"{_pace(records)}"
        "Median of the timed runs after warm-up (first run, which includes compilation, reported apart); spread = "
        "(slowest − fastest) / median. Peak memory: see `benchmarks/bench_worker.py` (CPU: resident-set growth of "
        "the measuring process, same rule for both backends; CUDA: allocator peak; in brackets, where the allocator "
        "counts it, the first run's peak and the timed runs' highest). Each row is its own process; "
        "the load average of the machine before and after each row shows what else was running, and the host pace "
        "a fixed loop's time, three times before and three after the timed runs (`benchmarks/host_pace.py`, median "
        "and range): a row that ran slower with a slower probe met a slower machine.",
        "",
        "Same work, less of it computed: MLX's towers run their last block for the pooled token only (CLS, EOT: the "
        "query, attention output and MLP of that row; keys and values from every token; exact, as the product does), "
        "open_clip runs the whole block.",
        "",
        f"Captions: {_captions(records)} word tokens each (SOT and EOT added, zero-padded to the context). Both "
        "backends get the same rows; torch (open_clip) runs the text tower on all of them, MLX cuts the padding after "
        "the batch's longest caption (rounded up to 16 tokens; exact, as attention is causal and the pooled token "
        "comes first) and, training on the CPU, packs the captions (each row's tokens up to its EOT one after another, "
        "a token attending to its own row only: `tokenizer.pack_rows`), as the product does.",
        "",
        "| task | batch | backend | mode | items/s | best run items/s | ms / iteration (p50) | spread | runs "
        "| first run s | peak MiB | source | load avg before/after | host pace ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, batch), got in _groups(records).items():
        for key in SERIES:
            if key in got:
                r = got[key]
                lines.append(f"| {task} | {batch} | {r['backend']} | {r['mode']} | {r['items_per_s']:.2f} | "
                             f"{r.get('items_per_s_best', float('nan')):.2f} | "
                             f"{r['latency_ms_p50']:.1f} | {r['spread_pct']:.0f}% | {r['runs']} | "
                             f"{r['first_run_s']:.1f} | "
                             f"{r['peak_mem_bytes'] / 2**20:.0f}{phase_note(r)} | {r['peak_mem_source']} | "
                             f"{'/'.join(str(x) for x in r.get('load_avg', []))} | {_host_pace(r)} |")
    fastest = {(r["task"], r["batch"]): r for r in ratios(records, "items_per_s_best")}
    lines += ["", "## MLX / torch (items/s ratio; > 1 means MLX is faster)", "",
              "From the medians; in brackets, from each side's fastest run (less disturbed by other jobs).", "",
              "| task | batch | eager / eager | mx.compile / torch.compile | best mode / best mode |", "|---|---|---|---|---|"]
    medians = ratios(records)
    for r in medians:
        f = fastest.get((r["task"], r["batch"]), {})
        cells = [f"{_x(r.get(k))} ({_x(f.get(k))})" for k in ("eager", "compiled", "best")]
        lines.append(f"| {r['task']} | {r['batch']} | " + " | ".join(cells) + " |")
    gaps = [f"{r['task']} batch {r['batch']}: {r['pace_gap']}" for r in medians if r["pace_gap"]]
    if gaps:
        lines += ["", f"The backends' rows ran at host paces more than {PACE_GAP:.2f}× apart (a fixed loop's time, "
                  "`benchmarks/host_pace.py`): " + "; ".join(gaps) + ". Those ratios say as much about the machine as "
                  "about the code; rerun, or take more `--rounds`."]
    hosted = [r for r in records if "host_ms_p50" in r]
    if hosted:
        lines += ["", "## MLX's host time (train)", "",
                  "The calling thread's CPU time from the step's call until all its work is queued (`mx.async_eval` "
                  "returns), median of the timed runs. On a GPU, a host time close to the step's time means the step "
                  "is host-bound: it goes at the speed of the host's CPU, and its time moves with it. On the CPU this "
                  "thread's work shares the cores with the computation.", "",
                  *[f"- {r['task']} batch {r['batch']} {r['backend']} {r['mode']}: {r['host_ms_p50']:.1f} ms of a "
                    f"{r['latency_ms_p50']:.1f} ms step ({100 * r['host_ms_p50'] / r['latency_ms_p50']:.0f}%)"
                    for r in hosted]]
    used = [r for r in records if "mfu" in r]
    peak = machine.get("matmul_peak")
    if used and peak:
        lines += ["", "## Model FLOP utilisation", "",
                  f"The model's FLOPs per item (`benchmarks/flops.py`: open_clip's products at the full text context, "
                  f"the same count for both backends; checked against torch's FlopCounterMode) times items/s, over "
                  f"MLX's measured {peak['n']}×{peak['n']} {peak['dtype']} matmul rate on this device, "
                  f"**{peak['tflops']:.1f} TFLOP/s**.", "",
                  "| task | batch | backend | mode | model GFLOP / item | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|",
                  *[f"| {r['task']} | {r['batch']} | {r['backend']} | {r['mode']} | "
                    f"{r['model_flops_per_item'] / 1e9:.2f} | {r['model_tflops_per_s']:.2f} | {100 * r['mfu']:.1f}% |"
                    for r in used]]
    repeated = [r for r in records if r.get("round_items_per_s")]
    if repeated:
        lines += ["", "## Rounds (each measurement repeated, the backends taking turns; the median round is reported)",
                  "", *[f"- {r['task']} batch {r['batch']} {r['backend']} {r['mode']}: items/s "
                        + ", ".join(f"{v:.2f}" for v in r["round_items_per_s"]) for r in repeated]]
    if failures:
        lines += ["", "## Failed measurements", "", *[f"- {f}" for f in failures]]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    cols = min(len(groups), 3)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 3.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, ((task, batch), got) in zip(axes.flat, groups.items()):
        keys = [k for k in SERIES if k in got]
        values = [got[k]["items_per_s"] for k in keys]
        # Error bars from the fastest and slowest timed run.
        low = [v - got[k]["batch"] / got[k]["max_s"] for k, v in zip(keys, values)]
        high = [got[k]["batch"] / got[k]["min_s"] - v for k, v in zip(keys, values)]
        ax.bar(range(len(keys)), values, color=[COLORS[k] for k in keys], yerr=[low, high], capsize=3)
        ax.set_xticks(range(len(keys)), [LABELS[k] for k in keys], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task}, batch {batch}", fontsize=9)
        ax.set_ylabel("pairs/s" if task == "train" else "items/s")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _key(r: dict) -> tuple:
    return r["task"], r["batch"], r["backend"], r["mode"]


def merged(path: Path, records: list[dict]) -> list[dict]:
    """The file's earlier records that this run did not measure again, then this run's: running `--task train` and
    then `--task embed-text` into one out dir fills one table instead of the second run replacing the first."""
    new = {_key(r) for r in records}
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in old if _key(r) not in new] + list(records)


def write_report(records, machine, out, arch, device, dtype, batch, failures=(), caption_tokens=None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"bench-{device}-{arch}-{dtype}-b{batch}" + (f"-captions{caption_tokens}" if caption_tokens else ""))
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores"
    title = f"{arch}, {dtype}, {device} ({where})" + (f", captions of {caption_tokens} word tokens" if caption_tokens
                                                      else "")
    paths = [stem.with_suffix(".jsonl"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    records = merged(paths[0], records)
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths[1].write_text(markdown(records, machine, f"Benchmark: {title}", list(failures)))
    if records:
        plot(records, title, paths[2])
    return paths


def _pace(records: list[dict]) -> str:
    """How train steps were timed: one at a time, or several queued back to back per run (time per step)."""
    per_run = sorted({r.get("steps_per_run", 1) for r in records if r["task"] == "train"})
    if not per_run or per_run == [1]:
        return ""
    return (f"Train: each timed run queues {'/'.join(map(str, per_run))} steps back to back, each step's loss read "
            "once the next is queued (the host at most a step ahead), and waits for the last, as a training loop "
            "does (`mlx_clip.train.loop.train`); times are per step. ")


def phase_note(rec: dict) -> str:
    """Where a row's peak was (`bench_worker._Memory.mark`): its first run's (compilation, state made on first use)
    against the timed runs' highest, in MiB; "" where the row's peak is not the allocator's (the CPU's resident set)
    or there is no split (older files)."""
    phases = rec.get("peak_by_phase_bytes")
    if not phases or "timed" not in phases or rec.get("peak_mem_source", "").startswith("rss"):
        return ""
    return f" (first run {phases.get('first_run', 0) / 2**20:.0f}, timed runs {phases['timed'] / 2**20:.0f})"
