"""The conversions behind `mlxclip convert / export / init`: foreign checkpoint -> model dir, and back."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from converters import hf, open_clip
from converters.safety import load_checkpoint
from mlx_clip.config import CLIPConfig, get_config
from mlx_clip.io import apply_weights, atomic_dir, cast, load, save
from mlx_clip.model import CLIP, init_weights
from mlx_clip.preprocess import Preprocess
from mlx_clip.tokenizer import Tokenizer


def arch_config(arch: str) -> CLIPConfig:
    """A named architecture, or an open_clip model-config JSON file (model_configs/*.json)."""
    if arch.endswith(".json"):
        path = Path(arch)
        return open_clip.config_from_open_clip(json.loads(path.read_text()), name=path.stem)
    return get_config(arch)


def _finish(model: CLIP, out, dtype: str | None) -> Path:
    if dtype:
        cast(model, dtype)
    cfg = model.config
    return save(model, Tokenizer.default(cfg.text_config.max_position_embeddings), out,
                Preprocess(image_size=cfg.vision_config.image_size))


def convert_open_clip(checkpoint, arch: str, out, dtype: str | None = "float32") -> Path:
    """An open_clip state dict (.safetensors, or .bin/.pt read weights-only) -> a model dir."""
    config = arch_config(arch)
    weights = open_clip.from_open_clip(load_checkpoint(Path(checkpoint)))
    model = apply_weights(CLIP(config), weights, str(checkpoint))
    return _finish(model, out, dtype)


def convert_hf(hf_dir, out, dtype: str | None = "float32") -> Path:
    """A Hugging Face CLIP dir (config.json + model.safetensors / pytorch_model.bin) -> a model dir."""
    model, tokenizer, preprocess = load(hf_dir)
    if dtype:
        cast(model, dtype)
    return save(model, tokenizer, out, preprocess)


def init_model(arch: str, seed: int, out, dtype: str | None = "float32") -> Path:
    """A seeded random-init model dir."""
    return _finish(init_weights(CLIP(arch_config(arch)), seed), out, dtype)


def _numpy_weights(model: CLIP) -> tuple[dict[str, np.ndarray], mx.Dtype]:
    """Float32 numpy copies for the structural edits, and the dtype to write back (bf16 -> f32 -> bf16 is exact)."""
    from mlx_clip.quantize import quantization_of

    if quantization_of(model):
        raise ValueError("this model dir is quantized; open_clip and Hugging Face checkpoints are float: export the "
                         "float model it was converted from")
    flat = dict(nn.utils.tree_flatten(model.parameters()))
    dtype = flat["vision_model.embeddings.patch_embedding.weight"].dtype
    return {k: np.array(v.astype(mx.float32)) for k, v in flat.items()}, dtype


def _write(tensors: dict[str, np.ndarray], dtype: mx.Dtype, path: Path, metadata: dict) -> None:
    mx.save_safetensors(str(path), {k: mx.array(v).astype(dtype) for k, v in tensors.items()}, metadata=metadata)


def export_open_clip(model_dir, out_file) -> Path:
    """Model dir -> an open_clip state dict (.safetensors) for `open_clip.create_model(arch)` + `load_state_dict`."""
    model, _, _ = load(model_dir)
    weights, dtype = _numpy_weights(model)
    state = open_clip.to_open_clip(weights, model.config)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.stem}.tmp.safetensors")  # mx appends .safetensors otherwise
    meta = {"format": "pt", "open_clip_config": json.dumps(open_clip.config_to_open_clip(model.config))}
    _write(state, dtype, tmp, meta)
    tmp.replace(out_file)
    return out_file


def export_hf(model_dir, out_dir) -> Path:
    """Model dir -> a Hugging Face CLIP dir that `transformers.CLIPModel.from_pretrained` loads."""
    model, tokenizer, preprocess = load(model_dir)
    weights, dtype = _numpy_weights(model)
    config = hf.hf_config(model.config)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write(hf.to_hf(weights), dtype, tmp / "model.safetensors", {"format": "pt"})
        tokenizer.save(tmp)
        preprocess.save(tmp)
    return Path(out_dir)
