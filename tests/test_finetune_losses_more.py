"""`finetune` with the losses that need more than a batch: mined_negative (a negative bank), negclip (perturbed captions),
multiscale (several views), and a scheduled temperature. Each step's logged loss is recomputed independently (features
from a fresh uncompiled model with the parameters the step saw; the loss in torch_ref or numpy); the bank's refresh,
its k hardest entries and its resume are checked against numpy; bad options name their flag."""

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)

import json
import math
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

import mlx_clip.train.finetune as ft
from converters.convert import init_model
from mlx_clip.data.synth import synthesize
from mlx_clip.io import load
from mlx_clip.losses import perturb_captions
from mlx_clip.train import distributed as dist
from mlx_clip.train.args import TrainingArgs, resolve_args
from mlx_clip.train.checkpoint import checkpoint_dirs
from mlx_clip.train.loss_inputs import sample_ids
from torch_ref import losses as ref

BANK, K, BATCH = 24, 4, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flm")
    synthesize("industrial", root / "data", n=120, seed=0, image_size=32)
    init_model("tiny", 0, root / "tiny")
    # every third caption a single word, which no swap can change: negclip must mask its perturbation
    lines = (root / "data" / "train.csv").read_text().splitlines()
    rows = [line if i % 3 else ",".join([line.split(",")[0], "lesion", line.split(",")[-1]])
            for i, line in enumerate(lines[1:])]
    (root / "data" / "train_short.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    return root


def _args(setup, name, **kw):
    base = dict(model=str(setup / "tiny"), train_data=str(setup / "data" / "train.csv"), out=str(setup / name),
                steps=3, batch_size=BATCH, lr=1e-3, log_every=1, seed=1, workers=1, prefetch=1)
    return TrainingArgs(**(base | kw))


def _losses(setup, name) -> dict[int, float]:
    lines = (setup / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def run(setup, name, monkeypatch=None, **kw):
    """Fine-tune; with `monkeypatch`, also record per step the batch, the step's inputs and the parameters before it."""
    steps = []
    if monkeypatch is not None:
        real_prepare, real_train, seen = ft.prepare_model, ft.train, {}

        def prepare(args):
            out = real_prepare(args)
            seen["model"] = out[0]
            return out

        def train(step_fn, batches, start, *rest, **kwargs):
            def batches_seen():
                for batch in batches:
                    steps.append({"texts": list(batch["texts"]), "keys": list(batch["keys"]),
                                  "labels": np.array(batch["labels"])})
                    yield batch

            def step(images, ids, inputs):
                inputs = inputs if isinstance(inputs, dict) else {"labels": inputs}
                steps[-1].update(images=np.array(images), ids=tree_map(np.array, ids),  # rows, or packed rows
                                 inputs={k: np.array(v) for k, v in inputs.items()},
                                 params=tree_map(np.array, seen["model"].parameters()))
                return step_fn(images, ids, inputs if len(inputs) > 1 else inputs["labels"])

            return real_train(step, batches_seen(), start, *rest, **kwargs)

        monkeypatch.setattr(ft, "prepare_model", prepare)
        monkeypatch.setattr(ft, "train", train)
    ft.finetune(_args(setup, name, **kw), quiet=True)
    return _losses(setup, name), steps


def _features(setup, record, images=None, ids=None):
    """(image, text) features of the recorded step from a fresh, uncompiled model with the step's parameters."""
    model, _, _ = load(setup / "tiny")
    model.update(tree_map(mx.array, record["params"]))
    images = record["images"] if images is None else images
    img = model.encode_image(mx.array(images), normalize=True)
    txt = model.encode_text(tree_map(mx.array, record["ids"] if ids is None else ids), normalize=True)
    return np.array(img, dtype=np.float64), np.array(txt, dtype=np.float64), math.exp(model.logit_scale.item())


def _t(x):
    return torch.tensor(np.asarray(x, dtype=np.float64))


def _clip(img, txt, scale) -> float:
    return ref.clip_loss(_t(img), _t(txt), torch.tensor(scale, dtype=torch.float64)).item()


def _logsumexp(x, axis=1):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _mined_numpy(img, txt, scale, bank_image, bank_text, bank_ids, ids, k) -> float:
    """The mined-negative loss by hand: each row's k largest eligible bank logits (np.sort) join its candidates."""

    def direction(anchors, others, bank):
        logits = scale * anchors @ others.T
        bank_logits = scale * anchors @ bank.T
        eligible = (bank_ids[None, :] != ids[:, None]) & (bank_ids[None, :] != -1)
        hardest = [np.sort(row[ok])[::-1][:k] for row, ok in zip(bank_logits, eligible)]
        rows = [np.concatenate([logits[i], hardest[i]]) for i in range(len(anchors))]
        return np.mean([_logsumexp(r[None])[0] - r[i] for i, r in enumerate(rows)])

    return (direction(img, txt, bank_text) + direction(txt, img, bank_image)) / 2


# ---- mined_negative --------------------------------------------------------------------------------------------------


def test_mined_negative_steps_match_numpy_and_the_bank_holds_the_newest_features(setup, monkeypatch):
    losses, steps = run(setup, "mined", monkeypatch, loss="clip:0.5,mined_negative:1", bank_size=BANK, bank_k=K)
    history = []  # (features recomputed independently, sample ids), oldest first
    for step, record in enumerate(steps, 1):
        img, txt, scale = _features(setup, record)
        inputs = record["inputs"]
        bank_image, bank_text, bank_ids = inputs["bank_image"], inputs["bank_text"], inputs["bank_ids"]
        ids = sample_ids(record)
        np.testing.assert_array_equal(inputs["sample_ids"], ids)
        # the bank the step saw holds exactly the newest BANK rows pushed so far, each with its sample's id
        newest = [(i, t, d) for f_img, f_txt, f_ids in history for i, t, d in zip(f_img, f_txt, f_ids)][-BANK:]
        filled = np.flatnonzero(bank_ids != -1)
        assert len(filled) == len(newest) == min(BANK, BATCH * (step - 1))
        for row_img, row_txt, row_id in newest:
            dist_ = np.abs(bank_image[filled] - row_img).max(axis=1)
            slot = filled[np.argmin(dist_)]
            assert dist_.min() <= 1e-5 and bank_ids[slot] == row_id
            np.testing.assert_allclose(bank_text[slot], row_txt, atol=1e-5)
        want = 0.5 * _clip(img, txt, scale) + _mined_numpy(img, txt, scale, bank_image, bank_text, bank_ids, ids, K)
        assert losses[step] == pytest.approx(want, rel=1e-5)
        history.append((img, txt, ids))
    # by step 3 the bank is full and mining changes the loss: some eligible entries are not among the k hardest
    eligible = (steps[2]["inputs"]["bank_ids"][None, :] != sample_ids(steps[2])[:, None]).sum(axis=1)
    assert (eligible > K).all()
    img, txt, scale = _features(setup, steps[2])
    assert abs(losses[3] - 1.5 * _clip(img, txt, scale)) > 1e-3


def test_mined_negative_resume_equals_uninterrupted(setup):
    kw = dict(loss="mined_negative", bank_size=BANK, bank_k=K, steps=4, save_every=2, keep_last=5)
    whole, _ = run(setup, "mined_a", **kw)
    (setup / "mined_b" / "checkpoints").mkdir(parents=True)
    half = checkpoint_dirs(setup / "mined_a")[0]
    assert half.name == "step-00000002" and (half / "loss_state.safetensors").exists()
    shutil.copytree(half, setup / "mined_b" / "checkpoints" / half.name)
    resumed, _ = run(setup, "mined_b", resume="latest", **kw)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - whole[step]) <= 1e-6 * abs(whole[step])
    a = mx.load(str(setup / "mined_a" / "checkpoints" / "step-00000004" / "loss_state.safetensors"))
    b = mx.load(str(setup / "mined_b" / "checkpoints" / "step-00000004" / "loss_state.safetensors"))
    for key in a:
        np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), atol=1e-6)
    # a checkpoint without the bank cannot resume a mined run silently
    (half / "loss_state.safetensors").unlink()
    shutil.rmtree(setup / "mined_c", ignore_errors=True)
    shutil.copytree(half, setup / "mined_c" / "checkpoints" / half.name)
    with pytest.raises(ValueError, match="no negative bank"):
        run(setup, "mined_c", resume="latest", **kw)


