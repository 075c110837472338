"""Make the bundled base model (`mlx_clip.load("builtin")`): pretrain the `small` CLIP config from scratch on the
generic synthetic corpus (shapes, colours, counts, sizes, textures, positions with compositional captions).

The corpus is decoded once into memory (64 px images are small) and sampled with a seeded generator, so the loop is
the project's compiled step fed from RAM, fast on a GPU and workable on a CPU. Writes a float16 model dir (≤ 20 MB).

    python scripts/make_builtin.py --out mlx_clip/assets/builtin --n 200000 --steps 6000 --batch-size 512
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import mlx_clip  # noqa: F401  (BLAS preload)

import mlx.core as mx
import numpy as np

from mlx_clip.config import get_config
from mlx_clip.data.images import decode_image
from mlx_clip.data.synth import synthesize_generic
from mlx_clip.eval import zeroshot_from_arrays
from mlx_clip.io import cast, save
from mlx_clip.model import CLIP, init_weights
from mlx_clip.preprocess import Preprocess
from mlx_clip.tokenizer import Tokenizer
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step


def _shard(job) -> str:
    out, n, seed, size = job
    if not (Path(out) / "info.json").exists():
        synthesize_generic(out, n, seed, image_size=size)
    return out


def make_corpus(workdir: Path, n: int, seed: int, size: int, shards: int) -> list[Path]:
    """Generic corpus in `shards` parallel parts (each its own seed, so no two images share one)."""
    per = -(-n // shards)
    jobs = [(str(workdir / f"shard{i:03d}"), per, seed * 1000 + i, size) for i in range(shards)]
    with ProcessPoolExecutor(max_workers=min(shards, os.cpu_count() or 1)) as pool:
        return [Path(p) for p in pool.map(_shard, jobs)]


def load_split(shards: list[Path], split: str, preprocess: Preprocess) -> tuple[np.ndarray, list[str], np.ndarray]:
    rows = [(shard / r["filepath"], r["caption"], int(r["label"]))
            for shard in shards for r in csv.DictReader(open(shard / f"{split}.csv"))]

    def pixels(row):  # uint8, already at model size: normalisation happens per batch
        img = decode_image(str(row[0]))
        return np.asarray(img.resize((preprocess.image_size,) * 2), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = np.stack(list(pool.map(pixels, rows, chunksize=256)))
    return images, [r[1] for r in rows], np.array([r[2] for r in rows])


def batches(images, ids, batch_size: int, seed: int, preprocess: Preprocess):
    """Endless seeded batches: a random permutation per epoch, random horizontal flips (shapes keep their names).
    Pixels travel as uint8 and are flipped and normalised on the device (host-side float work was the bottleneck)."""
    rng = np.random.default_rng(seed)
    mean, std = mx.array(preprocess.mean, mx.float32), mx.array(preprocess.std, mx.float32)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            take = np.sort(order[start : start + batch_size])
            x = mx.array(images[take])
            flip = mx.array(rng.random(batch_size) < 0.5)[:, None, None, None]
            x = mx.where(flip, x[:, :, ::-1], x).astype(mx.float32) / 255.0
            yield (x - mean) / std, mx.array(ids[take])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mlx_clip/assets/builtin")
    ap.add_argument("--workdir", default="/tmp/mlxclip-builtin")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--n", type=int, default=200_000, help="corpus size (images)")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", default="float16")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)

    cfg = get_config(args.arch)
    size = cfg.vision_config.image_size
    preprocess, tokenizer = Preprocess(image_size=size), Tokenizer.default(cfg.text_config.max_position_embeddings)
    t0 = time.time()
    shards = make_corpus(Path(args.workdir), args.n, args.seed, size, args.shards)
    train_x, train_txt, _ = load_split(shards, "train", preprocess)
    val_x, _, val_y = load_split(shards[:2], "val", preprocess)
    train_ids = tokenizer.tokenize_numpy(train_txt)
    print(f"corpus: {len(train_x)} train images in {time.time() - t0:.0f}s", flush=True)

    mx.random.seed(args.seed)
    model = init_weights(CLIP(cfg), args.seed)
    targs = TrainingArgs(lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, batch_size=args.batch_size)
    optimizer = build_optimizer(model, targs, args.steps)
    step = make_step(model, optimizer, make_loss_fn("clip"), grad_clip=1.0)
    info = json.loads((shards[0] / "info.json").read_text())
    classes, templates = info["classes"], info["templates"]
    stream = batches(train_x, train_ids, args.batch_size, args.seed, preprocess)
    t1 = time.time()
    for i in range(1, args.steps + 1):
        x, ids = next(stream)
        loss, _, _ = step(x, ids, mx.arange(args.batch_size))
        mx.eval(loss, model.state, optimizer.state)
        if i % args.save_every == 0 and i != args.steps:  # a usable model even if the run is cut short
            snapshot = CLIP(cfg)
            snapshot.update(model.parameters())
            save(cast(snapshot, args.save_dtype), tokenizer, args.out, preprocess)
        if i % args.eval_every == 0 or i == args.steps:
            zs = zeroshot_from_arrays(model, tokenizer, preprocess.normalize_array(val_x), val_y, classes, templates)
            print(f"step {i} loss {loss.item():.4f} shape zero-shot top1 {zs['top1']:.3f} "
                  f"({args.batch_size * i / (time.time() - t1):.0f} img/s)", flush=True)
    cast(model, args.save_dtype)
    save(model, tokenizer, args.out, preprocess)
    meta = {"script": "scripts/make_builtin.py", "args": vars(args), "shape_zeroshot_top1": zs["top1"],
            "final_loss": loss.item(), "device": str(mx.default_device()), "minutes": round((time.time() - t0) / 60, 1)}
    (Path(args.out) / "builtin.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
