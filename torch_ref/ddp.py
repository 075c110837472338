"""The torch reference for data-parallel fine-tuning: open_clip under `torchrun` (DDP over gloo on CPU, or NCCL),
with open_clip's `gather_features(gather_with_grad=True)` for the global-batch loss, as open_clip_train runs it.

Each rank reads the same shard as `mlx.launch`'s rank of the same number (mlx_clip's Loader with rank/world_size and the
per-rank batch), starts from the same MLX model dir, and steps with `TorchCLIP`'s optimizer policy (AdamW groups,
schedule, clip, clamp). DDP averages the gradients. Rank 0 writes one JSON line per step (loss, grad norm).

    torchrun --nproc_per_node 2 -m torch_ref.ddp --model DIR --train-data train.csv --steps 20 --batch-size 16 \\
        --lr 1e-3 --loss clip:1,multi_positive:0.5 --out torch_ddp.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import torch
import torch.distributed as torch_dist
from mlx.utils import tree_flatten
from open_clip.loss import gather_features
from torch.nn.parallel import DistributedDataParallel

from mlx_clip.data.pipeline import Loader, LoaderConfig
from mlx_clip.data.sources import open_source
from mlx_clip.io import load
from mlx_clip.losses import parse_loss_spec
from mlx_clip.train.args import TrainingArgs
from torch_ref import losses as torch_losses
from torch_ref.model import TorchCLIP, from_weights

SUPPORTED = {"clip", "multi_positive"}


class DDPCLIP(TorchCLIP):
    """TorchCLIP whose loss runs through DDP's forward and open_clip's gather: the loss of the global batch."""

    def __init__(self, ddp: DistributedDataParallel, terms, config, args, total_steps: int):
        super().__init__(ddp.module, config, args, total_steps)
        self.ddp, self.terms, self.labels = ddp, terms, None

    def loss_value(self, pixels, tokens):
        # open_clip's forward (through DDP, so backward averages the gradients): normalized features, exp(scale)
        image, text, scale = self.ddp(pixels, tokens)[:3]
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        image, text = gather_features(image, text, gather_with_grad=True, rank=rank, world_size=world)
        total = 0
        for name, weight in self.terms:
            if name == "clip":
                total = total + weight * torch_losses.clip_loss(image, text, scale)
            else:
                total = total + weight * torch_losses.multi_positive_loss(image, text, scale, self.labels)
        return total


def gathered_labels(labels: np.ndarray) -> torch.Tensor:
    """All ranks' labels, rank-major; unlabelled (-1) pairs get distinct ids by global position."""
    local = torch.as_tensor(labels, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, local)
    out = torch.cat(parts)
    return torch.where(out < 0, -1 - torch.arange(len(out)), out)


def main() -> None:
    parser = argparse.ArgumentParser(description="open_clip DDP reference for `mlxclip finetune` under mlx.launch")
    for flag, kind, default in [("--model", str, None), ("--train-data", str, None), ("--steps", int, 20),
                                ("--batch-size", int, 16), ("--lr", float, 1e-3), ("--seed", int, 0),
                                ("--loss", str, "clip"), ("--out", str, "torch_ddp.jsonl")]:
        parser.add_argument(flag, type=kind, default=default, required=default is None)
    cli = parser.parse_args()
    torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    terms = parse_loss_spec(cli.loss)
    if not {name for name, _ in terms} <= SUPPORTED:
        raise ValueError(f"--loss {cli.loss!r}: this reference runs {', '.join(sorted(SUPPORTED))}")
    args = TrainingArgs(model=cli.model, train_data=cli.train_data, steps=cli.steps, batch_size=cli.batch_size,
                        lr=cli.lr, seed=cli.seed, loss=cli.loss)

    mlx_model, tokenizer, preprocess = load(args.model, dtype="float32")
    weights = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    model = from_weights(mlx_model.config, weights, device=device)
    ddp = DistributedDataParallel(model)
    step = DDPCLIP(ddp, terms, mlx_model.config, args, total_steps=args.steps)

    loader = Loader(open_source(args.train_data).records, preprocess, LoaderConfig(
        batch_size=args.batch_size // world, train=True, seed=args.seed, crop_scale=args.scale_range, hflip=args.hflip,
        num_threads=1, prefetch=args.batch_size, rank=rank, world_size=world), tokenize=tokenizer.tokenize_numpy)
    batches = loader.forever()
    lines = []
    for i in range(1, args.steps + 1):
        batch = next(batches)
        step.labels = gathered_labels(batch["labels"])
        loss, norm, applied = step.train_step(batch["images"], batch["input_ids"])
        lines.append({"step": i, "loss": float(loss), "grad_norm": float(norm), "applied": bool(applied)})
    if rank == 0:
        with open(cli.out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
