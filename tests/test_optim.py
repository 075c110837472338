"""The optimizer side of finetune: GroupedAdamW against torch.optim.AdamW, weight-decay groups, layer-wise LR decay,
the LR schedule against open_clip's, and tower freezing (LiT / unlock-last)."""

import math
from types import SimpleNamespace

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from open_clip_train.scheduler import const_lr, cosine_lr

from converters.convert import init_model
from mlx_clip import cpu_streams
from mlx_clip.io import load
from mlx_clip.train.optim import GroupedAdamW, freeze_towers, lr_schedule, param_hparams


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 0, tmp_path_factory.mktemp("model") / "tiny")

@pytest.fixture(params=["one-kernel", "in-place"])
def update_path(request, monkeypatch):
    """Both ways a parameter's update is built: one kernel writing p, m and v (small parameters) or single-output
    kernels that write over their inputs (large ones); optim.FUSED_UPDATE_MAX picks."""
    from mlx_clip.train import optim as optim_mod

    monkeypatch.setattr(optim_mod, "FUSED_UPDATE_MAX", 10**12 if request.param == "one-kernel" else 0)
    return request.param


@pytest.mark.parametrize("lr_scale,wd,scheduled", [(1.0, 0.1, False), (0.25, 0.05, False), (1.0, 0.0, True)])
def test_grouped_adamw_matches_torch_adamw(lr_scale, wd, scheduled, update_path):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 5)).astype(np.float32)
    grads = rng.standard_normal((8, 6, 5)).astype(np.float32)
    grads[:, 0] *= 1e-6  # tiny gradients: eps placement matters
    lr, betas, eps = 1e-2, (0.9, 0.98), 1e-6
    schedule = lr_schedule(lr, 8, warmup=3) if scheduled else lr
    opt = GroupedAdamW(schedule, {"w": (lr_scale, wd)}, betas=betas, eps=eps)
    params = {"w": mx.array(w0)}
    opt.init(params)
    p = torch.nn.Parameter(torch.tensor(w0))
    ref = torch.optim.AdamW([p], lr=lr * lr_scale, betas=betas, eps=eps, weight_decay=wd)
    adjust = cosine_lr(ref, lr * lr_scale, 3, 8)
    for i, g in enumerate(grads):
        if scheduled:
            adjust(i)
        params = opt.apply_gradients({"w": mx.array(g)}, params)
        p.grad = torch.tensor(g)
        ref.step()
        np.testing.assert_allclose(np.array(params["w"]), p.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=f"step {i}")


@pytest.mark.parametrize("device", ["cpu", "gpu", "gpu-fold"])
def test_guarded_update_clips_and_skips_like_torch(device, monkeypatch, update_path):
    """The training step's update: gradients times a clip factor, and a step flagged non-finite (its gradients hold
    nan and inf) leaves weights and moments as they were; vs torch AdamW on the clipped gradients, skipping that step.
    The guard zeroes a bad step's gradient elementwise on the CPU and by the flag on a GPU, where the clip factor may go
    into the moments' coefficients instead of the gradient (optim.FOLD_CLIP_GPU): every way runs here."""
    from mlx_clip.train import optim as optim_mod

    if device != "cpu":  # the GPU branch of the guard, traced and run on the CPU
        monkeypatch.setattr(optim_mod, "on_cpu", lambda: False)
        monkeypatch.setattr(optim_mod, "FOLD_CLIP_GPU", device == "gpu-fold")
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((6, 5)).astype(np.float32)
    grads = rng.standard_normal((5, 6, 5)).astype(np.float32)
    grads[2, 1, 1], grads[2, 3, 0] = np.nan, np.inf
    good, clip = [True, True, False, True, True], 0.3
    opt = GroupedAdamW(1e-2, {"weight": (1.0, 0.1)}, betas=(0.9, 0.98), eps=1e-6)
    model = nn.Linear(5, 6, bias=False)
    model.update({"weight": mx.array(w0)})
    opt.init(model.trainable_parameters())
    p = torch.nn.Parameter(torch.tensor(w0))
    ref = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    for i, (g, ok) in enumerate(zip(grads, good)):
        # a bad step's clip factor is nan too (its norm is), and must not reach the moments either
        opt.guarded_update(model, {"weight": mx.array(g)}, mx.array(clip if ok else np.nan), mx.array(ok))
        mx.eval(model.parameters(), opt.state)
        if ok:
            p.grad = torch.tensor(g * clip)
            ref.step()
        np.testing.assert_allclose(np.array(model.weight), p.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=f"{i}")
        state = ref.state[p]
        np.testing.assert_allclose(np.array(opt.state["weight"]["m"]), state["exp_avg"].numpy(), rtol=1e-6, atol=1e-7)
        assert int(opt.state["step"]) == int(state["step"])