def test_mined_negative_with_accumulation_trains_like_one_batch(setup):
    one, _ = run(setup, "mined_acc1", loss="mined_negative", bank_size=BANK, bank_k=K)
    two, _ = run(setup, "mined_acc2", loss="mined_negative", bank_size=BANK, bank_k=K, accum_freq=2)
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step])


def test_sample_ids_exclude_the_class_or_the_sample():
    batch = {"labels": np.array([3, -1, -1, 3]), "keys": ["a", "b", "c", "b"]}
    ids = sample_ids(batch)
    assert ids[0] == ids[3] == 3  # labelled: the class
    assert ids[1] != ids[2] and ids[1] < -1 and ids[2] < -1  # unlabelled: the sample, never the empty slot's -1
    assert sample_ids({"labels": np.array([-1]), "keys": ["b"]})[0] == ids[1]  # stable across steps


# ---- negclip ---------------------------------------------------------------------------------------------------------


def test_negclip_steps_match_torch_with_per_step_perturbations(setup, monkeypatch):
    losses, steps = run(setup, "negclip", monkeypatch, loss="negclip",
                        train_data=str(setup / "data" / "train_short.csv"))
    tokenizer = load(setup / "tiny")[1]
    for step, record in enumerate(steps, 1):
        perturbed = perturb_captions(record["texts"], random.Random(dist.step_seed(1, step)))
        full, got = tokenizer.tokenize_numpy(perturbed), record["inputs"]["neg_ids"]
        np.testing.assert_array_equal(got, full[:, : got.shape[1]])  # the step's rows: padding cut, every token kept
        assert not full[:, got.shape[1]:].any()
        valid = np.array([p != c for p, c in zip(perturbed, record["texts"])])
        np.testing.assert_array_equal(record["inputs"]["neg_valid"], valid)
        assert 0 < valid.sum() < BATCH  # the sentences get a swap, the single words cannot
        # The reference encodes full-length rows: the loss must not depend on the padding the step cut.
        img, txt, scale = _features(setup, record, ids=tokenizer.tokenize_numpy(record["texts"]))
        _, neg, _ = _features(setup, record, ids=full)
        want = ref.negclip_loss(_t(img), _t(txt), _t(neg[valid]), torch.tensor(scale, dtype=torch.float64)).item()
        assert losses[step] == pytest.approx(want, rel=1e-5)
    assert steps[0]["inputs"]["neg_ids"].tolist() != steps[1]["inputs"]["neg_ids"].tolist()


