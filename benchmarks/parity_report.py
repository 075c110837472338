"""The parity report as files a person reads: parity.json (everything), parity.md (tables), parity.png (loss curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (x == 0 or math.isnan(x)):
        return f"{x:g}"
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def _mark(ok) -> str:
    return "" if ok is None else ("pass" if ok else "**FAIL**")


def _stage_table(rows: list[dict]) -> list[str]:
    lines = ["| stage | compared | ‖Δ‖/‖ref‖ (tokens: count) | bar | |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['name']} | {_fmt(r['value'])} | {_fmt(r['bar'])} | {_mark(r['pass'])} |")
    return lines


def _gradient_lines(rows: list[dict]) -> list[str]:
    values = np.array([r["value"] for r in rows])
    bar = rows[0]["bar"] if rows else None
    failing = [r for r in rows if r["pass"] is False]
    head = [f"{len(rows)} parameters: max {_fmt(float(values.max()))}, median {_fmt(float(np.median(values)))}"
            f"{'' if bar is None else f', bar {_fmt(bar)}, {len(failing)} over it'}. The ten largest:", ""]
    return head + _stage_table(sorted(rows, key=lambda r: -r["value"])[:10])


def summary(report: dict) -> list[str]:
    """A few lines for the terminal."""
    t, d = report["training"], report["training"]["parameter_distance"]
    worst_stage = max((r for r in report["stages"] if r["stage"] != "tokens"), key=lambda r: r["value"])
    worst_grad = max(report["gradients"], key=lambda r: r["value"])
    verdict = {True: "PASS", False: "FAIL", None: "reported (no bars for this dtype)"}[report["passed"]]
    return [
        f"parity {report['arch']} {report['dtype']} on {report['device']}: {verdict}",
        f"  worst forward stage: {worst_stage['name']} {_fmt(worst_stage['value'])}",
        f"  worst gradient: {worst_grad['name']} {_fmt(worst_grad['value'])}",
        f"  loss curves over {len(t['loss_mlx'])} steps: max rel diff {_fmt(t['max_loss_rel_diff'])} "
        f"at step {t['at_step']}",
        f"  final parameters: ‖Δ‖/‖θ‖ {_fmt(d['rel_to_params'])}, ‖Δ‖/‖update‖ {_fmt(d['rel_to_update'])}",
    ]


def markdown(report: dict) -> str:
    s, t, d = report["settings"], report["training"], report["training"]["parameter_distance"]
    verdict = {True: "all bars pass", False: "**some bars fail**", None: "no bars for this dtype: figures reported"}
    lines = [
        f"# Parity: MLX vs open_clip — {report['arch']}, {report['dtype']}, {report['device']}",
        "",
        f"Machine: {report['machine']['label']}. Result: {verdict[report['passed']]}.",
        "",
        "One seeded init (`mlx_clip.model.init_weights`) converted to open_clip with `converters.open_clip`; relative "
        "errors ‖mlx − ref‖/‖ref‖ in float64 on batch 0.",
        "",
        "## Forward stages",
        "",
        *_stage_table(report["stages"]),
        "",
        "## Gradients of the CLIP loss (every parameter, names mapped by the converter)",
        "",
        *_gradient_lines(report["gradients"]),
        "",
        "## Training",
        "",
        f"{s['steps']} steps, batch {s['batch']}, {s['n_batches']} fixed batches in a fixed order, lr {s['lr']} "
        f"({s['schedule']}, warm-up {s['warmup']}), AdamW betas {tuple(s['betas'])}, eps {s['eps']}, weight decay "
        f"{s['weight_decay']}, grad clip {s['grad_clip']}; each side runs its own step (MLX: compiled `make_step` + "
        "`GroupedAdamW`; torch: `torch_ref.model.TorchCLIP.train_step`, torch.optim.AdamW).",
        "",
        "| | value | bar | |",
        "|---|---|---|---|",
        f"| max relative loss difference (at step {t['at_step']}) | {_fmt(t['max_loss_rel_diff'])} | "
        f"{_fmt((report['bars'] or {}).get('loss curve'))} | {_mark(t.get('pass'))} |",
        f"| loss at step 1, MLX / torch | {t['loss_mlx'][0]:.6f} / {t['loss_torch'][0]:.6f} | | |",
        f"| loss at step {s['steps']}, MLX / torch | {t['loss_mlx'][-1]:.6f} / {t['loss_torch'][-1]:.6f} | | |",
        f"| final parameters ‖θ_mlx − θ_torch‖ / ‖θ_torch‖ | {_fmt(d['rel_to_params'])} | | |",
        f"| … relative to the distance training moved them ({d['update_norm']:.3g}) | "
        f"{_fmt(d['rel_to_update'])} | | |",
        f"| worst parameter: {d['worst_param']} | {_fmt(d['worst_param_rel'])} | | |",
        *([f"| control: torch vs torch with its init nudged by one fp32 rounding, max relative loss difference | "
           f"{_fmt(t['max_control_rel_diff'])} | | |"] if "max_control_rel_diff" in t else []),
        f"| wall time MLX / torch (s, not a benchmark) | {t['seconds']['mlx']:.1f} / {t['seconds']['torch']:.1f} | | |",
        "",
        "![loss curves](parity.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["training"]
    steps = np.arange(1, len(t["loss_mlx"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(steps, t["loss_mlx"], label="MLX", lw=2.2, color="tab:blue")
    top.plot(steps, t["loss_torch"], label="torch (open_clip)", lw=1.2, ls="--", color="tab:orange")
    top.set_ylabel("CLIP loss")
    top.set_title(f"{report['arch']} {report['dtype']} on {report['device']}: training loss, same init and batches")
    top.legend()
    bottom.semilogy(steps, np.maximum(t["loss_rel_diff"], 1e-12), color="tab:green",
                    label="|Δloss| / loss (0 drawn at 1e-12)")
    if "control_rel_diff" in t:
        bottom.semilogy(steps, np.maximum(t["control_rel_diff"], 1e-12), color="0.55", lw=1,
                        label="control: torch vs torch nudged by 1 fp32 rounding")
    bar = (report["bars"] or {}).get("loss curve")
    if bar:
        bottom.axhline(bar, color="tab:red", ls=":", label=f"bar {bar:g}")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative difference")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "parity.md").write_text(markdown(report))
    plot(report, out / "parity.png")
    return out
