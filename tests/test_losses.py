"""Losses: value and gradients against the torch reference (open_clip's ClipLoss / SigLipLoss, torch_ref otherwise),
edge cases, the bank, caption perturbation, temperature, the registry, and exact gradient accumulation."""

import math
import random
from functools import partial

import numpy as np
import pytest

from mlx_clip import losses as L  # first: preloads BLAS before mlx.core

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from torch_ref import losses as T  # noqa: E402

TOL = 1e-5
DIM = 16


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def unit(rng, n, d=DIM):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_case(name, rng, n, scale=1 / 0.07, duplicate=False):
    """(differentiable inputs, fixed inputs) for loss `name`, as numpy; gradients are checked for every diff input."""
    image, text = unit(rng, n), unit(rng, n)
    if duplicate and n > 1:
        text[1] = text[0]  # the same caption twice
    diff = {"image_features": image, "text_features": text, "logit_scale": np.float32(scale)}
    static = {}
    labels = rng.integers(0, max(n // 2, 1), n)
    if duplicate:
        labels[1] = labels[0]
    if name == "siglip":
        diff["logit_bias"] = np.float32(-3.0)
    elif name == "multi_positive":
        static["labels"] = labels
    elif name == "hard_negative":
        static.update(beta=2.0, tau_plus=0.1)
    elif name == "mined_negative":
        bank_ids = rng.integers(0, n + 6, 12)
        static.update(bank_text=unit(rng, 12), bank_image=unit(rng, 12), k=3, ids=np.arange(n), bank_ids=bank_ids)
    elif name == "negclip":
        diff["neg_text_features"] = unit(rng, n)
    elif name == "multiscale":
        diff["image_features_per_view"] = [image, unit(rng, n), unit(rng, n)]
        del diff["image_features"]
        static["weights"] = [1.0, 0.5, 0.25]
    return diff, static


def _to(framework, x):
    if isinstance(x, np.ndarray) or isinstance(x, np.floating):
        return mx.array(x) if framework == "mlx" else torch.tensor(np.asarray(x))
    return x


def compare_with_torch(name, diff, static, tol=TOL, ref_dtype=torch.float32):
    """MLX (float32) against the torch reference run in `ref_dtype` on the same inputs."""
    mx_static = {k: _to("mlx", v) for k, v in static.items()}
    value, grads = mx.value_and_grad(lambda a: L.LOSSES[name](**a, **mx_static))(tree_map(mx.array, diff))
    t_args = tree_map(lambda x: torch.tensor(np.asarray(x), dtype=ref_dtype, requires_grad=True), diff)
    if ref_dtype == torch.float64:
        static = {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v
                  for k, v in static.items()}
    t_value = getattr(T, f"{name}_loss")(**t_args, **{k: _to("torch", v) for k, v in static.items()})
    t_value.backward()
    assert rel_err(value, t_value.detach()) <= tol, (name, value.item(), t_value.item())
    for (key, g), (_, t) in zip(tree_flatten(grads), tree_flatten(t_args)):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, t.grad) <= tol, (name, key, rel_err(g, t.grad))


ALL = list(L.LOSSES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 8])
def test_value_and_grads_match_torch(name, n):
    diff, static = make_case(name, np.random.default_rng(n), n)
    compare_with_torch(name, diff, static)


@pytest.mark.parametrize("name", ALL)
def test_duplicate_captions_match_torch(name):
    diff, static = make_case(name, np.random.default_rng(7), 6, duplicate=True)
    compare_with_torch(name, diff, static)


@pytest.mark.parametrize("name", ALL)
def test_large_logit_scale_matches_torch(name):
    diff, static = make_case(name, np.random.default_rng(3), 8, scale=100.0)
    # HCL's reference is the paper's direct form: e^{s·sim} under/overflows float32 at s = 100, so it runs in float64
    compare_with_torch(name, diff, static, ref_dtype=torch.float64 if name == "hard_negative" else torch.float32)


@pytest.mark.parametrize("name", ALL)
def test_extreme_logit_scale_is_finite(name):
    diff, static = make_case(name, np.random.default_rng(4), 8, scale=1e4)
    mx_static = {k: _to("mlx", v) for k, v in static.items()}
    value, grads = mx.value_and_grad(lambda a: L.LOSSES[name](**a, **mx_static))(tree_map(mx.array, diff))
    assert math.isfinite(value.item())
    assert all(np.isfinite(np.asarray(g)).all() for _, g in tree_flatten(grads))
    clamped = mx.exp(L.clamp_logit_scale(math.log(1e4)))
    assert abs(clamped.item() - 100.0) < 1e-3


