"""What `mlxclip bench` and the pytest-benchmark suite time on the MLX side: one call = one finished iteration.

train: the product's step (`make_step`: CLIP loss, grads, global-norm clip, GroupedAdamW, logit-scale clamp, non-finite
guard) on a fixed batch; "eager" runs that same step with compilation switched off. embed-image / embed-text:
normalized embeddings of a batch; "compiled" wraps the encoder in `mx.compile`. embed-pair: one image and one caption.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx

from benchmarks.batches import random_batch
from mlx_clip import cpu_cache, cpu_streams
from mlx_clip.config import CLIPConfig
from mlx_clip.io import DTYPES, cast
from mlx_clip.model import CLIP, init_weights
from mlx_clip.tokenizer import trim_padding
from mlx_clip.train import loop
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.loop import text_rows_for
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step

TASKS = ("train", "embed-image", "embed-text", "embed-pair")
MODES = ("eager", "compiled")


@dataclass
class Workload:
    run: Callable[[], None]  # one iteration, complete when it returns
    items: int  # images (train: image-text pairs) per iteration
    # train only: one step's lazy outputs (loss, norm, applied, model and optimizer state), not evaluated, so that
    # host-side graph building can be timed apart from the device's work (benchmarks/gpu_host.py)
    launch: Callable[[], list] | None = None
    # train only: each run's host time, the calling thread's CPU seconds from the step's call until all its work is
    # queued (`mx.async_eval` returns). On a GPU a step whose host time is close to its wall time is host-bound: its
    # speed is the host CPU's, not the card's (benchmarks/results/gpu-s15-h200.md §4).
    host_s: list[float] | None = None
    # train only: `k` steps queued back to back, complete when it returns (a training loop's pace: the host builds
    # and queues each step while the device runs the one before; `mlxclip bench --steps-per-run`)
    run_steps: Callable[[int], None] | None = None


def _uncompiled(fn: Callable[[], None]) -> Callable[[], None]:
    # MLX checks the compile switch when a compiled function is called, so the very step the trainer compiles runs
    # eagerly here; switched back afterwards so other code in the process is unaffected.
    def run():
        mx.disable_compile()
        try:
            fn()
        finally:
            mx.enable_compile()

    return run


def _in_mode(fn: Callable[[], None], parallel: bool) -> Callable[[], None]:
    # The product's choice (cpu_streams.batch_parallel): batches on every core for training and batch embedding, one
    # request at a time with MKL's threads on each GEMM. Set before every run: workloads of both kinds share a process.
    def run():
        cpu_streams.batch_parallel(parallel)
        fn()

    return run


def mlx_workload(config: CLIPConfig, task: str, batch: int, mode: str = "compiled", dtype: str = "float32",
                 seed: int = 0, words: tuple[int, int] | None = None) -> Workload:
    if task not in TASKS or mode not in MODES:
        raise ValueError(f"task must be one of {TASKS} and mode one of {MODES}, got {task!r}, {mode!r}")
    batch = 1 if task == "embed-pair" else batch
    model = cast(init_weights(CLIP(config), seed), dtype)
    data = random_batch(config, batch, seed, words)
    images = mx.array(data["images"]).astype(DTYPES[dtype])
    # As the product feeds the model (training loop, eval, serve): padding after the longest caption is cut.
    ids, labels = mx.array(trim_padding(data["input_ids"])), mx.array(data["labels"])
    mx.eval(model.parameters(), images, ids, labels)
    if task == "train":  # the rows as the training loop feeds them (packed on the CPU: train.loop.text_rows_for)
        limit = cpu_cache.training_limit()  # the buffer cache of a CPU training run (finetune's cpu_cache.for_training)
        if limit is not None:
            mx.set_cache_limit(limit)
        with cpu_streams.batch_parallel_mode(batch > 1):
            ids = text_rows_for(model, False, 1)(data["input_ids"])
            mx.eval(ids)
        args = TrainingArgs(lr=1e-5)
        optimizer = build_optimizer(model, args, total_steps=1_000_000)
        step = make_step(model, optimizer, make_loss_fn("clip"), args.grad_clip)

        def launch():
            return [step(images, ids, labels), model.state, optimizer.state]

        host_s = []

        def run_steps(k: int):
            before = None
            for i in range(k):  # as train.loop.train queues them: each step's host work overlaps the one before
                tick = time.thread_time()
                (loss, norm, applied), *state = launch()
                if i < k - 1:
                    loop.queue(loss, norm, applied, state=state)
                else:  # the run ends here: all of it, so that host_s holds every step's queueing
                    mx.async_eval(loss, norm, applied, state)
                host_s.append(time.thread_time() - tick)
                if before is not None:  # the step before's numbers, read once this one is queued, as the loop
                    mx.eval(*before)  # reads them: the host at most a step ahead (and its buffers with it)
                before = (loss, norm, applied)
            mx.eval(loss, norm, applied, state)

        def run():
            run_steps(1)

        def in_mode(fn):
            return _in_mode(fn if mode == "compiled" else _uncompiled(fn), batch > 1)

        return Workload(in_mode(run), batch, launch, host_s,
                        run_steps=lambda k: in_mode(lambda: run_steps(k))())
    encode = {
        "embed-image": lambda x, t: model.encode_image(x, normalize=True),
        "embed-text": lambda x, t: model.encode_text(t, normalize=True),
        "embed-pair": lambda x, t: (model.encode_image(x, normalize=True), model.encode_text(t, normalize=True)),
    }[task]
    if mode == "compiled":
        encode = mx.compile(encode, inputs=model.state)
    return Workload(_in_mode(lambda: mx.eval(encode(images, ids)), batch > 1), batch)
