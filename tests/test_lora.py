"""LoRA (wrap, train, save/load, fuse) and WiSE-FT merging on the `tiny` config, checked against numpy."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_clip.cli import main  # first: preloads BLAS before mlx.core
from mlx_clip.config import ConfigError, get_config
from mlx_clip.io import load, save
from mlx_clip.model import CLIP, init_weights
from mlx_clip.train.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, apply_lora, fuse_lora, load_adapters, load_with_adapters,
    lora_parameters, save_adapters,
)
from mlx_clip.train.merge import interpolate, merge_models

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from converters.convert import init_model  # noqa: E402
from converters.safety import CheckpointError  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def tiny(seed=0) -> CLIP:
    return init_weights(CLIP(get_config("tiny")), seed)


def batch(seed=0, n=4):
    rng = np.random.default_rng(seed)
    images = mx.array(rng.standard_normal((n, 32, 32, 3)).astype(np.float32))
    ids = mx.array(rng.integers(0, 49408, (n, 77)).astype(np.int32))
    return images, ids


def embeddings(model, images, ids):
    out = (model.encode_image(images), model.encode_text(ids))
    mx.eval(out)
    return [np.array(x) for x in out]


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def contrastive_loss(model, images, ids):
    logits, _ = model(images, ids)
    labels = mx.arange(logits.shape[0])
    return (nn.losses.cross_entropy(logits, labels).mean() + nn.losses.cross_entropy(logits.T, labels).mean()) / 2


def train_few_steps(model, steps=3, seed=0):
    opt = optim.Adam(learning_rate=1e-2)
    grad_fn = nn.value_and_grad(model, contrastive_loss)
    for step in range(steps):
        _, grads = grad_fn(model, *batch(seed + step))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, trained LoRA model, its config, adapter dir)."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = init_model("tiny", 0, root / "base")
    mx.random.seed(0)
    cfg = LoRAConfig(rank=4, alpha=8.0)
    model = train_few_steps(apply_lora(load(base_dir)[0], cfg))
    return base_dir, model, cfg, save_adapters(model, cfg, root / "adapters")


def test_lora_linear_matches_numpy():
    mx.random.seed(1)
    lin = LoRALinear(nn.Linear(6, 5), rank=3, alpha=6.0)
    lin.lora_b = mx.random.normal((5, 3))
    x = mx.random.normal((2, 4, 6))
    w, b, a, bb = (np.array(v, dtype=np.float64) for v in (lin.linear.weight, lin.linear.bias, lin.lora_a, lin.lora_b))
    expected = np.array(x, dtype=np.float64) @ (w + 2.0 * bb @ a).T + b
    assert rel_err(lin(x), expected) < 1e-6
    assert rel_err(lin.fused().weight, w + 2.0 * bb @ a) < 1e-6


def test_fresh_lora_equals_base_exactly():
    model, (images, ids) = tiny(), batch()
    before = embeddings(model, images, ids)
    after = embeddings(apply_lora(model, LoRAConfig()), images, ids)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("cfg", [LoRAConfig(rank=8), LoRAConfig(rank=2, targets=("q_proj", "fc2"), towers=("text",)),
                                 LoRAConfig(rank=4, last_n_layers=1)])
def test_only_lora_params_trainable(cfg):
    model = apply_lora(tiny(), cfg)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    shapes = {"q_proj": "dd", "k_proj": "dd", "v_proj": "dd", "out_proj": "dd", "fc1": "di", "fc2": "id"}
    expected = 0
    for tower in cfg.towers:
        c = get_config("tiny").vision_config if tower == "vision" else get_config("tiny").text_config
        dims = {"d": c.hidden_size, "i": c.intermediate_size}
        layers = c.num_hidden_layers if cfg.last_n_layers is None else min(cfg.last_n_layers, c.num_hidden_layers)
        expected += layers * sum(cfg.rank * (dims[shapes[t][0]] + dims[shapes[t][1]]) for t in cfg.targets)
    assert sum(v.size for v in trainable.values()) == expected
    assert set(trainable) == set(lora_parameters(model))


def test_training_moves_only_adapters(trained):
    base_dir, model, _, _ = trained
    base = params(load(base_dir)[0])
    for k, v in params(model).items():
        if k.endswith(".lora_b"):
            assert np.abs(v).max() > 0, k
        elif not k.endswith(".lora_a"):
            np.testing.assert_array_equal(v, base[k.replace(".linear.", ".")], err_msg=k)


def test_adapters_roundtrip(trained):
    base_dir, model, cfg, adapter_dir = trained
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    assert LoRAConfig.from_dict(json.loads((adapter_dir / ADAPTER_CONFIG).read_text())) == cfg
    stored = mx.load(str(adapter_dir / ADAPTER_WEIGHTS))
    assert set(stored) == set(lora_parameters(model))
    assert (adapter_dir / ADAPTER_WEIGHTS).stat().st_size * 20 < (base_dir / "model.safetensors").stat().st_size
    images, ids = batch(9)
    reloaded = load_adapters(load(base_dir)[0], adapter_dir)
    for x, y in zip(embeddings(model, images, ids), embeddings(reloaded, images, ids)):
        np.testing.assert_array_equal(x, y)
    model2 = load_with_adapters(base_dir, adapter_dir)[0]
    np.testing.assert_array_equal(embeddings(model2, images, ids)[1], embeddings(model, images, ids)[1])


def test_load_adapters_strict(trained, tmp_path):
    base_dir, model, cfg, adapter_dir = trained
    bad = dict(mx.load(str(adapter_dir / ADAPTER_WEIGHTS)))
    gone = "text_model.encoder.layers.1.mlp.fc2.lora_b"
    bad.pop(gone)
    bad["text_model.encoder.layers.1.mlp.fc3.lora_a"] = mx.zeros((4, 4))
    (tmp_path / ADAPTER_CONFIG).write_text((adapter_dir / ADAPTER_CONFIG).read_text())
    mx.save_safetensors(str(tmp_path / ADAPTER_WEIGHTS), bad)
    with pytest.raises(CheckpointError, match=f"missing keys: {gone}.*unexpected keys: .*fc3.lora_a"):
        load_adapters(load(base_dir)[0], tmp_path)
    other = init_weights(CLIP(get_config("small")), 0)  # other widths: shapes cannot fit
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_adapters(other, adapter_dir)


def test_fuse_gives_plain_dir(trained, tmp_path):
    base_dir, model, _, adapter_dir = trained
    images, ids = batch(5)
    want = embeddings(model, images, ids)
    fused = fuse_lora(load_with_adapters(base_dir, adapter_dir)[0])
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    save(fused, None, tmp_path / "fused")
    plain = load(tmp_path / "fused")[0]
    assert set(params(plain)) == set(params(load(base_dir)[0]))
    for x, y in zip(embeddings(plain, images, ids), want):
        assert rel_err(x, y) < 1e-5


def test_dropout_only_in_training():
    model, (images, ids) = apply_lora(tiny(), LoRAConfig(dropout=0.5)), batch()
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.ones_like(m.lora_b) * 0.1
    model.eval()
    a, b = embeddings(model, images, ids)[0], embeddings(model, images, ids)[0]
    np.testing.assert_array_equal(a, b)
    model.train()
    assert not np.array_equal(embeddings(model, images, ids)[0], a)


def test_bad_configs_refused():
    with pytest.raises(ConfigError, match="unknown qkv"):
        LoRAConfig(targets=("qkv",))
    with pytest.raises(ConfigError, match="towers"):
        LoRAConfig(towers=("audio",))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(tiny(), LoRAConfig()), LoRAConfig())


# ---- WiSE-FT ----

@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return init_model("tiny", 0, root / "a"), init_model("tiny", 1, root / "b")


def test_interpolate_endpoints_and_mean():
    rng = np.random.default_rng(0)
    base = {"w": mx.array(np.array([-0.0, 1.5, np.inf], np.float32)), "i": mx.array([1, 2])}
    ft = {"w": mx.array(rng.standard_normal(3).astype(np.float32)), "i": mx.array([3, 4])}
    for alpha, want in ((0.0, base), (1.0, ft)):
        out = interpolate(base, ft, alpha)
        for k in want:  # bit-equal, sign of zero included
            assert np.array(out[k]).tobytes() == np.array(want[k]).tobytes()
    with pytest.raises(ValueError, match="alpha"):
        interpolate(base, ft, 1.5)
    with pytest.raises(ValueError, match="only in finetuned: extra"):
        interpolate(base, {**ft, "extra": ft["w"]}, 0.5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.3, 1.0])
def test_merge_models(two_dirs, tmp_path, alpha):
    a, b = two_dirs
    out = merge_models(a, b, alpha, tmp_path / "m")
    got, pa, pb = params(load(out)[0]), params(load(a)[0]), params(load(b)[0])
    assert set(got) == set(pa)
    for k, v in got.items():
        if alpha in (0.0, 1.0):
            np.testing.assert_array_equal(v, (pa if alpha == 0 else pb)[k], err_msg=k)
        elif alpha == 0.5:
            np.testing.assert_allclose(v, np.mean([pa[k], pb[k]], axis=0), rtol=1e-7, atol=1e-8, err_msg=k)
        else:
            np.testing.assert_allclose(v, (1 - alpha) * pa[k].astype(np.float64) + alpha * pb[k], rtol=1e-6, atol=1e-7)


def test_merge_refuses_other_architecture(two_dirs, tmp_path):
    other = init_model("tiny-quickgelu", 0, tmp_path / "q")
    with pytest.raises(ConfigError, match="hidden_act: base 'gelu' vs finetuned 'quick_gelu'"):
        merge_models(two_dirs[0], other, 0.5, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---- CLI ----

def test_cli_fuse_and_merge(trained, two_dirs, tmp_path):
    base_dir, model, _, adapter_dir = trained
    runner = CliRunner()
    result = runner.invoke(main, ["fuse", "--model", str(base_dir), "--adapters", str(adapter_dir),
                                  "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    images, ids = batch(3)
    for x, y in zip(embeddings(load(tmp_path / "fused")[0], images, ids), embeddings(model, images, ids)):
        assert rel_err(x, y) < 1e-5
    a, b = two_dirs
    result = runner.invoke(main, ["merge", "--base", str(a), "--finetuned", str(b), "--alpha", "1",
                                  "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged, pb = params(load(tmp_path / "m")[0]), params(load(b)[0])
    for k, v in merged.items():
        np.testing.assert_array_equal(v, pb[k], err_msg=k)
    result = runner.invoke(main, ["merge", "--base", str(a), "--finetuned", str(b), "--alpha", "1.5",
                                  "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "--alpha" in result.output
    assert not (tmp_path / "bad").exists()
