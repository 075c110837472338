"""open_clip <-> our (Hugging Face-named) weights and configs.

What this file knows: open_clip's parameter names and its three structural differences — fused attention in-projections
(`in_proj_weight` = q;k;v stacked), projections stored as `x @ P` matrices rather than Linear weights, and the conv stem in
torch's OIHW layout (left to `CLIP.sanitize`, which knows MLX layout). Arrays are numpy; nothing here imports torch.
"""

from __future__ import annotations

import re

import numpy as np

from converters.safety import CheckpointError
from mlx_clip.config import CLIPConfig, ConfigError, TextConfig, VisionConfig

# (open_clip substring, our substring); applied in order to every key that is not handled structurally.
NAME_SWAPS = [
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("text_projection.weight", "text_projection.weight"),  # proj_bias=True: already a Linear
    ("text_projection.bias", "text_projection.bias"),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
]
_IN_PROJ = re.compile(r"^(.*)\.attn\.in_proj_(weight|bias)$")
# Matrices used as `x @ P` in open_clip; ours are Linear weights (P.T).
_MATRIX_PROJ = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def _swap(key: str, table) -> str:
    for old, new in table:
        if old in key:
            key = key.replace(old, new)
    return key


def from_open_clip(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """open_clip state dict -> our names (conv still OIHW; `CLIP.sanitize` fixes layout)."""
    out = {}
    for key, value in state_dict.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):  # a buffer, rebuilt by the model
            continue
        if key in _MATRIX_PROJ:
            out[_MATRIX_PROJ[key]] = np.ascontiguousarray(value.T)
        elif m := _IN_PROJ.match(key):
            prefix = _swap(m.group(1) + ".", NAME_SWAPS) + "self_attn."
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{prefix}{name}.{m.group(2)}"] = np.ascontiguousarray(part)
        else:
            new = _swap(key, NAME_SWAPS)
            if new == key and key not in ("logit_scale", "logit_bias", "text_projection.weight", "text_projection.bias"):
                raise CheckpointError(f"open_clip checkpoint: unexpected key {key!r} (not a standard ViT CLIP parameter)")
            out[new] = value
    return out


_REVERSE = [(new, old) for old, new in NAME_SWAPS if old != new]
_Q = re.compile(r"^(.*)\.self_attn\.q_proj\.(weight|bias)$")


def to_open_clip(weights: dict[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
    """Our names (MLX layout) -> an open_clip state dict that `open_clip.create_model(arch).load_state_dict` takes."""
    out = {}
    for key, value in weights.items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue  # consumed with q_proj
        if m := _Q.match(key):
            parts = [weights[f"{m.group(1)}.self_attn.{n}.{m.group(2)}"] for n in ("q_proj", "k_proj", "v_proj")]
            prefix = _swap_reverse(m.group(1) + ".")
            out[f"{prefix}attn.in_proj_{m.group(2)}"] = np.concatenate(parts, axis=0)
        elif key == "visual_projection.weight":
            out["visual.proj"] = np.ascontiguousarray(value.T)
        elif key == "text_projection.weight" and not config.text_config.projection_bias:
            out["text_projection"] = np.ascontiguousarray(value.T)
        elif key == "vision_model.embeddings.patch_embedding.weight":
            out["visual.conv1.weight"] = np.ascontiguousarray(value.transpose(0, 3, 1, 2))  # OHWI -> OIHW
        elif key == "visual_projection.bias":
            raise CheckpointError("open_clip has no bias on the visual projection; this model cannot be exported to open_clip")
        else:
            out[_swap_reverse(key)] = value
    return out


def _swap_reverse(key: str) -> str:
    # Longest (most specific) names first so "vision_model.encoder.layers." wins over shorter swaps.
    for new, old in sorted(_REVERSE, key=lambda p: -len(p[0])):
        if new in key:
            key = key.replace(new, old)
    return key


_UNSUPPORTED = {
    "vision_cfg": ["timm_model_name", "attentional_pool", "ls_init_value", "block_type", "qk_norm", "no_ln_pre",
                   "final_ln_after_pool", "scaled_cosine_attn", "scale_heads", "scale_attn", "scale_fc"],
    "text_cfg": ["hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "final_ln_after_pool", "block_type",
                 "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn", "scale_fc"],
}


def config_from_open_clip(model_cfg: dict, name: str = "") -> CLIPConfig:
    """An open_clip model config (model_configs/*.json) -> CLIPConfig; refuses towers we do not implement."""
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for where, cfg in (("vision_cfg", v), ("text_cfg", t)):
        used = [k for k in _UNSUPPORTED[where] if cfg.get(k)]
        if used:
            raise ConfigError(f"open_clip {name or 'config'}: {where} uses {', '.join(used)}, which mlx-clip does not implement")
    if v.get("pool_type", "tok") != "tok" or t.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise ConfigError(f"open_clip {name or 'config'}: unsupported pool_type")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v_width, t_width = v.get("width", 768), t.get("width", 512)
    vision = VisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * v.get("mlp_ratio", 4.0)), num_hidden_layers=v.get("layers", 12),
        num_attention_heads=v_width // v.get("head_width", 64), image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16), hidden_act=act,
    )
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408), hidden_size=t_width, intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
        max_position_embeddings=t.get("context_length", 77), hidden_act=act, projection_bias=bool(t.get("proj_bias", False)),
        pool_type=t.get("pool_type", "argmax"), eos_token_id=t.get("eos_id", 49407) if t.get("pool_type") == "eos" else 49407,
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=model_cfg.get("embed_dim", 512), name=name)


def config_to_open_clip(config: CLIPConfig) -> dict:
    """CLIPConfig -> an open_clip model config dict (for `open_clip.model.CLIP(**cfg)` and exported checkpoints)."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act:
        raise ConfigError("open_clip uses one activation for both towers; this config mixes gelu and quick_gelu")
    if v.projection_bias:
        raise ConfigError("open_clip has no bias on the visual projection")
    cfg = {
        "embed_dim": config.projection_dim,
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                       "head_width": v.hidden_size // v.num_attention_heads, "mlp_ratio": v.intermediate_size / v.hidden_size,
                       "patch_size": v.patch_size},
        "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
                     "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                     "mlp_ratio": t.intermediate_size / t.hidden_size, "proj_bias": t.projection_bias},
    }
    if t.pool_type == "eos":
        cfg["text_cfg"].update(pool_type="eos", eos_id=t.eos_token_id)
    if config.logit_bias_init_value is not None:
        cfg["init_logit_bias"] = config.logit_bias_init_value
    return cfg
