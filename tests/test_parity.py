"""fp32 parity of the MLX model with independent torch implementations: open_clip and transformers.

Seeded random-init torch models (parameters perturbed so biases and norms are not trivial) are converted with our
converters; embeddings, logits and every hidden state must agree to ‖Δ‖/‖ref‖ ≤ 1e-5.
"""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from converters.hf import from_hf  # noqa: E402
from converters.open_clip import config_to_open_clip, from_open_clip  # noqa: E402
from mlx_clip.config import CLIPConfig, get_config  # noqa: E402
from mlx_clip.io import apply_weights  # noqa: E402
from mlx_clip.model import CLIP  # noqa: E402

TOL = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturb(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return module.eval()


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def inputs(cfg: CLIPConfig, batch=3, seed=0):
    """NHWC pixels and token ids shaped like the tokenizer's: SOT, words, EOT, zero padding (ragged lengths)."""
    rng = np.random.default_rng(seed)
    size, ctx = cfg.vision_config.image_size, cfg.text_config.max_position_embeddings
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = np.zeros((batch, ctx), np.int64)
    for i in range(batch):
        n = min(2 + 5 * i, ctx - 2)
        ids[i, 0], ids[i, n + 1] = 49406, 49407
        ids[i, 1 : n + 1] = rng.integers(1, 49405, n)
    return images, ids


def open_clip_pair(arch: str, seed: int = 0):
    cfg = get_config(arch)
    torch.manual_seed(seed)
    ref = perturb(open_clip.model.CLIP(**config_to_open_clip(cfg)), seed)
    ours = apply_weights(CLIP(cfg), from_open_clip(numpy_state(ref)), arch)
    return cfg, ref, ours


def check_open_clip(arch: str):
    cfg, ref, ours = open_clip_pair(arch)
    images, ids = inputs(cfg)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
        ref_logits, _ = [t.numpy() for t in _open_clip_logits(ref, images, ids)]
    out_img = np.array(ours.encode_image(mx.array(images)))
    out_txt = np.array(ours.encode_text(mx.array(ids.astype(np.int32))))
    logits, logits_t = ours(mx.array(images), mx.array(ids.astype(np.int32)))
    assert rel(out_img, ref_img) <= TOL
    assert rel(out_txt, ref_txt) <= TOL
    assert rel(np.array(logits), ref_logits) <= TOL
    np.testing.assert_array_equal(np.array(logits_t), np.array(logits).T)


def _open_clip_logits(ref, images, ids):
    img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
    txt = ref.encode_text(torch.from_numpy(ids), normalize=True)
    logits = ref.logit_scale.exp() * img @ txt.T
    return logits, logits.T


@pytest.mark.parametrize("arch", ["tiny", "tiny-quickgelu", "small"])
def test_open_clip_parity_small(arch):
    check_open_clip(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu"])
def test_open_clip_parity_full(arch):
    check_open_clip(arch)


def test_open_clip_hidden_states_stage_by_stage():
    cfg, ref, ours = open_clip_pair("tiny", seed=1)
    images, ids = inputs(cfg, seed=1)
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy()))
             for blk in ref.visual.transformer.resblocks]
    with torch.no_grad():
        ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    for h in hooks:
        h.remove()
    states = []
    ours.vision_model(mx.array(images), hidden_states=states)
    assert len(states) == len(captured) + 1  # ours also records the embeddings after ln_pre
    for mine, theirs in zip(states[1:], captured):
        theirs = theirs if theirs.shape[0] == images.shape[0] else theirs.transpose(1, 0, 2)  # (L, B, D) in older open_clip
        assert rel(np.array(mine), theirs) <= TOL


def hf_model(seed=0, **text_overrides):
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, vocab_size=49408)
    text.update(text_overrides)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                  patch_size=8, hidden_act=text.get("hidden_act", "quick_gelu"))
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(seed)
    ref = perturb(transformers.CLIPModel(config), seed)
    ours_cfg = CLIPConfig.from_dict(config.to_dict())
    ours = apply_weights(CLIP(ours_cfg), from_hf(numpy_state(ref)), "hf")
    return ref, ours, ours_cfg


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu"}, {"eos_token_id": 2}],
                         ids=["quick_gelu", "gelu", "legacy-eos"])
