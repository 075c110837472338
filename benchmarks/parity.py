"""`mlxclip parity`: MLX against the open_clip reference, from one seeded init converted across.

Stage by stage on one batch (tokens, pixels, every block's hidden states, embeddings, logits, loss, every parameter's
gradient), then N training steps on the same fixed batches in the same order (loss curves, final parameter distance).
Each figure is a relative error ‖mlx − ref‖ / ‖ref‖ in float64. Writes parity.json, parity.md and parity.png.

    python -m benchmarks.parity --arch small --steps 100 --out benchmarks/results/parity-small
"""

from __future__ import annotations

import argparse
import os
import re
import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import open_clip
import torch

from benchmarks.batches import fixed_batches
from benchmarks.machine import machine_info
from benchmarks.parity_report import write_report
from converters.convert import arch_config
from mlx_clip.io import DTYPES, cast
from mlx_clip.model import CLIP, init_weights
from mlx_clip.tokenizer import Tokenizer
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step
from torch_ref.device import pick_device
from torch_ref.model import TorchCLIP, from_weights, to_ours

# The bars for fp32; a half-precision run is reported with its figures and no bar.
FP32_BARS = {"tokens": 0.0, "pixels": 1e-5, "hidden states": 1e-5, "embeddings": 1e-5, "logits": 1e-5, "loss": 1e-5,
             "gradients": 1e-4, "loss curve": 1e-3}
# Gradients that are zero in exact arithmetic: a key bias adds the same q·b to every logit of a query, and softmax
# ignores a constant. Both sides return rounding noise there, so it is compared with the whole gradient's norm.
ZERO_GRADIENT = re.compile(r"self_attn\.k_proj\.bias$")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / ref) if ref > 0 else float(diff)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.array(x.astype(mx.float32))


def _row(stage: str, name: str, value: float, bars: dict | None) -> dict:
    bar = bars.get(stage) if bars else None
    return {"stage": stage, "name": name, "value": value, "bar": bar, "pass": None if bar is None else value <= bar}


# ---- front end ------------------------------------------------------------------------------------------------------

# Beyond the batch's captions: case, punctuation, HTML entities, accents, emoji, and a caption longer than any context.
HARD_TEXTS = ["A PHOTO of a Dog!!", "café &amp; crème brûlée — 2 cups", "🙂 emoji, #hashtags and   spaces",
              "x-ray of the left knee: no fracture.", " ".join(["word"] * 100), ""]


def front_end_rows(config, batch: dict, bars) -> list[dict]:
    """Our tokenizer and preprocessing against open_clip's on the batch's captions (plus HARD_TEXTS) and PIL images."""
    ctx, size = config.text_config.max_position_embeddings, config.vision_config.image_size
    texts = list(batch["texts"]) + HARD_TEXTS
    ours = np.concatenate([batch["input_ids"], Tokenizer.default(ctx).tokenize_numpy(HARD_TEXTS)])
    mismatches = float(np.sum(open_clip.tokenize(texts, context_length=ctx).numpy() != ours))
    transform = open_clip.image_transform(size, is_train=False)
    ref_pixels = torch.stack([transform(img) for img in batch["pil"]]).permute(0, 2, 3, 1).numpy()
    return [_row("tokens", f"{len(texts)} captions: differing ids", mismatches, bars),
            _row("pixels", f"{len(batch['pil'])} images, resize + crop + normalize", rel(batch["images"], ref_pixels),
                 bars)]


# ---- forward stages -------------------------------------------------------------------------------------------------

def _torch_hidden_states(ref: TorchCLIP, pixels, tokens) -> tuple[list, list]:
    """open_clip's vision states (after ln_pre, after each block) and text states (embeddings, after each block)."""
    m, vision, text = ref.model, [], []
    grab = lambda out: lambda mod, args, o: out.append(o.detach())  # noqa: E731
    hooks = [m.visual.ln_pre.register_forward_hook(grab(vision))]
    hooks += [blk.register_forward_hook(grab(vision)) for blk in m.visual.transformer.resblocks]
    hooks += [m.transformer.register_forward_pre_hook(lambda mod, args: text.append(args[0].detach()))]
    hooks += [blk.register_forward_hook(grab(text)) for blk in m.transformer.resblocks]
    with torch.no_grad():
        m.encode_image(pixels)
        m.encode_text(tokens)
    for h in hooks:
        h.remove()
    return vision, text


