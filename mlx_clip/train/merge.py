"""WiSE-FT (Wortsman et al. 2022): interpolate the weights of a base and a fine-tuned model of one architecture.

theta = (1 - alpha) * base + alpha * finetuned, per float parameter. alpha = 0 is the base, 1 the fine-tuned model;
values between usually keep most of the fine-tuning gain while recovering robustness the fine-tuning lost.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_clip.config import CLIPConfig, ConfigError
from mlx_clip.io import load, save

# Config fields that do not change the network: a name, and an init value the weights already override.
NON_ARCH_FIELDS = {"name", "logit_scale_init_value"}


def interpolate(base_params: dict, ft_params: dict, alpha: float) -> dict:
    """(1 - alpha) * base + alpha * ft per key; non-float arrays come from `ft`. Same keys and shapes required."""
    _check_alpha(alpha)
    missing, extra = sorted(set(base_params) - set(ft_params)), sorted(set(ft_params) - set(base_params))
    if missing or extra:
        raise ValueError(f"parameter names differ: only in base: {', '.join(missing[:10]) or '-'}; "
                         f"only in finetuned: {', '.join(extra[:10]) or '-'}")
    # The endpoints return the inputs themselves: arithmetic would turn -0.0 into +0.0 and 0 * inf into nan.
    if alpha == 0:
        return dict(base_params)
    if alpha == 1:
        return dict(ft_params)
    return {k: _mix(k, base_params[k], ft, alpha) for k, ft in ft_params.items()}


def _mix(name: str, base: mx.array, ft: mx.array, alpha: float) -> mx.array:
    if base.shape != ft.shape:
        raise ValueError(f"{name}: shape {tuple(base.shape)} in base vs {tuple(ft.shape)} in finetuned")
    if not mx.issubdtype(ft.dtype, mx.floating):
        return ft
    # fp32 arithmetic, then the fine-tuned dtype: bf16 inputs are not rounded twice.
    mixed = (1 - alpha) * base.astype(mx.float32) + alpha * ft.astype(mx.float32)
    return mixed.astype(ft.dtype)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def check_same_architecture(base: CLIPConfig, finetuned: CLIPConfig) -> None:
    """Raise ConfigError naming every architectural field that differs."""
    a, b = dict(tree_flatten(base.to_dict())), dict(tree_flatten(finetuned.to_dict()))
    diffs = [f"{k}: base {a.get(k)!r} vs finetuned {b.get(k)!r}"
             for k in sorted(set(a) | set(b)) if k not in NON_ARCH_FIELDS and a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"base and finetuned models differ in architecture ({'; '.join(diffs)})")


def merge_models(base_dir, finetuned_dir, alpha: float, out_dir) -> Path:
    """Write the WiSE-FT model dir; tokenizer and preprocessing come from the fine-tuned dir."""
    _check_alpha(alpha)
    base, _, _ = load(base_dir)
    finetuned, tokenizer, preprocess = load(finetuned_dir)
    check_same_architecture(base.config, finetuned.config)
    mixed = interpolate(dict(tree_flatten(base.parameters())), dict(tree_flatten(finetuned.parameters())), alpha)
    finetuned.update(tree_unflatten(list(mixed.items())))
    mx.eval(finetuned.parameters())
    return save(finetuned, tokenizer, out_dir, preprocess)
