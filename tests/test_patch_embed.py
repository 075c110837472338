"""The patch stem both ways (mlx_clip.model.PATCH_EMBED): the reshape-and-product route and mx.conv2d each give torch's
convolution, value and weight gradient, including image sizes the patch does not divide (the remainder dropped)."""

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlx_clip.model as model_mod
from mlx_clip.config import get_config
from mlx_clip.model import VisionEmbeddings


def _torch_stem(images: np.ndarray, weight: np.ndarray, patch: int):
    """float64 torch: the stem's output (B, H/p, W/p, D) and d(sum(out * probe))/d(weight) in MLX's (D, p, p, C)."""
    w = torch.tensor(weight.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)  # OIHW
    x = torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float64)
    out = F.conv2d(x, w, stride=patch).permute(0, 2, 3, 1)
    probe = torch.tensor(np.random.default_rng(1).standard_normal(out.shape), dtype=torch.float64)
    (out * probe).sum().backward()
    return out.detach().numpy(), w.grad.numpy().transpose(0, 2, 3, 1), probe.numpy()


@pytest.mark.parametrize("route", ["matmul", "conv"])
@pytest.mark.parametrize("size", [(64, 64), (70, 61)])
def test_stem_equals_torch_conv(monkeypatch, route, size):
    monkeypatch.setattr(model_mod, "PATCH_EMBED", route)
    cfg = get_config("small").vision_config
    stem = VisionEmbeddings(cfg)
    images = np.random.default_rng(0).standard_normal((3, *size, cfg.num_channels)).astype(np.float32)
    weight = np.array(stem.patch_embedding.weight)
    want, want_grad, probe = _torch_stem(images, weight, cfg.patch_size)

    def probed(w):
        stem.patch_embedding.weight = w
        return (stem.patches(mx.array(images)) * mx.array(probe.astype(np.float32))).sum()

    got = stem.patches(mx.array(images))
    grad = mx.grad(probed)(mx.array(weight))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-5, atol=1e-4)