def test_siglip_at_paper_init_matches_open_clip():
    rng = np.random.default_rng(5)
    diff = {"image_features": unit(rng, 8), "text_features": unit(rng, 8),
            "logit_scale": np.float32(math.exp(L.SIGLIP_INIT_LOGIT_SCALE)),
            "logit_bias": np.float32(L.SIGLIP_INIT_LOGIT_BIAS)}
    compare_with_torch("siglip", diff, {})


def test_multi_positive_all_one_label_and_all_distinct():
    rng = np.random.default_rng(6)
    diff, _ = make_case("multi_positive", rng, 8)
    compare_with_torch("multi_positive", diff, {"labels": np.zeros(8, dtype=np.int64)})
    img, txt, s = (mx.array(diff[k]) for k in ("image_features", "text_features", "logit_scale"))
    distinct = L.multi_positive_loss(img, txt, s, np.arange(8))
    assert rel_err(distinct, L.clip_loss(img, txt, s)) <= TOL


def _hcl_clamped_rows(sims, scale, tau_plus, beta):
    """How many anchors (both directions) have their debiased negative estimate below the floor: the paper's
    formula in float64 numpy, independent of both implementations."""
    n, count = len(sims), 0
    for m in (sims, sims.T):
        for i in range(n):
            neg, w = np.exp(scale * np.delete(m[i], i)), np.exp(beta * np.delete(m[i], i))
            ng = ((n - 1) * (w * neg).sum() / w.sum() - tau_plus * (n - 1) * np.exp(scale * m[i, i])) / (1 - tau_plus)
            count += ng < (n - 1) * np.exp(-scale)
    return count


@pytest.mark.parametrize("noise, tau_plus, clamped", [(0.3, 0.9, "all"), (1.0, 0.1, "some")])
def test_hard_negative_debias_clamp_matches_torch(noise, tau_plus, clamped):
    """Aligned pairs and a large τ⁺ drive the debiased estimate below its floor: the clamp branch is exercised."""
    rng = np.random.default_rng(8)
    image = unit(rng, 8)
    text = image + noise * unit(rng, 8)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    count = _hcl_clamped_rows(image.astype(np.float64) @ text.T.astype(np.float64), 5.0, tau_plus, 1.0)
    assert count == 16 if clamped == "all" else 0 < count < 16
    diff = {"image_features": image, "text_features": text, "logit_scale": np.float32(5.0)}
    compare_with_torch("hard_negative", diff, {"beta": 1.0, "tau_plus": tau_plus})


def test_reductions_to_clip_loss():
    rng = np.random.default_rng(9)
    img, txt = mx.array(unit(rng, 8)), mx.array(unit(rng, 8))
    s = mx.array(20.0)
    ref = L.clip_loss(img, txt, s)
    assert rel_err(L.hard_negative_loss(img, txt, s, beta=0.0, tau_plus=0.0), ref) <= TOL
    assert rel_err(L.negclip_loss(img, txt, mx.zeros((0, DIM)), s), ref) <= TOL
    assert rel_err(L.mined_negative_loss(img, txt, s, mx.array(unit(rng, 5)), mx.array(unit(rng, 5)), 0), ref) <= TOL
    assert rel_err(L.multiscale_loss([img], txt, s), ref) <= TOL
    # every bank entry shares the samples' label: all are excluded, nothing is added
    same = np.zeros(8, dtype=np.int64)
    assert rel_err(L.mined_negative_loss(img, txt, s, txt, img, 4, ids=same, bank_ids=same), ref) <= TOL
    # more requested than eligible: the missing slots add nothing, the rest match torch
    diff, static = make_case("mined_negative", rng, 8)
    compare_with_torch("mined_negative", diff, {**static, "k": 12})


def test_negative_bank_fifo_and_stop_gradient():
    rng = np.random.default_rng(10)
    bank = L.NegativeBank(size=5, dim=DIM)
    inserted = []  # chronological (id, image row, text row)
    next_id = 0
    for n in (3, 3, 4, 7):
        img, txt = unit(rng, n), unit(rng, n)
        ids = np.arange(next_id, next_id + n)
        next_id += n
        bank.update(mx.array(img), mx.array(txt), ids)
        inserted += list(zip(ids, img, txt))
        newest = {int(i): (a, b) for i, a, b in inserted[-5:]}
        assert len(bank) == len(newest)
        got_ids = np.asarray(bank.ids).tolist()
        assert sorted(got_ids) == sorted(newest)
        for slot, i in enumerate(got_ids):
            np.testing.assert_array_equal(np.asarray(bank.image[slot]), newest[i][0])
            np.testing.assert_array_equal(np.asarray(bank.text[slot]), newest[i][1])
    img, txt = mx.array(unit(rng, 4)), mx.array(unit(rng, 4))
    grad = mx.grad(lambda b: L.mined_negative_loss(img, txt, mx.array(10.0), b, b, 2))(bank.text)
    assert not np.asarray(grad).any()


