"""Run by tests/test_distributed.py under `mlx.launch -n 2`: the distributed helpers' values and gradients on known
inputs, printed as one JSON line per rank for the test to check against numpy."""

import json

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np

from mlx_clip.train import distributed as dist

rank, n = dist.rank(), dist.world_size()
rng = np.random.default_rng(rank)
x = mx.array(rng.standard_normal((3, 4)).astype(np.float32))
weights = mx.array(np.arange(n * 3 * 4, dtype=np.float32).reshape(n * 3, 4) / 10)


def loss(x):
    return mx.sum(weights * dist.gather_with_grad(x) ** 2)


value, grad = mx.value_and_grad(loss)(x)
_, _, labels = dist.global_batch(x, x, mx.array([-1, 7, -3], dtype=mx.int32))
grads = dist.average_gradients({"a": [{}, {"w": mx.full((2,), float(rank + 1))}], "b": mx.array(float(rank))})
print(json.dumps({
    "rank": rank, "size": n, "x": np.array(x).tolist(), "loss": value.item(), "grad": np.array(grad).tolist(),
    "labels": np.array(labels).tolist(), "avg_empty": grads["a"][0], "avg_w": np.array(grads["a"][1]["w"]).tolist(),
    "avg_b": grads["b"].item(), "objects": dist.all_gather_objects({"rank": rank}),
}), flush=True)