def test_transformers_parity(overrides):
    ref, ours, cfg = hf_model(**overrides)
    images, ids = inputs(cfg, seed=2)
    ids[:, -1] = 49407  # a second EOT: HF pools the first one (or argmax for eos_token_id == 2), as we must
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                  output_hidden_states=True)
    logits, _ = ours(mx.array(images), mx.array(ids.astype(np.int32)))
    with torch.no_grad():
        pooled = ref.vision_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).pooler_output
        ref_img = ref.visual_projection(pooled).numpy()  # unnormalized features
    assert rel(np.array(ours.encode_image(mx.array(images))), ref_img) <= TOL
    assert rel(np.array(logits), out.logits_per_image.numpy()) <= TOL
    mine_txt = np.array(ours.encode_text(mx.array(ids.astype(np.int32)), normalize=True))
    assert rel(mine_txt, out.text_embeds.numpy()) <= TOL
    assert rel(np.array(ours.encode_image(mx.array(images), normalize=True)), out.image_embeds.numpy()) <= TOL
    states = []
    ours.text_model(mx.array(ids.astype(np.int32)), hidden_states=states)
    for mine, theirs in zip(states, out.text_model_output.hidden_states):
        assert rel(np.array(mine), theirs.numpy()) <= TOL


def test_end_to_end_with_tokenizer_and_preprocess(tmp_path):
    """PIL image + strings through our tokenizer/preprocess vs open_clip's: the same embeddings."""
    from PIL import Image

    from mlx_clip.preprocess import Preprocess
    from mlx_clip.tokenizer import Tokenizer

    cfg, ref, ours = open_clip_pair("tiny", seed=3)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    texts = ["a photo of a scratched metal plate", "Lesion — 2 blobs &amp; 🙂", ""]
    transform = open_clip.image_transform(cfg.vision_config.image_size, is_train=False)
    with torch.no_grad():
        ref_img = ref.encode_image(transform(image)[None], normalize=True).numpy()
        ref_txt = ref.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    pixels = Preprocess(image_size=cfg.vision_config.image_size)(image)[None]
    assert rel(np.array(ours.encode_image(pixels, normalize=True)), ref_img) <= TOL
    assert rel(np.array(ours.encode_text(Tokenizer.default()(texts), normalize=True)), ref_txt) <= TOL


def _short_caption_ids(cfg: CLIPConfig, lengths, seed=3):
    """Token rows with the given word counts (SOT, words, EOT, zeros): every row is padded well past its EOT."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), cfg.text_config.max_position_embeddings), np.int64)
    for row, n in zip(ids, lengths):
        row[0], row[1: n + 1], row[n + 1] = 49406, rng.integers(1, 49405, n), 49407
    return ids


@pytest.mark.parametrize("lengths", [(1,), (3, 17, 9), (14,), (30, 2)], ids=["one-token", "ragged", "bucket-edge", "two-buckets"])
def test_trimmed_text_rows_match_open_clip_on_full_rows(lengths):
    """The product cuts padding after the longest caption (tokenizer.trim_padding) before the text tower; open_clip
    runs all 77 positions. The embeddings must not change."""
    from mlx_clip.tokenizer import trim_padding

    cfg, ref, ours = open_clip_pair("tiny", seed=4)  # 77-token context
    ids = _short_caption_ids(cfg, lengths)
    trimmed = trim_padding(ids.astype(np.int32))
    assert trimmed.shape[1] == -(-(max(lengths) + 2) // 16) * 16 < ids.shape[1]  # the padding really was cut
    with torch.no_grad():
        ref_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
    assert rel(np.array(ours.encode_text(mx.array(trimmed))), ref_txt) <= TOL


def test_trimmed_text_rows_match_transformers_eos_pooling():
    """HF models pool the first EOS (`pool_type` "eos"): cutting the zero padding keeps it, so the output is HF's."""
    from mlx_clip.tokenizer import trim_padding

    ref, ours, cfg = hf_model(seed=5)
    ids = _short_caption_ids(cfg, (4, 1, 6))
    trimmed = trim_padding(ids.astype(np.int32), multiple=4)
    assert trimmed.shape[1] == 8 < ids.shape[1]
    with torch.no_grad():
        ref_txt = ref.get_text_features(input_ids=torch.from_numpy(ids))
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
    assert rel(np.array(ours.encode_text(mx.array(trimmed))), ref_txt) <= TOL


