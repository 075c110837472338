"""Model FLOPs of the benchmark's tasks, for issue 7's model FLOP utilisation (MFU) bar: achieved FLOP/s over the
device's measured matmul rate.

"Model FLOPs" are those the model defines, counted the same for every backend: the products of the full CLIP model
(open_clip's) at its full text context, whatever an implementation skips — MLX's last block computes the pooled token
only and its text tower cuts the padding, so its MFU by this count is the throughput a user gets, not the work it did.
Each product counts 2 m n k: the patch stem, every block's q/k/v, attention scores and values (4 L² D a block), output
projection and MLP, and each tower's projection. Training adds the backward pass's two products per forward product
(the input's and the weight's gradient), except the stem's input gradient (pixels need none), and the contrastive
loss's (B, E) x (E, B) logits forward and backward. Elementwise work is not counted (as in PaLM's MFU).
tests/test_flops.py checks these counts against torch's FlopCounterMode on open_clip's model.
"""

from __future__ import annotations

from mlx_clip.config import CLIPConfig, TextConfig, VisionConfig


def _blocks(layers: int, tokens: int, width: int, mlp: int) -> int:
    """Forward FLOPs of a tower's transformer blocks: q/k/v, scores and values over all heads, output, MLP."""
    return layers * (2 * tokens * width * 3 * width + 4 * tokens * tokens * width + 2 * tokens * width * width
                     + 4 * tokens * width * mlp)


def stem_forward(v: VisionConfig) -> int:
    patches = (v.image_size // v.patch_size) ** 2
    return 2 * patches * 3 * v.patch_size ** 2 * v.hidden_size


def image_forward(v: VisionConfig, projection_dim: int) -> int:
    """One image's forward FLOPs: the patch stem, the blocks over the patches and the class token, the projection."""
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    return (stem_forward(v) + _blocks(v.num_hidden_layers, tokens, v.hidden_size, v.intermediate_size)
            + 2 * v.hidden_size * projection_dim)


def text_forward(t: TextConfig, projection_dim: int) -> int:
    """One caption's forward FLOPs at the full context (the model's own length; padding included)."""
    return (_blocks(t.num_hidden_layers, t.max_position_embeddings, t.hidden_size, t.intermediate_size)
            + 2 * t.hidden_size * projection_dim)


def per_item(config: CLIPConfig, task: str, batch: int) -> int:
    """Model FLOPs per item of `task` (an image, a caption, a pair, or one training pair in a batch of `batch`)."""
    image = image_forward(config.vision_config, config.projection_dim)
    text = text_forward(config.text_config, config.projection_dim)
    if task == "embed-image":
        return image
    if task == "embed-text":
        return text
    if task == "embed-pair":
        return image + text
    if task == "train":
        return 3 * (image + text) - stem_forward(config.vision_config) + 6 * batch * config.projection_dim
    raise ValueError(f"task must be train, embed-image, embed-text or embed-pair, got {task!r}")


def matmul_peak(device: str, dtype: str) -> dict:
    """The measured matmul rate MFU is taken against: MLX's fastest of 15 n×n products on `device` in `dtype` (n =
    8192 on a GPU, as ../shared/docs/GPU.md measured an H100's bf16 peak, 742 TFLOP/s; 2048 on the CPU). The fastest,
    not the median (until session 21): on the shared CPU VM a dip during the seven products once halved the median
    (0.1 against ~0.2 TFLOP/s) and put the MFU of that run's rows over 100%; a peak is what the machine can do."""
    import mlx.core as mx

    from mlx_clip.doctor import matmul_gflops

    n = 2048 if device == "cpu" else 8192
    with mx.stream(mx.cpu if device == "cpu" else mx.gpu):
        tflops = matmul_gflops(n, repeats=15, dtype=dtype, best=True) / 1e3
    return {"tflops": tflops, "n": n, "dtype": dtype}


def utilisation(record: dict, config: CLIPConfig, peak_tflops: float) -> dict:
    """The record's model FLOPs per item, achieved TFLOP/s (per item times items/s) and MFU (that over the peak)."""
    flops = per_item(config, record["task"], record["batch"])
    achieved = flops * record["items_per_s"] / 1e12
    return {"model_flops_per_item": flops, "model_tflops_per_s": achieved, "matmul_peak_tflops": peak_tflops,
            "mfu": achieved / peak_tflops}


if __name__ == "__main__":  # python -m benchmarks.flops DEVICE DTYPE: the matmul peak as one JSON line (bench.py runs it
    import json  # in a process of its own, with the MLX worker's environment: TF32, BLAS and malloc as measured)
    import sys

    import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

    print(json.dumps(matmul_peak(sys.argv[1], sys.argv[2])))