# ------------------------------------------------------------------------------------------------ perturb_captions


CAPTIONS = ["a red car and a blue house", "a dog chasing a cat", "A small, round lesion near the left lobe.",
            "scan of lung tissue", "benign", "lesion lesion", "the the", "large mass"]


def test_perturb_captions_deterministic_and_a_permutation():
    out = L.perturb_captions(CAPTIONS, random.Random(0))
    assert out == L.perturb_captions(CAPTIONS, 0)
    assert [L.perturb_captions(CAPTIONS, s) for s in range(5)] == [L.perturb_captions(CAPTIONS, s) for s in range(5)]
    for before, after in zip(CAPTIONS, out):
        assert sorted(before.split()) == sorted(after.split()) or sorted(before) == sorted(after)
        if len(set(before.lower().replace(",", " ").replace(".", " ").split())) >= 2:
            assert after != before
        else:
            assert after == before


def test_perturb_captions_rules():
    seen = {L.perturb_captions(["a red car and a blue house"], s)[0] for s in range(30)}
    assert seen == {"a blue car and a red house", "a red house and a blue car"}  # attribute swap, object swap
    seen = {L.perturb_captions(["A small, round lesion."], s)[0] for s in range(30)}
    assert seen == {"A round, small lesion."}  # punctuation stays in place
    assert L.perturb_captions(["a dog chasing a cat"], 1) == ["a cat chasing a dog"]


# ------------------------------------------------------------------------------------------------ temperature


def test_temperature():
    assert L.clamp_logit_scale(-1.0).item() == 0.0
    assert abs(L.clamp_logit_scale(2.0).item() - 2.0) < 1e-7
    assert abs(L.clamp_logit_scale(math.log(1e4), max_scale=50).item() - math.log(50)) < 1e-6
    for kind in ("linear", "cosine", "exp"):
        values = [L.temperature_schedule(kind, s, 10, 10.0, 100.0) for s in range(12)]
        assert values[0] == pytest.approx(10.0) and values[10] == pytest.approx(100.0) and values[11] == values[10]
        assert all(a <= b for a, b in zip(values, values[1:]))
    assert L.temperature_schedule("linear", 5, 10, 10.0, 100.0) == pytest.approx(55.0)
    assert L.temperature_schedule("cosine", 5, 10, 10.0, 100.0) == pytest.approx(55.0)
    assert L.temperature_schedule("exp", 5, 10, 10.0, 100.0) == pytest.approx(math.sqrt(1000.0))
    assert L.temperature_schedule("fixed", 7, 10, 30.0, 100.0) == 30.0
    with pytest.raises(ValueError, match="unknown temperature"):
        L.temperature_schedule("warm", 0, 10, 1.0, 2.0)
    log_s = mx.array(math.log(20.0))
    assert mx.grad(lambda p: L.logit_scale_for_step("learnable", p))(log_s).item() == pytest.approx(20.0, rel=1e-6)
    assert mx.grad(lambda p: L.logit_scale_for_step("fixed", p, start=30.0))(log_s).item() == 0.0


# ------------------------------------------------------------------------------------------------ registry


def test_parse_loss_spec():
    assert L.parse_loss_spec("clip:1,siglip:0.5") == [("clip", 1.0), ("siglip", 0.5)]
    assert L.parse_loss_spec(" clip , multi_positive:2 ") == [("clip", 1.0), ("multi_positive", 2.0)]
    for bad, match in [("clap", "unknown loss 'clap'"), ("clip:x", "not a number"), ("clip:-1", "> 0"),
                       ("clip:nan", "> 0"), ("", "empty"), ("clip,clip:2", "twice")]:
        with pytest.raises(ValueError, match=match):
            L.parse_loss_spec(bad)


