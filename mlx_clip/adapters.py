"""Few-shot adapters on a frozen CLIP: CLIP-Adapter, Tip-Adapter(-F) and CoOp (`mlxclip finetune --adapter ...`).

- clip-adapter (Gao et al. 2021): a residual bottleneck MLP on the frozen image feature,
  f' = ratio * relu(W2 relu(W1 f)) + (1 - ratio) * f; the classifier is the zero-shot text classifier.
- tip-adapter (Zhang et al. 2022): training-free. The few-shot image features are a cache (keys K, one-hot values L);
  logits = s * f Wᵀ + alpha * exp(-beta (1 - f Kᵀ)) L, with s = exp(logit_scale) of the base (the paper's 100).
  Tip-Adapter-F (`--steps N`): the keys are fine-tuned, the values stay.
- coop (Zhou et al. 2022): M context vectors replace the prompt words after SOT ("[SOT] v1..vM classname . [EOT]"),
  initialised from the embeddings of `--coop-ctx`; both towers stay frozen, the context vectors alone train.

full / lit / lora train the model itself (mlx_clip.train.finetune); this module only maps them to their options.
Each feature method saves only its own arrays: RUN_DIR/adapter/{adapter.safetensors, adapter_config.json}, the config
naming the base model. `load_adapter(dir)` (and `mlx_clip.load(dir)`, hence `mlxclip serve --model RUN_DIR/adapter` and
`mlxclip eval`) returns (AdaptedCLIP, tokenizer, preprocess). AdaptedCLIP has the CLIP surface (`encode_image`,
`encode_text`, `logit_scale`, `config`): serve's embeddings and zero-shot /classify use it as a plain model, so a
clip-adapter's adapted image features are served; `classify(images)` -> (B, C) logits over the trained class names is
the adapter's own classifier (Tip-Adapter's cache and CoOp's learned prompts live only there). WiSE-FT (mlx_clip.train.merge) applies to full and lit; these methods already interpolate with zero-shot
through `ratio` (clip-adapter) and `alpha` (tip-adapter).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_clip.io import atomic_dir, load

FEATURE_METHODS = ("clip-adapter", "tip-adapter", "coop")
METHODS = ("full", "lit", "lora") + FEATURE_METHODS
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
# Per-method defaults for options the user (or a preset recommending this method) did not give.
METHOD_DEFAULTS = {
    "full": {}, "lit": {"lock_image": True}, "lora": {"lora_rank": 8, "lr": 1e-3},
    "clip-adapter": {"lr": 1e-3, "epochs": 20, "batch_size": 32, "weight_decay": 0.0},
    "tip-adapter": {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.0},  # trains (Tip-Adapter-F) only with --steps
    "coop": {"lr": 2e-3, "epochs": 20, "batch_size": 32, "weight_decay": 0.0},
}


def adapter_defaults(method: str) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown adapter {method!r}; choose one of {', '.join(METHODS)}")
    return dict(METHOD_DEFAULTS[method])


@dataclass
class AdapterConfig:
    method: str
    base_model: str = "builtin"
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    ratio: float = 0.2  # clip-adapter residual ratio
    reduction: int = 4  # clip-adapter bottleneck: dim // reduction
    alpha: float = 1.0  # tip-adapter cache weight
    beta: float = 5.5  # tip-adapter affinity sharpness
    ctx_init: str = "a photo of a"  # coop context initialisation (its token count is M)
    seed: int = 0

    def __post_init__(self):
        if self.method not in FEATURE_METHODS:
            raise ValueError(f"adapter method must be one of {', '.join(FEATURE_METHODS)}, got {self.method!r}")
        if not self.classnames:
            raise ValueError("an adapter needs the class names")

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ClipAdapterHead(nn.Module):
    def __init__(self, dim: int, reduction: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)
        self.ratio = ratio

    def __call__(self, f: mx.array) -> mx.array:
        return self.ratio * nn.relu(self.fc2(nn.relu(self.fc1(f)))) + (1 - self.ratio) * f


class TipCache(nn.Module):
    def __init__(self, keys: mx.array, values: mx.array, alpha: float, beta: float):
        super().__init__()
        self.cache_keys, self.cache_values = keys, values  # (N, d) normalized few-shot features, (N, C) one-hot labels
        self.alpha, self.beta = alpha, beta

    def __call__(self, f: mx.array) -> mx.array:
        return self.alpha * mx.exp(-self.beta * (1 - f @ self.cache_keys.T)) @ self.cache_values  # (B, C)


class PromptContext(nn.Module):
    def __init__(self, ctx: mx.array):
        super().__init__()
        self.ctx = ctx  # (M, text hidden)


def _unit(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def coop_prompt_ids(tokenizer, classnames, ctx_init: str) -> tuple[np.ndarray, int]:
    """Token ids "[SOT] ctx words classname. [EOT]" per class, and M (the ctx token count, at positions 1..M)."""
    n_ctx = len(tokenizer.encode(ctx_init))
    return tokenizer.tokenize_numpy([f"{ctx_init} {c}." for c in classnames]), n_ctx


def coop_text_features(clip, ctx: mx.array, ids: mx.array) -> mx.array:
    """Normalized class features with the context vectors spliced in after SOT: (C, projection_dim)."""
    tm, (c, m) = clip.text_model, (ids.shape[0], ctx.shape[0])
    x = tm.embeddings.token_embedding(ids)  # (C, L, D)
    context = mx.broadcast_to(ctx[None].astype(x.dtype), (c, m, x.shape[-1]))
    x = mx.concatenate([x[:, :1], context, x[:, 1 + m:]], axis=1) + tm.embeddings.position_embedding.weight[: ids.shape[1]]
    return _unit(clip.text_projection(tm.pool(x, ids)))


class AdaptedCLIP(nn.Module):
    """A frozen CLIP plus one adapter; the CLIP surface plus `classify`."""

    def __init__(self, clip, tokenizer, cfg: AdapterConfig, head: nn.Module | None = None):
        super().__init__()
        self.clip, self.adapter_config = clip, cfg
        self._scale = float(math.exp(float(clip.logit_scale.item())))
        if cfg.method == "coop":
            ids, self._n_ctx = coop_prompt_ids(tokenizer, cfg.classnames, cfg.ctx_init)
            self._ids = mx.array(ids)
            self.head = head or PromptContext(clip.text_model.embeddings.token_embedding(self._ids[0, 1: 1 + self._n_ctx]))
        else:
            from mlx_clip.eval import class_embeddings  # the zero-shot classifier: stays the base model's

            self._classifier = mx.array(class_embeddings(clip, tokenizer, cfg.classnames, cfg.templates))
            dim = clip.config.projection_dim
            self.head = head or (ClipAdapterHead(dim, cfg.reduction, cfg.ratio) if cfg.method == "clip-adapter"
                                 else TipCache(mx.zeros((0, dim)), mx.zeros((0, len(cfg.classnames))), cfg.alpha, cfg.beta))
        self.freeze()
        self.head.unfreeze()
        if cfg.method == "tip-adapter":
            self.head.freeze(keys=["cache_values"], recurse=False)  # Tip-Adapter-F tunes the keys only

    @property
    def config(self):
        return self.clip.config

    @property
    def logit_scale(self) -> mx.array:  # what the server reads for /classify
        return self.clip.logit_scale

    def encode_image(self, images: mx.array, normalize: bool = False) -> mx.array:
        if self.adapter_config.method != "clip-adapter":
            return self.clip.encode_image(images, normalize)
        f = self.head(self.clip.encode_image(images, normalize=True))
        return _unit(f) if normalize else f

    def encode_text(self, ids: mx.array, normalize: bool = False) -> mx.array:
        return self.clip.encode_text(ids, normalize)

    def class_features(self) -> mx.array:
        if self.adapter_config.method == "coop":
            return coop_text_features(self.clip, self.head.ctx, self._ids)
        return self._classifier

    def logits_from_features(self, f: mx.array) -> mx.array:
        """(B, C) logits from the base's normalized image features."""
        if self.adapter_config.method == "clip-adapter":
            return self._scale * _unit(self.head(f)) @ self.class_features().T
        logits = self._scale * f @ self.class_features().T
        return logits + self.head(f) if self.adapter_config.method == "tip-adapter" else logits

    def classify(self, images: mx.array) -> mx.array:
        return self.logits_from_features(self.clip.encode_image(images, normalize=True))

    def adapter_weights(self) -> dict:
        return dict(tree_flatten(self.head.parameters()))