def _packed(ours, ids: np.ndarray, parts: int, windowed: bool | None = None) -> dict:
    """The rows packed as the training loop packs them (tokenizer.pack_rows), as mx arrays; `windowed` True / False
    asserts that key windows (mlx_clip.packed_attention) were / were not made, None takes what comes."""
    from mlx_clip.tokenizer import pack_rows

    packed = pack_rows(ids, np.array(ours.text_model.eot_positions(ids)), parts, multiple=16,
                       windowed=windowed is not False)
    assert packed is not None and packed["ids"].size < ids.size  # the padding really went
    assert windowed is None or ("window" in packed) == windowed
    return {k: mx.array(v) for k, v in packed.items()}


@pytest.mark.parametrize("parts,windowed", [(1, False), (1, True), (2, False)])
def test_packed_text_rows_match_open_clip_on_full_rows(parts, windowed):
    """The training loop packs a batch's captions (each row's tokens up to its EOT, one row after another, a row's
    tokens attending to their own row only), in batch-parallel mode one group per CPU stream; open_clip runs every
    77-token row. The embeddings must not change, with a (T, T) mask or with key windows (96 tokens in blocks of 32)."""
    from mlx_clip import cpu_streams

    cfg, ref, ours = open_clip_pair("tiny", seed=5)
    ids = _short_caption_ids(cfg, (3, 17, 9, 30, 1, 12))
    with torch.no_grad():
        ref_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
    with cpu_streams.batch_parallel_mode(parts > 1):
        out = np.array(ours.encode_text(_packed(ours, ids.astype(np.int32), parts, windowed)))
    assert rel(out, ref_txt) <= TOL


@pytest.mark.parametrize("arch,packed,qkv", [("tiny", False, False), ("small", False, False), ("small", True, False),
                                             ("small", True, True)])
def test_loss_gradients_match_open_clip(monkeypatch, arch, packed, qkv):
    """Gradients of the contrastive loss w.r.t. every weight against open_clip's autograd (its ClipLoss): the whole
    backward pass, the hand-written parts included (MLP block, LayerNorm, CPU attention, the last blocks that run
    their pooled token only; with `qkv` the q/k/v block too), with the caption rows as given or packed as the training
    loop packs them. Gradients go through the same converter as weights (its layout changes are linear)."""
    from mlx.utils import tree_flatten
    import mlx.nn as nn
    from mlx_clip import qkv_block
    from mlx_clip.train.step import make_loss_fn

    monkeypatch.setattr(qkv_block, "ENABLED", qkv)

    cfg, ref, ours = open_clip_pair(arch, seed=2)
    images, ids = inputs(cfg, batch=4, seed=2)
    img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
    txt = ref.encode_text(torch.from_numpy(ids), normalize=True)
    open_clip.loss.ClipLoss()(img, txt, ref.logit_scale.exp()).backward()
    ref_grads = ours.sanitize(from_open_clip({k: p.grad.numpy() for k, p in ref.named_parameters()}))

    labels = mx.arange(images.shape[0])
    rows = _packed(ours, ids.astype(np.int32), 1) if packed else mx.array(ids.astype(np.int32))
    _, grads = nn.value_and_grad(ours, make_loss_fn("clip"))(ours, mx.array(images), rows, labels)
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(ref_grads)
    # A key bias adds the same score to every key of a query, which softmax ignores: its true gradient is 0, and
    # both sides hold rounding noise there. Checked as small against the query bias's gradient instead.
    keys = [k for k in grads if k.endswith("k_proj.bias")]
    for k in keys:
        assert np.linalg.norm(np.array(grads[k])) <= 1e-4 * np.linalg.norm(ref_grads[k.replace("k_proj", "q_proj")])
    errors = {k: rel(np.array(grads[k]), ref_grads[k]) for k in grads if k not in keys}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors[worst])