def test_combined_loss_is_the_weighted_sum():
    rng = np.random.default_rng(11)
    img, txt, neg = (mx.array(unit(rng, 6)) for _ in range(3))
    s, b, labels = mx.array(12.0), mx.array(-2.0), np.array([0, 1, 1, 2, 3, 3])
    feats = dict(image_features=img, text_features=txt, logit_scale=s, logit_bias=b, labels=labels,
                 neg_text_features=neg, beta=0.5)
    got = L.combined_loss("clip:1,siglip:0.5,multi_positive:2,negclip:0.25,hard_negative", **feats)
    want = (L.clip_loss(img, txt, s) + 0.5 * L.siglip_loss(img, txt, s, b)
            + 2 * L.multi_positive_loss(img, txt, s, labels)
            + 0.25 * L.negclip_loss(img, txt, neg, s) + L.hard_negative_loss(img, txt, s, beta=0.5))
    assert rel_err(got, want) <= TOL
    assert set(L.loss_terms("clip,siglip:2", **feats)) == {"clip", "siglip"}
    with pytest.raises(ValueError, match="'siglip' needs logit_bias"):
        L.combined_loss("siglip", image_features=img, text_features=txt, logit_scale=s)


# ------------------------------------------------------------------------------------------------ accumulation


class TinyCLIP(nn.Module):
    def __init__(self, with_bias: bool):
        super().__init__()
        self.image_in, self.image_out = nn.Linear(12, 24), nn.Linear(24, 8)
        self.text_proj = nn.Linear(10, 8)
        self.logit_scale = mx.array(math.log(1 / 0.07))
        if with_bias:
            self.logit_bias = mx.array(-4.0)

    def encode_image(self, x):
        return self.image_out(nn.gelu(self.image_in(x)))

    def encode_text(self, ids):
        return self.text_proj(ids)


LABELS = np.array([0, 1, 1, 2, 0, 3, 4, 4, 5])
ACCUM_LOSSES = {
    "clip": (L.clip_loss, False),
    "siglip": (L.siglip_loss, True),
    "multi_positive": (partial(L.multi_positive_loss, labels=LABELS), False),
    "hard_negative": (partial(L.hard_negative_loss, beta=1.0, tau_plus=0.1), False),
}


@pytest.mark.parametrize("name", list(ACCUM_LOSSES))
@pytest.mark.parametrize("micro_batches", [2, 4, 9])
def test_accumulated_grad_equals_full_batch(name, micro_batches):
    loss_fn, with_bias = ACCUM_LOSSES[name]
    mx.random.seed(12)
    model = TinyCLIP(with_bias)
    images, texts = mx.random.normal((9, 12)), mx.random.normal((9, 10))
    full = nn.value_and_grad(model, lambda x, t: L.model_loss(model, loss_fn, x, t))
    want_loss, want = full(images, texts)
    got_loss, got = L.accumulated_value_and_grad(model, loss_fn, images, texts, micro_batches)
    assert rel_err(got_loss, want_loss) <= TOL
    flat_got, flat_want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert flat_got.keys() == flat_want.keys() and "logit_scale" in flat_got
    for key in flat_want:
        assert rel_err(flat_got[key], flat_want[key]) <= TOL, key
    all_got = np.concatenate([np.asarray(v).ravel() for v in flat_got.values()])
    all_want = np.concatenate([np.asarray(flat_want[k]).ravel() for k in flat_got])
    assert rel_err(all_got, all_want) <= TOL


def test_accumulation_rejects_bad_micro_batches():
    model = TinyCLIP(False)
    with pytest.raises(ValueError, match="micro_batches"):
        L.accumulated_value_and_grad(model, L.clip_loss, mx.zeros((4, 12)), mx.zeros((4, 10)), 5)


@pytest.mark.parametrize("name", ALL)
def test_compiled_equals_eager(name):
    """The training step is mx.compile'd: every loss must trace (no host round-trips) and give the same numbers."""
    diff, static = make_case(name, np.random.default_rng(13), 6)
    mx_static = {k: _to("mlx", v) for k, v in static.items()}
    step = mx.value_and_grad(lambda a: L.LOSSES[name](**a, **mx_static))
    args = tree_map(mx.array, diff)
    (v1, g1), (v2, g2) = step(args), mx.compile(step)(args)
    assert rel_err(v2, v1) <= TOL
    for (_, a), (_, b) in zip(tree_flatten(g2), tree_flatten(g1)):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("base", ["siglip", "multi_positive"])
def test_multiscale_other_bases_match_torch(base):
    diff, static = make_case("multiscale", np.random.default_rng(14), 6)
    static["base"] = base
    if base == "siglip":
        diff["logit_bias"] = np.float32(-2.0)
    else:
        static["labels"] = np.array([0, 1, 1, 2, 0, 3])
    compare_with_torch("multiscale", diff, static)
    with pytest.raises(ValueError, match="2 weights for 3 views"):
        L.multiscale_loss([mx.array(v) for v in diff["image_features_per_view"]], mx.array(diff["text_features"]),
                          mx.array(10.0), weights=[1.0, 2.0])