def build_adapter(clip, tokenizer, cfg: AdapterConfig, features=None, labels=None) -> AdaptedCLIP:
    """A fresh adapter; tip-adapter fills its cache from the few-shot `features` (normalized, (N, d)) and `labels`."""
    mx.random.seed(cfg.seed)
    head = None
    if cfg.method == "tip-adapter":
        values = np.eye(len(cfg.classnames), dtype=np.float32)[np.asarray(labels)]
        head = TipCache(mx.array(np.asarray(features, np.float32)), mx.array(values), cfg.alpha, cfg.beta)
    return AdaptedCLIP(clip, tokenizer, cfg, head)


def train_adapter(model: AdaptedCLIP, features, labels, steps: int, batch_size: int = 32, lr: float = 1e-3,
                  weight_decay: float = 0.0, seed: int = 0, log=None) -> list[float]:
    """Cross-entropy on precomputed (frozen-tower) features; cosine LR; returns the losses."""
    if steps <= 0:
        return []
    features, labels = mx.array(np.asarray(features, np.float32)), np.asarray(labels, np.int64)
    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps), weight_decay=weight_decay)

    def loss_fn(m, f, y):
        return nn.losses.cross_entropy(m.logits_from_features(f), y, reduction="mean")

    step_fn = nn.value_and_grad(model, loss_fn)
    rng, losses = np.random.default_rng(seed), []
    for step in range(steps):
        idx = rng.choice(len(labels), size=min(batch_size, len(labels)), replace=False)
        loss, grads = step_fn(model, features[mx.array(idx)], mx.array(labels[idx]))
        optimizer.update(model, grads)
        mx.eval(model.head.parameters(), optimizer.state, loss)
        losses.append(loss.item())
        if log and (step + 1) % 10 == 0:
            log({"step": step + 1, "loss": losses[-1]})
    return losses


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ---- save and load -------------------------------------------------------------------------------------------------

