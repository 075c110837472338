"""benchmarks/flops.py (the model FLOPs behind `mlxclip bench`'s MFU) against torch's FlopCounterMode on open_clip's
model built from the same config: each tower's forward, and a training step's forward and backward with the CLIP loss.
FlopCounterMode counts SDPA's CPU kernels only when they decompose, so attention runs by torch's math backend here."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from mlx_clip.config import get_config
from torch_ref.model import build_model

BATCH = 3


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["tiny", "small"])
def test_model_flops_match_torchs_flop_counter(arch):
    cfg = get_config(arch)
    model = build_model(arch).train()  # train mode: attention through F.multi_head_attention_forward's SDPA
    v, t = cfg.vision_config, cfg.text_config
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, v.image_size, v.image_size, generator=gen)
    ids = torch.randint(0, t.vocab_size, (BATCH, t.max_position_embeddings), generator=gen)
    with torch.no_grad():
        assert _counted(lambda: model.encode_image(images)) == BATCH * flops.per_item(cfg, "embed-image", BATCH)
        assert _counted(lambda: model.encode_text(ids)) == BATCH * flops.per_item(cfg, "embed-text", BATCH)
        both = _counted(lambda: (model.encode_image(images), model.encode_text(ids)))
        assert both == BATCH * flops.per_item(cfg, "embed-pair", BATCH)

    def step():  # the CLIP loss with its one logits product (open_clip's ClipLoss makes the transposed logits by a
        image = model.encode_image(images, normalize=True)  # second product, which the model's FLOPs do not count)
        text = model.encode_text(ids, normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(BATCH)
        (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).backward()

    assert _counted(step) == BATCH * flops.per_item(cfg, "train", BATCH)


def test_utilisation_is_achieved_over_peak():
    cfg = get_config("small")
    got = flops.utilisation({"task": "train", "batch": 32, "items_per_s": 100.0}, cfg, peak_tflops=0.2)
    assert got["model_flops_per_item"] == flops.per_item(cfg, "train", 32)
    assert got["model_tflops_per_s"] == pytest.approx(got["model_flops_per_item"] * 100.0 / 1e12)
    assert got["mfu"] == pytest.approx(got["model_tflops_per_s"] / 0.2)
    with pytest.raises(ValueError, match="task must be"):
        flops.per_item(cfg, "embed", 1)


def test_matmul_peak_is_measured_on_the_cpu():
    peak = flops.matmul_peak("cpu", "float32")
    assert peak["n"] == 2048 and peak["dtype"] == "float32" and 0.001 < peak["tflops"] < 100


def test_matmul_rate_is_the_median_or_the_fastest_product(monkeypatch):
    """`best` takes the fastest of the timed products (a peak), the default their median; n^3 FLOPs each, twice."""
    from types import SimpleNamespace

    from mlx_clip import doctor

    durations = iter([2.0, 1.0, 4.0, 0.5, 8.0])  # seconds per product, one per timed repeat
    clock = [0.0]

    def perf_counter():  # called before and after each product: advance by the next duration on every second call
        clock[0] += next(durations) if perf_counter.calls % 2 else 0.0
        perf_counter.calls += 1
        return clock[0]

    perf_counter.calls = 0
    monkeypatch.setattr(doctor, "time", SimpleNamespace(perf_counter=perf_counter))
    flop = 2 * 64**3
    assert doctor.matmul_gflops(64, repeats=5, best=True) == pytest.approx(flop / 0.5 / 1e9)
    durations, perf_counter.calls = iter([2.0, 1.0, 4.0, 0.5, 8.0]), 0
    assert doctor.matmul_gflops(64, repeats=5) == pytest.approx(flop / 2.0 / 1e9)
