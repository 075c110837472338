"""Hugging Face CLIP <-> our weights. Our names *are* HF's, so only layout differs: the conv stem (OIHW vs OHWI) and
the `position_ids` buffers some HF checkpoints carry."""

from __future__ import annotations

import numpy as np

from converters.safety import CheckpointError
from mlx_clip.config import CLIPConfig, ConfigError

PATCH = "vision_model.embeddings.patch_embedding.weight"


def from_hf(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF CLIPModel state dict -> our names (conv still OIHW; `CLIP.sanitize` fixes layout)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}


def to_hf(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our weights (MLX layout) -> a state dict `transformers.CLIPModel` loads."""
    if PATCH not in weights:
        raise CheckpointError(f"weights have no {PATCH}: not a CLIP model")
    out = {k: v for k, v in weights.items() if k != "logit_bias"}  # HF's CLIPModel has no sigmoid-loss bias
    out[PATCH] = np.ascontiguousarray(weights[PATCH].transpose(0, 3, 1, 2))  # OHWI -> OIHW
    return out


def hf_config(config: CLIPConfig) -> dict:
    """config.json for transformers; refuses what HF's CLIPModel cannot express."""
    if config.vision_config.projection_bias or config.text_config.projection_bias:
        raise ConfigError("transformers' CLIPModel has no projection bias; this model cannot be exported to HF")
    return config.to_hf_dict()