class _TwoWeights(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.a = nn.Linear(shape[1], shape[0], bias=False)
        self.b = nn.Linear(shape[1], shape[0], bias=False)


def _compiled_update(shape, names=("a.weight", "b.weight")):
    """A compiled guarded AdamW update of two (rows, cols) weights, as the training step runs it (model and optimizer
    state in and out of the compiled function)."""
    from functools import partial

    model = _TwoWeights(shape)
    rng = np.random.default_rng(7)
    model.update({k: {"weight": mx.array(rng.standard_normal(shape).astype(np.float32))} for k in "ab"})
    opt = GroupedAdamW(1e-2, {names[0]: (1.0, 0.1), names[1]: (0.5, 0.0)}, betas=(0.9, 0.98), eps=1e-6)
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(ga, gb, scale, ok):
        opt.guarded_update(model, {"a": {"weight": ga}, "b": {"weight": gb}}, scale, ok)

    mx.eval(state)
    return model, opt, state, update


# The CPU's streams and kernel split; off the CPU the update takes the GPU branch (the clip factor folded into the
# moments' coefficients, whose scalar (1 - b2)·s² is a small kernel of its own), whose graph test_step_census counts.
# First run on a card in session 28 (H200), where that scalar's kernel, "CompiledSubtractSquareMultiply", failed it
@pytest.mark.skipif(not cpu_streams.on_cpu(), reason="the CPU's two streams and kernel split (GPU: the fold's branch)")
def test_small_parameter_update_is_one_kernel_on_two_streams_with_the_same_numbers(monkeypatch):
    """Two equal-shaped small weights updated on the two CPU streams inside one compiled update: each is one fused
    kernel (p, m and v its outputs), and the numbers equal the same update run eagerly on one stream."""
    import re

    from mlx_clip.train import optim as optim_mod

    monkeypatch.setattr(optim_mod, "FUSED_UPDATE_MAX", 10**12)
    rng = np.random.default_rng(2)
    grads = [[mx.array(rng.standard_normal((16, 12)).astype(np.float32)) for _ in "ab"] for _ in range(3)]
    results = []
    for compiled in (True, False):
        with cpu_streams.batch_parallel_mode(compiled):
            model, opt, state, update = _compiled_update((16, 12))
            run = update if compiled else (lambda ga, gb, s, ok: opt.guarded_update(  # noqa: E731
                model, {"a": {"weight": ga}, "b": {"weight": gb}}, s, ok))
            for ga, gb in grads:
                run(ga, gb, mx.array(0.5), mx.array(True))
                if compiled:  # the graph of the last update, before it runs
                    mx.export_to_dot(str(_dot_path()), model.a.weight, model.b.weight,
                                     opt.state["a"]["weight"]["m"], opt.state["b"]["weight"]["v"])
                mx.eval(state)
            results.append((np.array(model.a.weight), np.array(model.b.weight)))
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    labels = re.findall(r'label ?= ?"([^"]*)"', _dot_path().read_text())
    updates = [label for label in labels if label.startswith("Compiled") and "Sqrt" in label]
    assert len(updates) == 2  # one kernel per weight, making its p, m and v
    assert not [label for label in labels if label.startswith("Compiled") and "Sqrt" not in label
                and "Square" in label], "the moment updates were cut out of the parameter's kernel"


def _dot_path():
    import pathlib
    import tempfile

    return pathlib.Path(tempfile.gettempdir()) / "mlxclip-test-update.dot"


@pytest.mark.skipif(not cpu_streams.on_cpu(), reason="the in-place update is the CPU's (GPU: one kernel)")
def test_large_parameter_update_writes_over_its_inputs():
    """A large weight's update allocates no second copy of the weight or its moments: its kernels write over the
    gradient, the old weight and the old moments (MLX donates no input to a kernel of several outputs, so the
    one-kernel form would allocate all three anew: optim.FUSED_UPDATE_MAX)."""
    from mlx_clip.train import optim as optim_mod

    shape = (1024, 1024)
    assert shape[0] * shape[1] > optim_mod.FUSED_UPDATE_MAX
    model, opt, state, update = _compiled_update(shape)
    for i in range(3):
        ga, gb = (mx.random.normal(shape, key=mx.random.key(2 * i + j)) for j in range(2))
        mx.eval(ga, gb)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        update(ga, gb, mx.array(0.5), mx.array(True))
        del ga, gb
        mx.eval(state)
        extra = mx.get_peak_memory() - base
    assert extra < 4 * shape[0] * shape[1] // 2, f"{extra} bytes beyond the inputs"  # less than half a weight


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    """One bf16 unit in the last place at |x| (8 significant bits)."""
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126))) - 7)


