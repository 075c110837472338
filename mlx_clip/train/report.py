"""The run report: PNG curves of loss, LR and eval metrics, and a summary markdown, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

EVAL_KEYS = ("top1", "top5", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict], out_png) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, style in (("loss", "-"), ("loss_avg", "--")):
        axes[0].plot(*_series(records, key), style, label=key)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(*_series(records, "lr"))
    axes[1].set(title="learning rate", xlabel="step")
    for key in EVAL_KEYS:
        xs, ys = _series(records, key)
        if xs:
            axes[2].plot(xs, ys, "o-", label=key)
    axes[2].set(title="evaluation", xlabel="step", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


def write_summary(run_dir, summary: dict, records: list[dict]) -> Path:
    run_dir = Path(run_dir)
    lines = ["# Fine-tuning run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if not isinstance(v, (dict, list))]
    evals = [r for r in records if any(k in r for k in EVAL_KEYS)]
    if evals:
        keys = [k for k in EVAL_KEYS if any(k in r for r in evals)]
        lines += ["", "## Evaluation", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in evals]
    lines += ["", "![curves](curves.png)", ""]
    path = run_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(run_dir, summary: dict, records: list[dict]) -> Path:
    plot_curves(records, Path(run_dir) / "curves.png")
    return write_summary(run_dir, summary, records)
