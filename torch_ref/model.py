"""The open_clip reference with mlx_clip's surface: `encode_image` / `encode_text` on NHWC pixels, and a `train_step`
with the same loss, AdamW parameter groups, LR schedule, gradient clip, logit-scale clamp and dtype policy as
`mlx_clip.train` (`make_step` + `GroupedAdamW`).

The model itself is open_clip's own `CLIP`, built from our config by the converter's `config_to_open_clip`, so the
numerics come from code we did not write. What is shared with the MLX side is policy only: which parameters skip weight
decay and how deep each one sits for layer-wise LR decay are read from `mlx_clip.train.optim` through the converter's
name mapping, so the two optimizers cannot disagree on a group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from converters.convert import arch_config
from converters.open_clip import config_from_open_clip, config_to_open_clip, from_open_clip, to_open_clip
from converters.safety import validate_safetensors_header
from mlx_clip.config import CLIPConfig
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import NO_DECAY, layer_id
from torch_ref.device import pick_device, torch_dtype
from torch_ref.losses import clip_loss

MAX_LOGIT_SCALE = 100.0  # exp(logit_scale) is clamped to [1, 100] after every step, as open_clip and mlx_clip do


# ---- building -------------------------------------------------------------------------------------------------------

def build_model(arch: str | CLIPConfig, device=None, dtype: str = "float32", seed: int = 0) -> open_clip.model.CLIP:
    """open_clip's CLIP for a named arch, an open_clip config JSON or a CLIPConfig; open_clip's own seeded init."""
    config = arch if isinstance(arch, CLIPConfig) else arch_config(arch)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config_to_open_clip(config))
    return _place(model, device, dtype)


def from_weights(config: CLIPConfig, weights: dict[str, np.ndarray], device=None, dtype: str = "float32"):
    """open_clip's CLIP holding `weights` (our names, MLX layout, numpy), loaded strictly."""
    state = to_open_clip({k: np.asarray(v, np.float32) for k, v in weights.items()}, config)
    model = open_clip.model.CLIP(**config_to_open_clip(config))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return _place(model, device, dtype)