@pytest.mark.parametrize("branch", ["cpu", "gpu"])
def test_bf16_weights_keep_a_bf16_first_moment_each_update_computed_in_fp32(monkeypatch, branch):
    """Under the "bfloat16" policy AdamW keeps m in bf16 and v in fp32 from the start, step after step (until session
    28 both began bf16 and the fp32 coefficients made them fp32 at the first update), and each step is the float64
    AdamW of the stored values, each result rounded once to its dtype: m within one bf16 ulp, v to fp32 rounding, and
    the weight (from the moments as stored) within one bf16 ulp. Both branches: the CPU's and the GPU's (the clip
    factor folded into the moments' coefficients)."""
    from mlx_clip.train import optim as optim_mod

    if branch == "gpu":
        monkeypatch.setattr(cpu_streams, "on_cpu", lambda: False)
        monkeypatch.setattr(optim_mod, "on_cpu", lambda: False)
    shape, lr, (b1, b2), eps, gscale = (24, 40), 1e-2, (0.9, 0.98), 1e-6, 0.5
    hparams = {"a.weight": (1.0, 0.1), "b.weight": (0.5, 0.0)}
    rng = np.random.default_rng(3)
    model = _TwoWeights(shape)
    model.update({k: {"weight": mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)}
                  for k in "ab"})
    opt = GroupedAdamW(lr, hparams, betas=(b1, b2), eps=eps)
    opt.init(model.trainable_parameters())
    as64 = lambda x: np.array(x.astype(mx.float32), np.float64)  # noqa: E731
    for step in (0, 1, 2, 3):
        for k in "ab":
            state = opt.state[k]["weight"]
            assert (model[k].weight.dtype, state["m"].dtype, state["v"].dtype) == (mx.bfloat16, mx.bfloat16,
                                                                                   mx.float32), step
        if step == 0:
            continue
        before = {k: (as64(model[k].weight), as64(opt.state[k]["weight"]["m"]), as64(opt.state[k]["weight"]["v"]))
                  for k in "ab"}
        grads = {k: mx.array(rng.standard_normal(shape).astype(np.float32) * 0.1).astype(mx.bfloat16) for k in "ab"}
        opt.guarded_update(model, {k: {"weight": g} for k, g in grads.items()}, mx.array(gscale), mx.array(True))
        mx.eval(model.parameters(), opt.state)
        for k in "ab":
            state = opt.state[k]["weight"]
            p, m, v = before[k]
            g = as64(grads[k]) * gscale
            scale, wd = hparams[f"{k}.weight"]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            assert np.all(np.abs(as64(state["m"]) - m) <= _bf16_ulp(m)), (k, step)
            np.testing.assert_allclose(as64(state["v"]), v, rtol=3e-6)  # fp32 coefficients: 1 - 0.98 is 0.019999981
            # the weight from the moments as stored (m 1 ulp apart, where its rounding was a near tie in fp32
            # against float64, would move a weight near zero by several of its own ulps)
            m_kept, v_kept = as64(state["m"]), as64(state["v"])
            p = (p * (1 - lr * scale * wd)
                 - lr * scale / (1 - b1**step) * m_kept / (np.sqrt(v_kept / (1 - b2**step)) + eps))
            bad = np.abs(as64(model[k].weight) - p) > _bf16_ulp(p)
            assert not bad.any(), (k, step, as64(model[k].weight)[bad][:5], p[bad][:5])


