"""Weight-only quantization of the towers' Linear layers (mlx `nn.quantize`), and the model dirs that hold them.

Quantized: every Linear inside the two encoders (attention q/k/v/out projections, MLP fc1/fc2), which hold nearly all of
the towers' matmul weights. Left in float, and why:
- embeddings (token, position, class), the conv patch stem and every LayerNorm: small, or read by lookup (the token
  table), and their error would reach every token;
- `visual_projection` / `text_projection`: under 1% of the weights (ViT-B-32: 0.66 M of 151 M), and they write the
  embedding itself, which is what an index stores and compares;
- a Linear whose input width is not a multiple of `group_size` (MLX quantizes groups along the input dim and refuses
  the rest), e.g. the `tiny` config's 64-wide layers with group_size 128: left in float rather than refused, so every
  config quantizes. `quantized_layers(model)` lists what was done.

A quantized dir's config.json carries `"quantization": {"bits", "group_size", "mode"}`; `mlx_clip.load` rebuilds the
same QuantizedLinear layers (those whose `.scales` the weights hold) before loading the weights.

On a CPU, MLX's quantized matmul is far slower than the float BLAS path (see benchmarks/results/quantization.md):
quantized dirs save disk and memory there, not time.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
ENCODERS = ("vision_model.encoder.", "text_model.encoder.")
MODE = "affine"


def quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    """The policy above: an encoder Linear whose input width divides into groups."""
    return isinstance(module, nn.Linear) and path.startswith(ENCODERS) and module.weight.shape[-1] % group_size == 0


def quantize(model, bits: int = 8, group_size: int = 64):
    """Quantize `model` in place (see the module doc for which layers) and return it."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if quantization_of(model):
        raise ValueError("model is already quantized")
    nn.quantize(model, group_size, bits, mode=MODE, class_predicate=lambda p, m: quantizable(p, m, group_size))
    return model


def quantized_layers(model) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]


def quantization_of(model) -> dict | None:
    """{"bits", "group_size", "mode"} of a quantized model (what config.json records), None for a float one."""
    found = {(m.bits, m.group_size, m.mode) for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"mixed quantization settings {sorted(found)}: a model dir records one")
    bits, group_size, mode = found.pop()
    return {"bits": bits, "group_size": group_size, "mode": mode}


def read_quantization(model_dir) -> dict | None:
    """The `quantization` entry of a model dir's config.json, checked; None for a float dir."""
    path = Path(model_dir) / "config.json"
    q = json.loads(path.read_text()).get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("bits") not in BITS or q.get("group_size") not in GROUP_SIZES:
        raise ValueError(f"{path}: 'quantization' must give bits in {BITS} and group_size in {GROUP_SIZES}, got {q!r}")
    return q


def prepare_for_weights(model, quantization: dict | None, weights: dict):
    """Turn the Linear layers whose `.scales` are in `weights` into QuantizedLinear, so the weights load strictly.

    Keyed on the weights rather than re-running `quantizable`, so a dir loads as it was written even if the policy
    above changes later.
    """
    if quantization is None:
        return model
    nn.quantize(model, quantization["group_size"], quantization["bits"], mode=quantization.get("mode", MODE),
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights)
    return model


def quantize_dir(model_dir, out, bits: int = 8, group_size: int = 64) -> Path:
    """Read a float model dir, quantize it, write `out` (what `mlxclip convert --quantize` ends with)."""
    from mlx_clip.io import load, save

    model, tokenizer, preprocess = load(model_dir)
    return save(quantize(model, bits, group_size), tokenizer, out, preprocess)