def load_exported(path, device=None, dtype: str | None = None) -> tuple[open_clip.model.CLIP, CLIPConfig]:
    """(model, config) from a file written by `mlxclip export --to open_clip` (its config rides in the metadata)."""
    path = Path(path)
    validate_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "open_clip_config" not in meta:
        raise ValueError(f"{path}: no open_clip_config in the safetensors metadata (not written by `mlxclip export`)")
    oc_cfg = json.loads(meta["open_clip_config"])
    state = load_file(str(path))
    model = open_clip.model.CLIP(**oc_cfg)
    model.load_state_dict(state, strict=True)
    stored = next(iter(state.values())).dtype
    dtype = dtype or {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(stored, "float32")
    return _place(model, device, dtype), config_from_open_clip(oc_cfg, name=path.stem)


def _place(model, device, dtype: str):
    device = device if isinstance(device, torch.device) else pick_device(device)
    return model.to(device=device, dtype=torch_dtype(dtype)).eval()  # CLIP has no dropout: eval == train numerics


# ---- names and parameter groups -------------------------------------------------------------------------------------

def our_names(open_clip_key: str) -> list[str]:
    """Our parameter name(s) for an open_clip key, by the converter's own mapping (a fused in_proj gives q, k, v)."""
    return list(from_open_clip({open_clip_key: np.zeros(3, np.float32)}))


def to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """open_clip-named tensors (parameters or their gradients) -> our names as float32 numpy; the conv stem stays
    OIHW (`CLIP.sanitize` knows MLX layout)."""
    return from_open_clip({k: v.detach().float().cpu().numpy() for k, v in tensors.items()})


def hparams_for(open_clip_key: str, config: CLIPConfig, weight_decay: float, layer_decay: float = 1.0):
    """(lr scale, weight decay) exactly as `mlx_clip.train.optim.param_hparams` gives the same parameter."""
    values = set()
    for name in our_names(open_clip_key):
        depth, top = layer_id(name, config)
        scale = layer_decay ** (top - depth) if layer_decay != 1.0 else 1.0
        values.add((scale, 0.0 if NO_DECAY.search(name) else weight_decay))
    if len(values) != 1:
        raise AssertionError(f"{open_clip_key}: its parts map to different groups {values}")
    return values.pop()


def param_groups(model, config: CLIPConfig, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """torch.optim param groups, one per (lr scale, weight decay); frozen parameters (requires_grad False) left out."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(hparams_for(name, config, weight_decay, layer_decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]


def lr_at(step: int, args: TrainingArgs, total_steps: int) -> float:
    """The LR of 0-based optimizer step `step`: `mlx_clip.train.optim.lr_schedule`'s formula, in float64."""
    if step < args.warmup:
        return args.lr * (step + 1) / max(args.warmup, 1)
    if args.schedule == "const":
        return args.lr
    floor = args.lr * args.min_lr_ratio
    progress = min(max((step - args.warmup) / max(total_steps - args.warmup, 1), 0.0), 1.0)
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_tensor(step: torch.Tensor, args: TrainingArgs, total_steps: int) -> torch.Tensor:
    """`lr_at` of a 0-d step-count tensor, computed where it lies (float64, returned as float32): no host sync."""
    s = step.to(torch.float64)
    warm = args.lr * (s + 1) / max(args.warmup, 1)
    if args.schedule == "const":
        after = torch.full_like(s, args.lr)
    else:
        floor = args.lr * args.min_lr_ratio
        progress = torch.clamp((s - args.warmup) / max(total_steps - args.warmup, 1), 0.0, 1.0)
        after = floor + (args.lr - floor) * 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(s < args.warmup, warm, after).to(torch.float32)


# ---- the mirror of mlx_clip's surface ------------------------------------------------------------------------------

class TorchCLIP:
    """An open_clip model driven like `mlx_clip`: NHWC pixels in, `train_step(images, ids)` -> (loss, norm, applied).

    `args` holds the optimizer settings (TrainingArgs fields: lr, warmup, schedule, min_lr_ratio, weight_decay,
    layer_decay, beta1, beta2, eps, grad_clip). `compile=True` wraps the encoders and the loss in torch.compile.
    """

    def __init__(self, model, config: CLIPConfig, args: TrainingArgs | None = None, total_steps: int = 1,
                 compile: bool = False, fused: bool | None = None):
        self.model, self.config = model, config
        self.args = args or TrainingArgs()
        self.total_steps = total_steps
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        # optimizer steps applied (a skipped non-finite step does not count, as in mlx_clip), kept on the device so
        # that the fused optimizer's guarded step needs no host sync (`step` reads it)
        self._applied = torch.zeros((), dtype=torch.int64, device=self.device)
        self.fused = fused  # None: fused AdamW on CUDA (what open_clip users run there), the reference loop elsewhere
        self.optimizer = None  # built by the first train_step
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
        # open_clip's encoders (compiled when asked), taking inputs already placed by `pixels` / `tokens`.
        self.image_encoder = wrap(model.encode_image)
        self.text_encoder = wrap(model.encode_text)
        self._loss = wrap(self.loss_value)

    # -- inputs and inference --
    def pixels(self, images) -> torch.Tensor:
        """NHWC numpy/tensor -> NCHW tensor on our device and dtype."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        return x.permute(0, 3, 1, 2).to(device=self.device, dtype=self.dtype).contiguous()

    def tokens(self, ids) -> torch.Tensor:
        x = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(np.asarray(ids))
        return x.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def encode_image(self, images, normalize: bool = False) -> torch.Tensor:
        return self.image_encoder(self.pixels(images), normalize=normalize)

    @torch.inference_mode()
    def encode_text(self, ids, normalize: bool = False) -> torch.Tensor:
        return self.text_encoder(self.tokens(ids), normalize=normalize)

    @torch.inference_mode()
    def __call__(self, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(ids, True).T
        return logits, logits.T

    def loss_value(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The CLIP loss with a graph, on already-placed inputs (see `pixels` / `tokens`)."""
        image = self.model.encode_image(pixels, normalize=True)
        text = self.model.encode_text(tokens, normalize=True)
        return clip_loss(image, text, self.model.logit_scale.exp())

    # -- training --
    def build_optimizer(self) -> torch.optim.AdamW:
        a = self.args
        groups = param_groups(self.model, self.config, a.weight_decay, a.layer_decay)
        fused = self.device.type == "cuda" if self.fused is None else self.fused  # identical formula either way
        self.optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, fused=fused or None)
        return self.optimizer

    @property
    def step(self) -> int:
        return int(self._applied.item())

    def train_step(self, images, ids, labels=None):
        """One step on NHWC pixels and token ids (numpy or tensors); see `train_step_on`. `labels` is accepted for
        symmetry with mlx_clip's step; the CLIP loss ignores it."""
        return self.train_step_on(self.pixels(images), self.tokens(ids))

    def train_step_on(self, pixels: torch.Tensor, tokens: torch.Tensor):
        """One step on inputs already placed by `pixels` / `tokens`: loss -> grads -> clip the global norm -> AdamW
        (scheduled LR x group scale) -> clamp logit_scale. A non-finite loss or gradient norm leaves everything
        untouched. Returns (loss, grad norm before clipping, applied): `applied` a bool, or with fused AdamW (CUDA's
        default) a 0-d bool tensor, so that nothing waits for the device."""
        opt = self.optimizer or self.build_optimizer()
        opt.zero_grad(set_to_none=True)
        loss = self._loss(pixels, tokens)
        loss.backward()
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = global_norm(grads)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if opt.defaults.get("fused"):
            return loss.detach(), norm, self._guarded_on_device(opt, grads, norm, finite)
        applied = bool(finite)
        if not applied:
            opt.zero_grad(set_to_none=True)
            return loss.detach(), norm, applied
        self._clip(grads, norm)
        lr = lr_at(self.step, self.args, self.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.step()
        self._clamp_logit_scale()
        self._applied += 1
        return loss.detach(), norm, applied

    def _guarded_on_device(self, opt, grads: list[torch.Tensor], norm: torch.Tensor, finite: torch.Tensor):
        """The same guarded update with no host sync (so a training loop's next step can be queued while this one
        runs, as mlx_clip's loop does): the fused AdamW skips every parameter, moment and step count where
        `found_inf` is set (GradScaler's mechanism), the LR is computed on the device from the applied-step count.
        Returns `finite` as a 0-d bool tensor."""
        self._clip(grads, norm)
        lr = lr_tensor(self._applied, self.args, self.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.found_inf = (~finite).to(torch.float32)
        try:
            opt.step()
        finally:
            del opt.found_inf
        self._clamp_logit_scale(finite)  # on an applied step only, as the host guard does
        self._applied += finite.to(torch.int64)
        return finite

    def _clip(self, grads: list[torch.Tensor], norm: torch.Tensor) -> None:
        if self.args.grad_clip > 0:
            factor = torch.clamp(self.args.grad_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))

    def _clamp_logit_scale(self, where: torch.Tensor | None = None) -> None:
        """Clamp logit_scale to [0, log 100]; with `where` (a 0-d bool tensor) only where it is true, without a sync."""
        with torch.no_grad():
            scale = self.model.logit_scale
            clamped = scale.clamp(0.0, math.log(MAX_LOGIT_SCALE))
            scale.copy_(clamped if where is None else torch.where(where, clamped, scale))


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all gradients, accumulated in float32 whatever their dtype (as mlx_clip's step)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