# ---- multiscale ------------------------------------------------------------------------------------------------------


def test_multiscale_steps_match_torch_and_trace_once(setup, monkeypatch):
    with pytest.MonkeyPatch.context() as mp:
        _, plain = run(setup, "ms_plain", mp, steps=1)  # a single-view run over the same data
    traces = []
    real_make = ft.make_loss_fn

    def counting_make(*a, **kw):
        loss_fn = real_make(*a, **kw)

        def counted(*args):
            traces.append(1)  # the Python body runs only when the compiled step traces
            return loss_fn(*args)

        counted.feature_loss = loss_fn.feature_loss
        return counted

    monkeypatch.setattr(ft, "make_loss_fn", counting_make)
    weights = [2.0, 1.0, 1.0]
    losses, steps = run(setup, "ms", monkeypatch, loss="multiscale", scales="1.0,0.3,0.3", view_weights="2,1,1",
                        steps=4)
    assert len(traces) == 1
    np.testing.assert_array_equal(steps[0]["images"][:, 0], plain[0]["images"])  # view 0 is the usual crop
    for step, record in enumerate(steps, 1):
        images = record["images"]
        assert images.shape[:2] == (BATCH, 3)
        views = [_features(setup, record, images=images[:, v])[0] for v in range(3)]
        _, txt, scale = _features(setup, record, images=images[:, 0])
        want = ref.multiscale_loss([_t(v) for v in views], _t(txt), torch.tensor(scale, dtype=torch.float64),
                                   weights=weights).item()
        assert losses[step] == pytest.approx(want, rel=1e-5)
    # the local views are smaller crops of the same images: different pixels
    assert not np.allclose(steps[0]["images"][:, 1], steps[0]["images"][:, 0])