def test_bf16_moments_switched_off_are_fp32(monkeypatch):
    """MLXCLIP_BF16_MOMENTS=0 (optim.BF16_MOMENTS): bf16 weights with both moments fp32, as after the first update
    before session 28 (now from the start: the compiled step is traced once)."""
    from mlx_clip.train import optim as optim_mod

    monkeypatch.setattr(optim_mod, "BF16_MOMENTS", False)
    model = _TwoWeights((4, 8))
    model.update({k: {"weight": mx.ones((4, 8), mx.bfloat16)} for k in "ab"})
    opt = GroupedAdamW(1e-2, {}, betas=(0.9, 0.98), eps=1e-6)
    opt.init(model.trainable_parameters())
    for _ in range(2):
        assert {opt.state[k]["weight"][n].dtype for k in "ab" for n in "mv"} == {mx.float32}
        opt.guarded_update(model, {k: {"weight": mx.ones((4, 8), mx.bfloat16)} for k in "ab"}, mx.array(1.0),
                           mx.array(True))
        mx.eval(model.parameters(), opt.state)
    assert model.a.weight.dtype == mx.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_inplace_update_allocates_no_new_weight(monkeypatch, dtype):
    """The GPU branch's train step (traced and run here): each parameter's update is one kernel making p, m and v,
    and MLX hands it old buffers in input order, item size matching, so not every output gets one: the `tiny` model's
    token table (its one parameter over optim.FUSED_UPDATE_MAX) is made anew each step, with bf16 weights (m bf16, v
    fp32 since session 28) as with fp16 ones (both moments fp32). With optim.GPU_INPLACE_UPDATE
    (MLXCLIP_GPU_INPLACE_UPDATE) its update is single-output kernels writing over their inputs: the step's peak at
    least the table's size lower, and the same weights after four steps."""
    from benchmarks import step_census
    from mlx_clip import cpu_streams
    from mlx_clip.train import optim as optim_mod

    monkeypatch.setattr(cpu_streams, "on_cpu", lambda: False)
    monkeypatch.setattr(optim_mod, "on_cpu", lambda: False)
    monkeypatch.setattr(step_census, "DTYPE", dtype)
    peaks, weights = {}, {}
    for inplace in (False, True):
        monkeypatch.setattr(optim_mod, "GPU_INPLACE_UPDATE", inplace)
        load = step_census._workload("tiny", 2)
        load.run()
        load.run()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        load.run()
        peaks[inplace] = mx.get_peak_memory() - base
        _, params, state = load.launch()  # a fourth step, whose outputs include the model's state
        mx.eval(params, state)
        (table,) = [p for _, p in tree_flatten(params)
                    if isinstance(p, mx.array) and p.size > optim_mod.FUSED_UPDATE_MAX]
        weights[inplace] = (np.array(table.astype(mx.float32)), table.nbytes)
        moments = {(k[-1], v.dtype) for k, v in tree_flatten(state) if k.endswith((".m", ".v"))}
        assert moments == {("m", mx.bfloat16 if dtype == "bfloat16" else mx.float32), ("v", mx.float32)}, moments
    assert peaks[False] - peaks[True] >= weights[True][1], peaks
    np.testing.assert_array_equal(weights[False][0], weights[True][0])


def test_weight_decay_skips_biases_norms_embeddings_and_logit_scale(tiny_dir):
    model, _, _ = load(tiny_dir)
    hparams = param_hparams(model, 0.1)
    # Independently, from module types: only Linear and Conv weight matrices decay.
    decayed = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(hparams) == {k for k, _ in tree_flatten(model.parameters())}
    assert {k for k, (_, wd) in hparams.items() if wd == 0.1} == decayed
    assert {k for k, (_, wd) in hparams.items() if wd == 0.0} == set(hparams) - decayed
    assert {"logit_scale", "vision_model.embeddings.class_embedding", "text_model.final_layer_norm.weight",
            "text_model.embeddings.token_embedding.weight"} <= set(hparams) - decayed