def forward_rows(ours: CLIP, ref: TorchCLIP, batch: dict, bars) -> list[dict]:
    dtype = ours.vision_model.embeddings.patch_embedding.weight.dtype
    images, ids = mx.array(batch["images"]).astype(dtype), mx.array(batch["input_ids"])
    pixels, tokens = ref.pixels(batch["images"]), ref.tokens(batch["input_ids"])
    ref_vision, ref_text = _torch_hidden_states(ref, pixels, tokens)
    vision, text = [], []
    ours.vision_model(images, hidden_states=vision)
    ours.text_model(ids, hidden_states=text)
    rows = []
    towers = (("vision", vision, ref_vision, "after ln_pre"), ("text", text, ref_text, "embeddings"))
    for tower, mine, theirs, first in towers:
        if len(mine) != len(theirs):
            raise AssertionError(f"{tower}: {len(mine)} MLX states vs {len(theirs)} open_clip states")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            name = f"{tower} {first if i == 0 else f'block {i}'}"
            rows.append(_row("hidden states", name, rel(_np(a), _np(b)), bars))
    with torch.no_grad():
        ref_img = ref.model.encode_image(pixels)
        ref_txt = ref.model.encode_text(tokens)
        scale = ref.model.logit_scale.exp()
        unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        ref_logits = scale * unit(ref_img) @ unit(ref_txt).T
        ref_loss = ref.loss_value(pixels, tokens)
    logits, _ = ours(images, ids)
    loss = make_loss_fn("clip")(ours, images, ids, mx.array(batch["labels"]))
    rows += [_row("embeddings", "image (unnormalized)", rel(_np(ours.encode_image(images)), _np(ref_img)), bars),
             _row("embeddings", "text (unnormalized)", rel(_np(ours.encode_text(ids)), _np(ref_txt)), bars),
             _row("logits", "logits_per_image", rel(_np(logits), _np(ref_logits)), bars),
             _row("loss", "CLIP loss", rel(_np(loss), _np(ref_loss)), bars)]
    return rows


def gradient_rows(ours: CLIP, ref: TorchCLIP, batch: dict, bars) -> list[dict]:
    """Every parameter's gradient of the CLIP loss; torch's mapped to our names and layout by the converters."""
    dtype = ours.vision_model.embeddings.patch_embedding.weight.dtype
    images, ids = mx.array(batch["images"]).astype(dtype), mx.array(batch["input_ids"])
    _, grads = nn.value_and_grad(ours, make_loss_fn("clip"))(ours, images, ids, mx.array(batch["labels"]))
    mine = {k: _np(v) for k, v in nn.utils.tree_flatten(grads)}
    ref.model.zero_grad(set_to_none=True)
    ref.loss_value(ref.pixels(batch["images"]), ref.tokens(batch["input_ids"])).backward()
    theirs = ours.sanitize(to_ours({n: p.grad for n, p in ref.model.named_parameters()}))
    ref.model.zero_grad(set_to_none=True)
    if set(mine) != set(theirs):
        raise AssertionError(f"gradient names differ: {sorted(set(mine) ^ set(theirs))[:10]}")
    whole = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in theirs.values())))
    rows = []
    for name in sorted(mine):
        a, b = mine[name], np.asarray(theirs[name])
        if ZERO_GRADIENT.search(name):
            diff = float(np.linalg.norm(a.astype(np.float64) - b) / whole)
            label = f"{name} (≈ 0 exactly: ‖Δ‖/‖whole gradient‖)"
            rows.append({**_row("gradients", label, diff, bars), "noise": True})
        else:
            rows.append(_row("gradients", name, rel(a, b), bars))
    return rows


