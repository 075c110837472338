"""converters/: open_clip and HF round trips (bit-exact in fp32), dtype conversion, name tables for every architecture,
bad checkpoints reported by name. References: open_clip, transformers, torch (never our own code on both sides)."""

import dataclasses

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
import transformers
from click.testing import CliRunner

from converters.convert import convert_open_clip
from converters.open_clip import config_from_open_clip, config_to_open_clip, from_open_clip, to_open_clip
from converters.safety import CheckpointError, safetensors_dtypes
from mlx_clip.cli import main
from mlx_clip.config import ConfigError, get_config, list_configs
from mlx_clip.model import CLIP


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter so LN weights/biases and zero-init biases are not trivially 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _open_clip_model(arch="tiny", seed=0):
    torch.manual_seed(seed)
    return _perturb(open_clip.model.CLIP(**config_to_open_clip(get_config(arch))), seed)


def _hf_config(**overrides):
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=998, eos_token_id=999, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    act = overrides.pop("hidden_act", None)
    if act:
        text["hidden_act"] = vision["hidden_act"] = act
    return transformers.CLIPConfig(text_config={**text, **overrides}, vision_config=vision, projection_dim=24)


def _hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return _perturb(transformers.CLIPModel(_hf_config(**overrides)), seed)


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def oc_state(tmp_path_factory):
    """A perturbed tiny open_clip state dict, saved as .safetensors and .pt."""
    root = tmp_path_factory.mktemp("oc")
    state = {k: v.clone().contiguous() for k, v in _open_clip_model().state_dict().items()}
    safetensors.torch.save_file(state, root / "tiny.safetensors")
    torch.save(state, root / "tiny.pt")
    return state, root


# --- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_open_clip_round_trip_is_bit_exact(tmp_path, oc_state, suffix):
    state, root = oc_state
    _cli("convert", "--from", "open_clip", "--arch", "tiny", "--checkpoint", root / f"tiny.{suffix}", "--out", tmp_path / "m")
    _cli("export", "--model", tmp_path / "m", "--to", "open_clip", "--out", tmp_path / "back.safetensors")
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    fresh = open_clip.model.CLIP(**config_to_open_clip(get_config("tiny")))
    fresh.load_state_dict(back, strict=True)
    reloaded = fresh.state_dict()
    assert sorted(reloaded) == sorted(state)
    for k, v in state.items():
        assert reloaded[k].dtype == v.dtype and torch.equal(reloaded[k], v), k