def test_layer_decay_scales(tiny_dir):
    model, _, _ = load(tiny_dir)
    d = 0.5
    hparams = param_hparams(model, 0.1, layer_decay=d)

    def expected(name):
        tower = model.config.vision_config if name.startswith(("vision", "visual")) else model.config.text_config
        L = tower.num_hidden_layers
        parts = name.split(".")
        if ".embeddings." in name or ".pre_layrnorm." in name:
            return d ** (L + 1)
        if parts[1:3] == ["encoder", "layers"]:
            return d ** (L - int(parts[3]))
        return 1.0  # final norms, projections, logit_scale

    for name, (scale, _) in hparams.items():
        assert scale == pytest.approx(expected(name), rel=1e-12), name
    scales = {k: s for k, (s, _) in hparams.items()}
    assert scales["vision_model.embeddings.patch_embedding.weight"] == min(scales.values())
    assert scales["text_model.embeddings.token_embedding.weight"] == min(scales.values())
    assert scales["visual_projection.weight"] == scales["logit_scale"] == max(scales.values()) == 1.0
    block = "vision_model.encoder.layers.{}.mlp.fc1.weight"
    assert scales[block.format(0)] < scales[block.format(1)] < scales["vision_model.post_layernorm.weight"]


@pytest.mark.parametrize("kind,warmup", [("cosine", 0), ("cosine", 4), ("const", 4)])
def test_lr_schedule_matches_open_clip(kind, warmup):
    lr, total = 3e-4, 20
    ours = lr_schedule(lr, total, warmup, kind)
    ref = (cosine_lr if kind == "cosine" else const_lr)(SimpleNamespace(param_groups=[{}]), lr, warmup, total)
    for step in range(total):
        # float32: 1 + cos(pi * p) cancels near the end, so the error is bounded relative to the peak LR
        assert ours(step).item() == pytest.approx(ref(step), rel=1e-6, abs=1e-6 * lr), step