# ---- training -------------------------------------------------------------------------------------------------------

def train_both(ours: CLIP, ref: TorchCLIP, batches: list[dict], args: TrainingArgs, log=print,
               control: TorchCLIP | None = None) -> dict:
    """`args.steps` steps of each side's own training step on batches[k % len(batches)]. `control`, a second torch
    model, trains alongside: how far torch drifts from itself tells how much the training dynamics amplify rounding."""
    steps = args.steps
    optimizer = build_optimizer(ours, args, steps)
    step = make_step(ours, optimizer, make_loss_fn(args.loss), args.grad_clip)
    dtype = ours.vision_model.embeddings.patch_embedding.weight.dtype
    curves = {k: [] for k in ("loss_mlx", "loss_torch", "grad_norm_mlx", "grad_norm_torch")}
    seconds = {"mlx": 0.0, "torch": 0.0}
    for k in range(steps):
        b = batches[k % len(batches)]
        tick = time.perf_counter()
        loss, norm, applied = step(mx.array(b["images"]).astype(dtype), mx.array(b["input_ids"]), mx.array(b["labels"]))
        mx.eval(loss, norm, applied, ours.state, optimizer.state)
        seconds["mlx"] += time.perf_counter() - tick
        tick = time.perf_counter()
        t_loss, t_norm, t_applied = ref.train_step(b["images"], b["input_ids"])
        seconds["torch"] += time.perf_counter() - tick
        if control is not None:
            curves.setdefault("loss_control", []).append(float(control.train_step(b["images"], b["input_ids"])[0]))
        if not (applied.item() and t_applied):
            raise RuntimeError(f"step {k + 1}: non-finite loss or gradient (mlx {loss.item()}, torch {t_loss.item()})")
        values = {"loss_mlx": loss, "loss_torch": t_loss, "grad_norm_mlx": norm, "grad_norm_torch": t_norm}
        for key, value in values.items():
            curves[key].append(float(value.item()))
        if (k + 1) % 10 == 0 or k + 1 == steps:
            log(f"step {k + 1}/{steps}: loss mlx {curves['loss_mlx'][-1]:.6f} torch {curves['loss_torch'][-1]:.6f}")
    diffs = [abs(a - b) / abs(b) for a, b in zip(curves["loss_mlx"], curves["loss_torch"])]
    worst = int(np.argmax(diffs)) if diffs else 0
    out = {**curves, "loss_rel_diff": diffs, "max_loss_rel_diff": max(diffs, default=0.0), "at_step": worst + 1,
           "seconds": seconds}
    if control is not None:
        out["control_rel_diff"] = [abs(a - b) / abs(b) for a, b in zip(curves["loss_control"], curves["loss_torch"])]
        out["max_control_rel_diff"] = max(out["control_rel_diff"], default=0.0)
    return out


def parameter_distance(ours: CLIP, ref: TorchCLIP, init: dict[str, np.ndarray], noise=()) -> dict:
    """‖θ_mlx − θ_torch‖ over all parameters, relative to ‖θ_torch‖ and to how far training moved them. The worst
    single parameter is looked for outside `noise` (those whose gradient is zero in exact arithmetic: Adam turns their
    rounding noise into tiny steps that differ between the sides and change no output)."""
    mine = {k: _np(v) for k, v in nn.utils.tree_flatten(ours.parameters())}
    theirs = {k: np.asarray(v) for k, v in ours.sanitize(to_ours(dict(ref.model.named_parameters()))).items()}
    sq = lambda d: sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in d.values())  # noqa: E731
    gap = sq({k: mine[k].astype(np.float64) - theirs[k] for k in mine}) ** 0.5
    moved = sq({k: theirs[k].astype(np.float64) - init[k] for k in mine}) ** 0.5
    per = {k: rel(mine[k], theirs[k]) for k in mine if k not in noise}
    worst = max(per, key=per.get)
    return {"rel_to_params": gap / sq(theirs) ** 0.5, "rel_to_update": gap / moved if moved else float("nan"),
            "update_norm": moved, "worst_param": worst, "worst_param_rel": per[worst]}


