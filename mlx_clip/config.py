"""Model configuration: one dataclass family, Hugging Face `CLIPConfig` field names, and the named architectures.

`config.json` in a model dir is a Hugging Face CLIP config (so `transformers.CLIPModel` reads an exported dir and we read
theirs); keys we do not know are ignored, keys HF does not know are ignored by HF.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config file or name that cannot describe a CLIP model."""


@dataclass
class _Base:
    @classmethod
    def from_dict(cls, params: dict):
        """Build from a dict, ignoring unknown keys (HF configs carry many we do not use)."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VisionConfig(_Base):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    # "gelu" (exact erf, open_clip default) or "quick_gelu" (OpenAI weights; the HF default, so HF configs that omit it agree)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_bias: bool = False

    def __post_init__(self):
        _check_common(self, "vision_config")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class TextConfig(_Base):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the context length
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_bias: bool = False
    # Pooling picks the EOT position: "argmax" of the ids (open_clip; EOT has the largest id) or the first `eos_token_id`
    # (HF when eos_token_id != 2). They agree for the CLIP tokenizer.
    pool_type: str = "argmax"
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    def __post_init__(self):
        _check_common(self, "text_config")
        if self.pool_type not in ("argmax", "eos"):
            raise ConfigError(f"text_config: pool_type must be 'argmax' or 'eos', got {self.pool_type!r}")


@dataclass
class CLIPConfig(_Base):
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # ln(1/0.07), as CLIP
    logit_bias_init_value: float | None = None  # set when a sigmoid (SigLIP) loss adds a learnable bias
    name: str = ""

    @classmethod
    def from_dict(cls, params: dict) -> "CLIPConfig":
        params = dict(params)
        for key, sub in (("vision_config", VisionConfig), ("text_config", TextConfig)):
            value = params.get(key, {})
            if not isinstance(value, (dict, sub)):
                raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
            params[key] = value if isinstance(value, sub) else sub.from_dict(_hf_text_pool(key, value))
        return super().from_dict(params)

    def to_hf_dict(self) -> dict:
        """A `config.json` that transformers' CLIPModel reads; our extra fields ride along."""
        out = self.to_dict()
        out.update(architectures=["CLIPModel"], model_type="clip")
        out["text_config"]["model_type"] = "clip_text_model"
        out["vision_config"]["model_type"] = "clip_vision_model"
        return out


def _hf_text_pool(key: str, value: dict) -> dict:
    # HF pools at argmax(ids) when eos_token_id == 2 (old configs), else at the first eos_token_id.
    if key != "text_config" or "pool_type" in value or "eos_token_id" not in value:
        return value
    return {**value, "pool_type": "argmax" if value["eos_token_id"] == 2 else "eos"}


def _check_common(cfg, where: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"{where}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.hidden_act not in ("gelu", "quick_gelu"):
        raise ConfigError(f"{where}: hidden_act must be 'gelu' or 'quick_gelu', got {cfg.hidden_act!r}")


# ---- named architectures (open_clip's model_configs, same names) ----

def _arch(embed, image, patch, v_width, v_layers, t_width, t_heads, t_layers, v_head_width=64, context=77, act="gelu"):
    vision = VisionConfig(
        hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=v_layers,
        num_attention_heads=v_width // v_head_width, image_size=image, patch_size=patch, hidden_act=act,
    )
    text = TextConfig(
        hidden_size=t_width, intermediate_size=4 * t_width, num_hidden_layers=t_layers,
        num_attention_heads=t_heads, max_position_embeddings=context, hidden_act=act,
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=embed)


# name: (embed_dim, image_size, patch, vision width, vision layers, text width, text heads, text layers[, head width])
_OPEN_CLIP_ARCHS = {
    "ViT-S-32": (384, 224, 32, 384, 12, 384, 6, 12),
    "ViT-S-16": (384, 224, 16, 384, 12, 384, 6, 12),
    "ViT-M-32": (512, 224, 32, 512, 12, 512, 8, 12),
    "ViT-M-16": (512, 224, 16, 512, 12, 512, 8, 12),
    "ViT-B-32": (512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 32, 768, 12, 512, 8, 12),
    "ViT-B-16": (512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-L-14": (768, 224, 14, 1024, 24, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 768, 12, 12),
    "ViT-L-16": (768, 224, 16, 1024, 24, 768, 12, 12),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 1024, 16, 24, 80),
    "ViT-H-14-378": (1024, 378, 14, 1280, 32, 1024, 16, 24, 80),
    "ViT-H-16": (1024, 224, 16, 1280, 32, 1024, 16, 24, 80),
}

# Small configs of our own for tests and the demo (text width kept small: the 49,408-token embedding dominates size).
_SMALL_ARCHS = {
    "tiny": dict(embed=32, image=32, patch=8, v_width=64, v_layers=2, t_width=64, t_heads=2, t_layers=2, v_head_width=32),
    "small": dict(embed=128, image=64, patch=8, v_width=192, v_layers=6, t_width=128, t_heads=2, t_layers=4, context=32),
}


def list_configs() -> list[str]:
    names = list(_SMALL_ARCHS)
    for name in _OPEN_CLIP_ARCHS:
        names += [name, f"{name}-quickgelu"]
    return names


def get_config(name: str) -> CLIPConfig:
    """A named architecture; `NAME-quickgelu` is NAME with QuickGELU in both towers (OpenAI-trained weights)."""
    base, quick = (name[: -len("-quickgelu")], True) if name.endswith("-quickgelu") else (name, False)
    act = "quick_gelu" if quick else "gelu"
    if base in _OPEN_CLIP_ARCHS:
        cfg = _arch(*_OPEN_CLIP_ARCHS[base], act=act)
    elif base in _SMALL_ARCHS:
        cfg = _arch(**_SMALL_ARCHS[base], act=act)
    else:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(list_configs())}")
    cfg.name = name
    return cfg