def test_lr_schedule_min_lr_ratio_formula():
    lr, total, warmup, ratio = 1e-3, 12, 2, 0.1
    ours = lr_schedule(lr, total, warmup, "cosine", ratio)
    for step in range(total + 3):
        if step < warmup:
            want = lr * (step + 1) / warmup
        else:
            progress = min((step - warmup) / (total - warmup), 1.0)
            want = lr * ratio + (lr - lr * ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        assert ours(step).item() == pytest.approx(want, rel=1e-6, abs=1e-6 * lr), step
    assert ours(total).item() == pytest.approx(lr * ratio, rel=1e-6)


def _tower_names(names, tower, projection, last_layer, final_norm):
    whole = {n for n in names if n.startswith((tower + ".", projection + "."))}
    unlocked = {n for n in whole if n.startswith((f"{tower}.encoder.layers.{last_layer}.", f"{tower}.{final_norm}.",
                                                    projection + "."))}
    return whole, unlocked


@pytest.mark.parametrize("lock_image,lock_text,unlock_last",
                         [(True, False, 0), (False, True, 0), (True, False, 1), (True, True, 1), (False, True, 5)])
def test_freeze_towers_trains_exactly_the_expected_names(tiny_dir, lock_image, lock_text, unlock_last):
    model, _, _ = load(tiny_dir)
    names = {k for k, _ in tree_flatten(model.parameters())}
    vision, vision_top = _tower_names(names, "vision_model", "visual_projection", 1, "post_layernorm")
    text, text_top = _tower_names(names, "text_model", "text_projection", 1, "final_layer_norm")
    if unlock_last >= 2:  # more than the 2 layers there are: every layer, but not the embeddings
        text_top = {n for n in text if ".encoder.layers." in n or "final_layer_norm" in n or "projection" in n}
    expected = set(names)
    if lock_image:
        expected -= vision - (vision_top if unlock_last else set())
    if lock_text:
        expected -= text - (text_top if unlock_last else set())
    freeze_towers(model, lock_image, lock_text, unlock_last)
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == expected
    assert "logit_scale" in expected


# ---- options: YAML < flags, errors, --help --------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["dot", "reduce", "auto", "concat", "kernel", "flat"])
def test_global_norm_matches_torch_clip_grad_norm(way, monkeypatch):
    """The step's gradient norm (what clipping divides by), each way its sums of squares can be taken (dot on the
    CPU, reduce on a GPU; "kernel" is CUDA's, as auto elsewhere), against torch's clip_grad_norm_ total norm of the same
    float32 gradients."""
    from mlx_clip.train import step

    monkeypatch.setattr(step, "NORM_SQUARES", way)
    monkeypatch.setattr(step, "NORM_CHUNK", 3)  # "concat": a full chunk and a partial one
    rng = np.random.default_rng(5)
    shapes = [(7, 5), (5,), (3, 4, 6), (1,)]
    grads = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3)).astype(np.float32) for s in shapes]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    want = float(torch.nn.utils.clip_grad_norm_(params, max_norm=1e9))
    tree = {"a": mx.array(grads[0]), "b": {"c": mx.array(grads[1]), "d": [mx.array(grads[2]), mx.array(grads[3])]}}
    norm = step._global_norm(tree)
    assert norm.shape == () and float(norm) == pytest.approx(want, rel=1e-6)  # 0-d: it scales arrays of every shape
    with cpu_streams.batch_parallel_mode(True):  # the sums of squares then spread over the CPU streams
        assert float(mx.compile(step._global_norm)(tree)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("extra", [-1, 0, 5, 8191])
def test_dot_squares_of_a_long_gradient_in_rows(extra):
    """The CPU's "dot" sum of squares takes a gradient of DOT_ROWS_MIN elements or more as rows of DOT_ROW, one short
    product each (the BLAS's single dot over millions of elements runs as one serial loop, ~5x slower), the elements
    past the last whole row by a dot of their own: the sum of every element's square, against numpy in float64."""
    from graph_util import primitives
    from mlx_clip.train import step

    n = step.DOT_ROWS_MIN + extra
    flat = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    total = step._dot_squares(mx.array(flat))
    labels = primitives(total)
    assert total.shape == ()
    assert float(total) == pytest.approx(float(np.dot(flat.astype(np.float64), flat.astype(np.float64))), rel=1e-6)
    # in rows (a transposed view of them the product's second operand) from DOT_ROWS_MIN on, a plain dot below
    assert labels.count("Transpose") == (extra >= 0)
    assert labels.count("Matmul") == 1 + (extra >= 0 and (n % step.DOT_ROW) > 0)


@pytest.mark.parametrize("way", ["flat", "dot"])
def test_global_norm_reads_one_dimensional_gradients_as_they_are(way, monkeypatch, tmp_path):
    """The flat and dot ways flatten each gradient for its sum of squares, but not a 1-D one (biases, LayerNorm
    gains: ~200 a ViT step): MLX makes a Reshape node even to the same shape, and a host-bound GPU step pays per node.
    Traced: one Reshape per gradient of another rank, and the total's one (flat keeps each sum as one element)."""
    import re

    from mlx_clip.train import step

    monkeypatch.setattr(step, "NORM_SQUARES", way)
    tree = {"bias": mx.ones((5,)) * 2, "weight": mx.ones((3, 4)) * 3, "gain": mx.ones((7,)) * 4,
            "cube": mx.ones((2, 3, 2)) * 5}
    mx.eval(tree)
    norm = step._global_norm(tree)
    path = tmp_path / "norm.dot"
    mx.export_to_dot(str(path), norm)
    reshapes = sum(label.startswith("Reshape") for label in re.findall(r'label ?= ?"([^"]*)"', path.read_text()))
    assert reshapes == 2 + (way == "flat"), path.read_text()
    assert float(norm) == pytest.approx(float(np.sqrt(5 * 4 + 12 * 9 + 7 * 16 + 12 * 25)), rel=1e-6)
