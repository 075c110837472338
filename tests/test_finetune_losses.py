"""The loss framework inside `finetune`: --loss specs, SigLIP's bias, fixed temperature, GradCache accumulation."""

import mlx_clip  # noqa: F401

import json

import pytest

from converters.convert import init_model
from mlx_clip.data.synth import synthesize
from mlx_clip.io import load
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.finetune import finetune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fl")
    synthesize("industrial", root / "data", n=120, seed=0, image_size=32)
    init_model("tiny", 0, root / "tiny")
    return root


def run(setup, name, **kw):
    args = TrainingArgs(model=str(setup / "tiny"), train_data=str(setup / "data" / "train.csv"), out=str(setup / name),
                        steps=3, batch_size=16, lr=1e-3, log_every=1, seed=1, **kw)
    finetune(args, quiet=True)
    return [r["loss"] for r in map(json.loads, (setup / name / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_accumulated_batches_train_like_one_batch(setup):
    one, four = run(setup, "acc1"), run(setup, "acc4", accum_freq=4)
    assert len(one) == len(four) == 3
    for a, b in zip(one, four):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_siglip_adds_a_saved_learnable_bias(setup):
    losses = run(setup, "siglip", loss="clip:1,siglip:0.5")
    assert all(x == x for x in losses)  # finite
    model, _, _ = load(setup / "siglip" / "final")
    assert model.config.logit_bias_init_value == -10.0
    assert model.logit_bias.item() != -10.0  # it trained


def test_fixed_temperature_keeps_logit_scale(setup):
    run(setup, "fixed", temperature="fixed")
    trained, _, _ = load(setup / "fixed" / "final")
    base, _, _ = load(setup / "tiny")
    assert trained.logit_scale.item() == base.logit_scale.item()


def test_hard_negative_beta_changes_the_loss(setup):
    plain, hard = run(setup, "hn0", loss="hard_negative", hn_beta=0.0), run(setup, "hn4", loss="hard_negative", hn_beta=4.0)
    clip = run(setup, "clip")
    assert plain[0] == pytest.approx(clip[0], rel=1e-5)  # beta 0 is InfoNCE
    assert hard[0] != pytest.approx(clip[0], rel=1e-3)
