"""The torch side of `mlxclip bench` and the pytest-benchmark suite, task for task as `workloads_mlx`.

train: `TorchCLIP.train_step_on` (open_clip forward, ClipLoss, backward, global-norm clip, AdamW with our parameter
groups, logit-scale clamp, non-finite guard); "compiled" wraps the model's encoders and the loss in torch.compile (as
open_clip users compile the model), the optimizer step stays eager. Embeddings run under inference_mode.
"""

from __future__ import annotations

import torch

from benchmarks.batches import random_batch
from benchmarks.workloads_mlx import MODES, TASKS, Workload
from mlx_clip.config import CLIPConfig
from mlx_clip.train.args import TrainingArgs
from torch_ref.device import synchronize
from torch_ref.model import TorchCLIP, build_model


def torch_workload(config: CLIPConfig, task: str, batch: int, mode: str = "compiled", dtype: str = "float32",
                   device: torch.device | str | None = None, seed: int = 0,
                   words: tuple[int, int] | None = None) -> Workload:
    if task not in TASKS or mode not in MODES:
        raise ValueError(f"task must be one of {TASKS} and mode one of {MODES}, got {task!r}, {mode!r}")
    batch = 1 if task == "embed-pair" else batch
    model = build_model(config, device, dtype, seed)
    ref = TorchCLIP(model, config, TrainingArgs(lr=1e-5), total_steps=1_000_000, compile=mode == "compiled")
    data = random_batch(config, batch, seed, words)  # full 77-token rows, as open_clip's tokenizer gives them
    pixels, tokens = ref.pixels(data["images"]), ref.tokens(data["input_ids"])
    if task == "train":
        def run_steps(k: int):
            before = None
            for _ in range(k):  # queued back to back as a training loop does; synchronised once at the end
                loss = ref.train_step_on(pixels, tokens)[0]
                if before is not None:  # the step before's loss read once this one is queued, as mlxclip's loop
                    before.item()  # reads it (the same loop for both backends: benchmarks/workloads_mlx.py)
                before = loss
            synchronize(ref.device)

        return Workload(lambda: run_steps(1), batch, run_steps=run_steps)
    encode = {
        "embed-image": lambda: ref.image_encoder(pixels, normalize=True),
        "embed-text": lambda: ref.text_encoder(tokens, normalize=True),
        "embed-pair": lambda: (ref.image_encoder(pixels, normalize=True), ref.text_encoder(tokens, normalize=True)),
    }[task]

    def run():
        with torch.inference_mode():
            encode()
        synchronize(ref.device)

    return Workload(run, batch)