# ---- scheduled temperature -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_scheduled_temperature_steps_match_torch(setup, monkeypatch, kind):
    start, end, total = 10.0, 50.0, 3
    losses, steps = run(setup, f"sched_{kind}", monkeypatch, temperature="scheduled",
                        temperature_schedule=f"{kind}:{start}:{end}", steps=total)
    base = load(setup / "tiny")[0].logit_scale.item()
    for step, record in enumerate(steps, 1):
        t = (step - 1) / total
        scale = end + (start - end) * (1 + math.cos(math.pi * t)) / 2 if kind == "cosine" else start + (end - start) * t
        img, txt, model_scale = _features(setup, record)
        assert math.log(model_scale) == pytest.approx(base, abs=1e-7)  # the parameter itself does not train
        assert losses[step] == pytest.approx(_clip(img, txt, scale), rel=1e-5)
    final = load(setup / f"sched_{kind}" / "final")[0]
    assert math.exp(final.logit_scale.item()) == pytest.approx(end, rel=1e-6)  # saved at the schedule's end


# ---- option errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, flag", [
    (dict(loss="mined_negative", bank_k=0), "--bank-k"),
    (dict(loss="mined_negative", bank_size=0), "--bank-size"),
    (dict(loss="mined_negative", bank_size=4, bank_k=8), "--bank-k"),
    (dict(loss="multiscale", scales="1.0,big"), "--scales"),
    (dict(loss="multiscale", scales="1.0,1.5"), "--scales"),
    (dict(loss="multiscale", scales="1.0,0.4", view_weights="1,1,1"), "--view-weights"),
    (dict(loss="multiscale", view_weights="0,0,0"), "--view-weights"),
    (dict(loss="multiscale", resolutions="32,48"), "--resolutions"),
    (dict(loss="negclip", accum_freq=2), "--accum-freq"),
    (dict(loss="negclip", batch_size=0), "--batch-size auto"),
    (dict(temperature="scheduled", temperature_schedule="cosine:10"), "--temperature-schedule"),
    (dict(temperature="scheduled", temperature_schedule="step:10:100"), "--temperature-schedule"),
    (dict(temperature="scheduled", temperature_schedule="10:1000"), "--temperature-schedule"),
    (dict(loss="negclip:x"), "--loss"),
])
def test_bad_options_name_their_flag(setup, options, flag):
    with pytest.raises(ValueError, match=flag):
        ft.finetune(_args(setup, "bad", **options), quiet=True)
    assert not (setup / "bad").exists()  # refused before any work
    with pytest.raises(ValueError, match=flag):  # the CLI / YAML path validates the same way
        resolve_args({"model": str(setup / "tiny"), **options})


def test_yaml_selects_the_new_losses(setup, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("loss: clip:1,mined_negative:0.5\nbank-size: 32\nbank_k: 2\ntemperature: scheduled\n"
                      "temperature-schedule: linear:20:60\nscales: '1.0,0.5'\n")
    args = resolve_args({"model": str(setup / "tiny")}, str(config))
    assert (args.loss, args.bank_size, args.bank_k, args.temperature) == ("clip:1,mined_negative:0.5", 32, 2, "scheduled")
    assert (args.temperature_schedule, args.scales) == ("linear:20:60", "1.0,0.5")