def _hf_dir(model, path, fmt):
    model.save_pretrained(path)
    if fmt == "bin":  # transformers 5 always writes safetensors; write the legacy pickle like old checkpoints do
        (path / "model.safetensors").unlink()
        state = dict(model.state_dict())
        for tower, n in (("text_model", 16), ("vision_model", 17)):  # old checkpoints carry these buffers
            state[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
        torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_round_trip_is_bit_exact(tmp_path, fmt):
    model = _hf_model(seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    src = _hf_dir(model, tmp_path / "hf", fmt)
    _cli("convert", "--from", "hf", "--checkpoint", src, "--out", tmp_path / "m")
    _cli("export", "--model", tmp_path / "m", "--to", "hf", "--out", tmp_path / "back")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "back").state_dict()
    assert sorted(reloaded) == sorted(state)
    for k, v in state.items():
        assert torch.equal(reloaded[k], v), k


@pytest.mark.parametrize("overrides", [dict(hidden_act="gelu"), dict(eos_token_id=2), dict(eos_token_id=500)],
                         ids=["gelu", "eos2-argmax", "eos500-first-eos"])
def test_hf_configs_match_transformers(tmp_path, overrides):
    model = _hf_model(seed=2, **overrides)
    model.save_pretrained(tmp_path / "hf")
    ours, _, _ = mlx_clip.load(tmp_path / "hf")
    # Several eos ids (2, 500, 999) per row, not in order: argmax and first-eos pooling pick different positions.
    ids = torch.tensor([[998, 7, 500, 30, 500, 999, 2, 2], [998, 500, 997, 999, 999, 2, 500, 1]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_text = model.get_text_features(input_ids=ids).pooler_output.numpy()
        ref_image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    text = np.array(ours.encode_text(mx.array(ids.numpy())))
    image = np.array(ours.encode_image(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    for got, ref in ((text, ref_text), (image, ref_image)):
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5


# --- dtypes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,code,torch_dtype", [("bfloat16", "BF16", torch.bfloat16), ("float16", "F16", torch.float16)])
def test_low_precision_conversion(tmp_path, oc_state, dtype, code, torch_dtype):
    state, root = oc_state
    ckpt = root / "tiny.safetensors"
    _cli("convert", "--from", "open_clip", "--arch", "tiny", "--checkpoint", ckpt, "--out", tmp_path / "f32")
    _cli("convert", "--from", "open_clip", "--arch", "tiny", "--checkpoint", ckpt, "--out", tmp_path / "low", "--dtype", dtype)
    assert set(safetensors_dtypes(tmp_path / "low" / "model.safetensors").values()) == {code}
    full, low = mx.load(str(tmp_path / "f32" / "model.safetensors")), mx.load(str(tmp_path / "low" / "model.safetensors"))
    assert sorted(full) == sorted(low)
    for k in full:
        assert mx.array_equal(full[k].astype(low[k].dtype), low[k]).item(), k
    model, _, _ = mlx_clip.load(tmp_path / "low")
    params = dict(nn.utils.tree_flatten(model.parameters()))
    assert {p.dtype for p in params.values()} == {getattr(mx, dtype)}
    upcast, _, _ = mlx_clip.load(tmp_path / "low", dtype="float32")
    for k, p in nn.utils.tree_flatten(upcast.parameters()):
        assert p.dtype == mx.float32 and mx.array_equal(p, params[k].astype(mx.float32)).item(), k
    # Exported back to open_clip, the tensors are torch's own rounding of the originals.
    _cli("export", "--model", tmp_path / "low", "--to", "open_clip", "--out", tmp_path / "low.safetensors")
    back = safetensors.torch.load_file(tmp_path / "low.safetensors")
    for k, v in state.items():
        assert back[k].dtype == torch_dtype and torch.equal(back[k], v.to(torch_dtype)), k


# --- name tables for every architecture -----------------------------------------------------------------------------


def _shape_only(shape):
    # A zero-itemsize dtype: numpy reshapes, splits, transposes and copies it without allocating, so the name tables
    # can be run on ViT-H shapes for free.
    return np.zeros(shape, dtype=np.dtype([]))


def _shapes(tree) -> dict:
    return {k: tuple(v.shape) for k, v in tree.items()}


@pytest.mark.parametrize("name", list_configs())
def test_name_tables_map_open_clip_shapes_one_to_one(name):
    cfg = get_config(name)
    with torch.device("meta"):  # parameter shapes without memory
        theirs = _shapes(open_clip.model.CLIP(**config_to_open_clip(cfg)).state_dict())
    model = CLIP(cfg)  # MLX is lazy: unevaluated parameters allocate nothing
    ours = _shapes(dict(nn.utils.tree_flatten(model.parameters())))
    mapped = model.sanitize(from_open_clip({k: _shape_only(s) for k, s in theirs.items()}))
    assert _shapes(mapped) == ours
    assert _shapes(to_open_clip({k: _shape_only(s) for k, s in ours.items()}, cfg)) == theirs


_REGISTERED = [n for n in list_configs() if n in set(open_clip.list_models())]


def test_registry_overlap_is_substantial():
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14-336", "ViT-H-14-quickgelu", "ViT-M-16", "ViT-S-32"} <= set(_REGISTERED)


@pytest.mark.parametrize("name", _REGISTERED)
def test_named_config_equals_open_clip_registry(name):
    converted = config_from_open_clip(open_clip.get_model_config(name), name="other")
    assert dataclasses.replace(converted, name=name) == get_config(name)


# --- bad checkpoints --------------------------------------------------------------------------------------------------


def _edited(root, tmp_path, edit):
    state, _ = root
    state = dict(state)
    edit(state)
    path = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(state, path)
    return path


@pytest.mark.parametrize("edit,names", [
    (lambda s: s.pop("ln_final.weight"), ["missing", "text_model.final_layer_norm.weight"]),
    (lambda s: s.pop("visual.transformer.resblocks.1.attn.in_proj_weight"),
     ["missing", "vision_model.encoder.layers.1.self_attn.q_proj.weight", "layers.1.self_attn.v_proj.weight"]),
    (lambda s: s.update({"visual.transformer.resblocks.7.ln_1.bias": torch.zeros(64)}),
     ["unexpected", "vision_model.encoder.layers.7.layer_norm1.bias"]),
    (lambda s: s.update({"visual.extra_head.weight": torch.zeros(3)}), ["visual.extra_head.weight"]),
    (lambda s: s.update({"visual.ln_post.bias": torch.zeros(65)}), ["vision_model.post_layernorm.bias", "(65,)", "(64,)"]),
], ids=["missing", "missing-fused", "extra-layer", "extra-foreign", "wrong-shape"])
def test_bad_open_clip_checkpoint_is_reported_by_name(tmp_path, oc_state, edit, names):
    path = _edited(oc_state, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        convert_open_clip(path, "tiny", tmp_path / "out")
    for name in names:
        assert name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_for_another_arch_is_refused(tmp_path, oc_state):
    _, root = oc_state
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*text_model.embeddings.position_embedding.weight"):
        convert_open_clip(root / "tiny.pt", "small", tmp_path / "out")


def test_unknown_arch_lists_known_ones(tmp_path, oc_state):
    with pytest.raises(ConfigError) as err:
        convert_open_clip(oc_state[1] / "tiny.pt", "ViT-Q-99", tmp_path / "out")
    assert "ViT-Q-99" in str(err.value)
    for known in ("ViT-B-32", "ViT-L-14-336", "tiny", "small"):
        assert known in str(err.value)