def save_adapter(model: AdaptedCLIP, out_dir) -> Path:
    """adapter.safetensors (the adapter's arrays only) + adapter_config.json, written atomically."""
    with atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS), model.adapter_weights(), metadata={"format": "mlx"})
        (tmp / CONFIG).write_text(json.dumps(asdict(model.adapter_config), indent=2) + "\n")
    return Path(out_dir)


def is_adapter_dir(path) -> bool:
    config = Path(path) / CONFIG
    return config.is_file() and json.loads(config.read_text()).get("method") in FEATURE_METHODS


def load_adapter(path, base=None, dtype=None):
    """(AdaptedCLIP, tokenizer, preprocess) from an adapter dir; the base model is the one named in its config
    unless `base` is given. Weights load strictly (names and shapes must match)."""
    from converters.safety import CheckpointError, validate_safetensors_header

    path = Path(path)
    cfg = AdapterConfig.from_dict(json.loads((path / CONFIG).read_text()))
    clip, tokenizer, preprocess = load(base or cfg.base_model, dtype)
    validate_safetensors_header(path / WEIGHTS)
    weights = mx.load(str(path / WEIGHTS))
    head = None
    if cfg.method == "tip-adapter":
        head = TipCache(weights["cache_keys"], weights["cache_values"], cfg.alpha, cfg.beta)
    model = AdaptedCLIP(clip, tokenizer, cfg, head)
    expected = model.adapter_weights()
    wrong = sorted(set(expected) ^ set(weights)) + [k for k in expected if k in weights
                                                     and weights[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path / WEIGHTS}: does not fit a {cfg.method} adapter (keys/shapes: {', '.join(wrong)})")
    model.head.update(tree_unflatten(list(weights.items())))
    mx.eval(model.head.parameters())
    return model, tokenizer, preprocess
