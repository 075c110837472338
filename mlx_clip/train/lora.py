"""LoRA on the encoder projections: wrap, train only the adapters, save them alone, load them back, fuse them away.

A wrapped layer keeps the base Linear under `.linear` (`...self_attn.q_proj.linear.weight`) and adds `lora_a` (r, in)
and `lora_b` (out, r), so y = W x + b + (alpha / r) * B A x; B starts at zero, so a fresh wrap computes the base model.
An adapter dir holds only `adapters.safetensors` + `adapter_config.json`; `fuse_lora` folds B A into W for a plain dir.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from converters.safety import CheckpointError, validate_safetensors_header
from mlx_clip.config import ConfigError
from mlx_clip.io import atomic_dir, load, save
from mlx_clip.linear import Linear
from mlx_clip.model import CLIP

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TOWERS = {"vision": "vision_model", "text": "text_model"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    towers: tuple[str, ...] = ("vision", "text")
    last_n_layers: int | None = None  # adapt only the last N layers of each tower; None: all

    def __post_init__(self):
        self.targets, self.towers = tuple(self.targets), tuple(self.towers)
        _check_subset("targets", self.targets, TARGETS)
        _check_subset("towers", self.towers, tuple(TOWERS))
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.last_n_layers is not None and self.last_n_layers < 1:
            raise ConfigError(f"last_n_layers must be >= 1 or None, got {self.last_n_layers}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets), "towers": list(self.towers)}

    @classmethod
    def from_dict(cls, params: dict) -> "LoRAConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


def _check_subset(what: str, given: tuple, known: tuple) -> None:
    unknown = [x for x in given if x not in known]
    if unknown or not given:
        raise ConfigError(f"LoRA {what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (peft's layout: A (r, in), B (out, r))."""

    def __init__(self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)  # on the adapter input only: the base path stays exact
        bound = 1 / math.sqrt(in_dims)  # Kaiming-uniform-like, as mlx-lm / peft
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T  # (..., r) then (..., out)
        return y + (self.scale * z).astype(y.dtype)  # fp32 adapters must not upcast a bf16 model

    def fused(self) -> nn.Linear:
        """A plain Linear computing the same function (without dropout): W + scale * B @ A."""
        w = self.linear.weight
        delta = self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32))
        bias = "bias" in self.linear
        out = Linear(w.shape[1], w.shape[0], bias=bias)
        out.weight = (w.astype(mx.float32) + delta).astype(w.dtype)
        if bias:
            out.bias = self.linear.bias
        return out


def _target_layers(model: CLIP, cfg: LoRAConfig) -> list[nn.Module]:
    """The encoder layers that get adapters."""
    out = []
    for tower in cfg.towers:
        layers = getattr(model, TOWERS[tower]).encoder.layers
        out += layers if cfg.last_n_layers is None else layers[-cfg.last_n_layers:]
    return out


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    setattr(node, leaf, new)


def apply_lora(model: CLIP, cfg: LoRAConfig) -> CLIP:
    """Wrap the targeted Linear layers in place and freeze everything but `lora_a` / `lora_b`."""
    if any(isinstance(m, LoRALinear) for _, m in model.named_modules()):
        raise ValueError("the model already has LoRA adapters; fuse them first or start from the base model")
    for layer in _target_layers(model, cfg):
        linears = [(p, m) for p, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and p.rsplit(".", 1)[-1] in cfg.targets]
        for path, module in linears:
            _set_child(layer, path, LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout))
    model.freeze()
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return model


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """name -> array of every adapter matrix (the names `save_adapters` writes)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def write_adapters(model: nn.Module, cfg: LoRAConfig, out_dir) -> Path:
    """Write the two adapter files into `out_dir` as is (for callers that already write into a temp dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    mx.save_safetensors(str(out_dir / ADAPTER_WEIGHTS), params, metadata={"format": "mlx"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out_dir


def save_adapters(model: nn.Module, cfg: LoRAConfig, out_dir) -> Path:
    """Write an adapter dir atomically (temp dir + rename); it replaces `out_dir`, so that must be adapters-only."""
    out_dir = Path(out_dir)
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)) \
        if out_dir.is_dir() else []
    if others:
        raise FileExistsError(f"{out_dir}: holds other files ({', '.join(others[:5])}); "
                              "adapters need a dir of their own")
    with atomic_dir(out_dir) as tmp:
        write_adapters(model, cfg, tmp)
    return out_dir


def read_adapter_config(path) -> LoRAConfig:
    path = Path(path) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an adapter dir holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    try:
        return LoRAConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path}: not a LoRA adapter config ({exc})") from exc


def load_adapters(model: CLIP, path) -> CLIP:
    """Wrap a plain base model with the saved LoRA config and load the adapter weights strictly."""
    path = Path(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; an adapter dir holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    apply_lora(model, read_adapter_config(path))
    validate_safetensors_header(file)
    weights = mx.load(str(file))
    expected = lora_parameters(model)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)]
    report = "; ".join(f"{what}: {', '.join(items[:10])}{' ...' if len(items) > 10 else ''}"
                       for what, items in problems if items)
    if report:
        raise CheckpointError(f"{file}: adapters do not fit this base model ({report})")
    model.update(tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in weights.items()]))
    mx.eval(lora_parameters(model))
    return model


def fuse_lora(model: CLIP) -> CLIP:
    """Replace every LoRALinear by a plain Linear with W + scale * B @ A; the model saves as a plain model dir."""
    wrapped = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    for path, module in wrapped:
        _set_child(model, path, module.fused())
    model.unfreeze()  # a plain model again, as `mlx_clip.load` returns it
    mx.eval(model.parameters())
    return model


def load_with_adapters(base, adapter_dir, dtype=None):
    """(model with adapters, tokenizer, preprocess) for inference: the base from `mlx_clip.load`, then the adapters."""
    model, tokenizer, preprocess = load(base, dtype)
    load_adapters(model, adapter_dir)
    model.eval()  # no adapter dropout at inference
    return model, tokenizer, preprocess


def fuse_adapters(model, adapters, out, dtype=None) -> Path:
    """`mlxclip fuse`: base model (dir, hub id or 'builtin') + adapter dir -> a plain model dir at `out`."""
    m, tokenizer, preprocess = load_with_adapters(model, adapters, dtype)
    return save(fuse_lora(m), tokenizer, out, preprocess)
