"""Model dirs in and out: `load` (our dirs, plain HF CLIP dirs, hub ids, "builtin") and `save`.

A model dir is HF-shaped: `config.json`, `model.safetensors` (MLX layout, metadata format=mlx), tokenizer files
(`vocab.json`, `merges.txt`, ...), `preprocessor_config.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from converters.safety import CheckpointError, check_inside, load_checkpoint, validate_safetensors_header
from mlx_clip.config import CLIPConfig, ConfigError
from mlx_clip.model import CLIP
from mlx_clip.preprocess import Preprocess
from mlx_clip.resolution import resize_image_size
from mlx_clip.quantize import prepare_for_weights, quantization_of, read_quantization
from mlx_clip.tokenizer import Tokenizer

BUILTIN_DIR = Path(__file__).parent / "assets" / "builtin"
HUB_PATTERNS = [
    "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "vocab.json", "merges.txt",
    "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resolve(path_or_hub_id: str | os.PathLike) -> tuple[Path, Path]:
    """(model dir, root that its files must stay inside). Downloads hub ids through huggingface_hub."""
    name = str(path_or_hub_id)
    if name == "builtin":
        if not (BUILTIN_DIR / "config.json").exists():
            raise FileNotFoundError(f"the bundled base model is missing from {BUILTIN_DIR}; reinstall mlx-clip")
        return BUILTIN_DIR, BUILTIN_DIR
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected a model dir (config.json + model.safetensors), got a file")
        return path, path
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name}: no such model dir, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated...: say which id failed and why
        raise FileNotFoundError(f"could not fetch hub model {name!r}: {exc}") from exc
    # The hub cache links snapshots/<rev>/file -> ../../blobs/<hash>: the repo folder is the boundary.
    return snapshot, snapshot.parents[1]


def load_config(model_dir: Path) -> CLIPConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; a model dir needs config.json (a Hugging Face CLIP config)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or "vision_config" not in raw or "text_config" not in raw:
        raise ConfigError(f"{path}: expected a CLIP config with 'vision_config' and 'text_config'")
    try:
        return CLIPConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_weights_dict(model_dir: Path, root: Path) -> dict:
    """All weight arrays of a dir: model.safetensors, sharded safetensors, or pytorch_model.bin (weights-only)."""
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin")
    weights = {}
    for file in files:
        check_inside(file, root)
        if file.suffix == ".safetensors":
            validate_safetensors_header(file)  # refuse malformed headers before any parser sees them
            weights.update(mx.load(str(file)))  # keeps bfloat16, which numpy cannot hold
        else:
            weights.update(load_checkpoint(file, root=root))
    return weights


def apply_weights(model: CLIP, weights: dict, source: str) -> CLIP:
    """Sanitize and load strictly: every key consumed, every shape matching, errors naming the keys."""
    weights = model.sanitize(weights)
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(weights)) if tuple(weights[k].shape) != tuple(expected[k].shape)]
    problems = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)]
    report = "; ".join(f"{what}: {', '.join(items[:10])}{' ...' if len(items) > 10 else ''}" for what, items in problems if items)
    if report:
        raise CheckpointError(f"{source}: weights do not fit the config ({report})")
    # Checkpoint dtypes are kept (a bf16 dir loads as bf16); `load(dtype=...)` casts afterwards.
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model


def cast(model: CLIP, dtype) -> CLIP:
    """Cast floating parameters (`dtype`: an mx dtype or 'float32'/'bfloat16'/'float16')."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    floats = [(k, v.astype(dtype)) for k, v in nn.utils.tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    model.update(nn.utils.tree_unflatten(floats))
    return model


def load(path_or_hub_id, dtype=None, image_size: int | None = None) -> tuple[CLIP, Tokenizer, Preprocess]:
    """(model, tokenizer, preprocess) from a model dir, a plain HF CLIP dir, a hub id, or "builtin". `image_size`
    makes the model one for that size (position embeddings resampled bicubically, as open_clip) and the preprocess too."""
    model_dir, root = resolve(path_or_hub_id)
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        from mlx_clip.adapters import is_adapter_dir, load_adapter  # an adapter dir: its base model + the adapter

        if is_adapter_dir(model_dir):
            return load_adapter(model_dir, dtype=dtype)
    if dtype is None and str(path_or_hub_id) == "builtin":
        dtype = "float32"  # stored in float16 only to stay small; CPUs compute half precision slowly
    config = load_config(model_dir)
    weights = load_weights_dict(model_dir, root)
    # A quantized dir (config.json "quantization") needs its QuantizedLinear layers before the weights load strictly.
    model = prepare_for_weights(CLIP(config), read_quantization(model_dir), weights)
    model = apply_weights(model, weights, str(model_dir))
    if dtype is not None:
        cast(model, dtype)
    if image_size and image_size != config.vision_config.image_size:
        resize_image_size(model, image_size)  # after the cast: from the stored values, in fp32
    mx.eval(model.parameters())
    tokenizer = Tokenizer.from_dir(model_dir, context_length=config.text_config.max_position_embeddings)
    preprocess = Preprocess.from_dir(model_dir, image_size=config.vision_config.image_size)
    if image_size:
        preprocess = dataclasses.replace(preprocess, image_size=image_size)
    return model, tokenizer, preprocess


@contextlib.contextmanager
def atomic_dir(out_dir):
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir` whole, on error it vanishes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: CLIP, tokenizer: Tokenizer | None, out_dir, preprocess: Preprocess | None = None) -> Path:
    """Write a model dir that `load` reads back. Written beside, then renamed into place: never half-written."""
    config = model.config
    with atomic_dir(out_dir) as tmp:
        config_dict = config.to_hf_dict()
        if (quantization := quantization_of(model)) is not None:
            config_dict["quantization"] = quantization
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        (tokenizer or Tokenizer.default(config.text_config.max_position_embeddings)).save(tmp)
        (preprocess or Preprocess(image_size=config.vision_config.image_size)).save(tmp)
    return Path(out_dir)