# ---- the command ----------------------------------------------------------------------------------------------------

def _same_device(torch_device: torch.device, dtype: str) -> None:
    """MLX on the device torch got. On CUDA in float32 both sides do full-precision matmuls and convolutions (MLX
    and cuDNN would otherwise use TF32, whose 10-bit mantissa no 1e-5 bar survives)."""
    mx.set_default_device(mx.cpu if torch_device.type == "cpu" else mx.gpu)
    if torch_device.type == "cuda" and dtype == "float32":
        os.environ.setdefault("MLX_ENABLE_TF32", "0")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _control(config, init: dict, device, dtype: str, args: TrainingArgs, seed: int) -> TorchCLIP:
    """A torch copy whose initial weights differ from the reference's by about one float32 rounding (relative 2^-24)."""
    rng = np.random.default_rng(seed + 1)
    nudged = {k: v * (1 + 2.0**-24 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init.items()}
    return TorchCLIP(from_weights(config, nudged, device, dtype), config, args, args.steps)


def parity(arch: str, steps: int = 100, device: str = "auto", out=None, batch: int = 16, dtype: str = "float32",
           lr: float = 1e-4, warmup: int = 10, n_batches: int = 4, seed: int = 0, control: bool = False,
           log=print) -> dict:
    """Run the comparison and (with `out`) write parity.json / parity.md / parity.png there; returns the report.

    Training uses TrainingArgs defaults (AdamW betas, eps, weight decay 0.1, grad clip 1.0, cosine schedule) with
    `lr` and `warmup`; batches[k % n_batches] feeds step k on both sides. `control` also trains a torch copy nudged
    by one float32 rounding, whose drift from the reference is the floor any two implementations can reach."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = arch_config(arch)
    tdev = pick_device(device)
    _same_device(tdev, dtype)
    bars = FP32_BARS if dtype == "float32" else None
    batches = fixed_batches(config, batch, n_batches, seed)
    ours = init_weights(CLIP(config), seed)
    init = {k: np.array(v) for k, v in nn.utils.tree_flatten(ours.parameters())}
    ref = TorchCLIP(from_weights(config, init, tdev, dtype), config)
    cast(ours, dtype)
    log(f"parity {arch} {dtype} on {tdev.type}: comparing stages")
    stages = front_end_rows(config, batches[0], bars) + forward_rows(ours, ref, batches[0], bars)
    grads = gradient_rows(ours, ref, batches[0], bars)
    args = TrainingArgs(lr=lr, warmup=warmup, steps=steps, seed=seed)
    ref.args, ref.total_steps = args, steps
    log(f"training {steps} steps on both sides (batch {batch}, lr {lr}, warm-up {warmup})")
    twin = _control(config, init, tdev, dtype, args, seed) if control else None
    train = train_both(ours, ref, batches, args, log, twin)
    noise = {r["name"].split(" ")[0] for r in grads if r.get("noise")}
    train["parameter_distance"] = parameter_distance(ours, ref, init, noise)
    if bars:
        train["pass"] = train["max_loss_rel_diff"] <= bars["loss curve"]
    checks = [r["pass"] for r in stages + grads if r["pass"] is not None] + ([train["pass"]] if bars else [])
    report = {
        "arch": arch, "dtype": dtype, "device": tdev.type, "machine": machine_info(tdev.type),
        "settings": {"steps": steps, "batch": batch, "n_batches": n_batches, "seed": seed, "lr": lr, "warmup": warmup,
                     "schedule": args.schedule, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                     "betas": [args.beta1, args.beta2], "eps": args.eps, "loss": args.loss, "control": control},
        "bars": bars, "stages": stages, "gradients": grads, "training": train,
        "passed": all(checks) if bars else None,
    }
    if out is not None:
        write_report(report, out)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true")
    a = ap.parse_args(argv)
    report = parity(a.arch, a.steps, a.device, a.out, a.batch, a.dtype, a.lr, a.warmup, seed=a.seed, control=a.control)
    return 0 if report["passed"] in (True, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
