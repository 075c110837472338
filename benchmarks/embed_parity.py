"""fp32 embedding/logit parity per architecture: seeded random-init open_clip models converted to MLX, ‖Δ‖/‖ref‖.

    python -m benchmarks.embed_parity [--archs tiny,small,ViT-B-32,ViT-B-16,ViT-L-14] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import mlx_clip  # noqa: F401

import mlx.core as mx
import numpy as np
import open_clip
import torch

from converters.open_clip import config_to_open_clip, from_open_clip
from mlx_clip.config import get_config
from mlx_clip.io import apply_weights
from mlx_clip.model import CLIP


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure(arch: str, batch: int = 4, seed: int = 0) -> dict:
    cfg = get_config(arch)
    torch.manual_seed(seed)
    ref = open_clip.model.CLIP(**config_to_open_clip(cfg)).eval()
    ours = apply_weights(CLIP(cfg), from_open_clip({k: v.numpy() for k, v in ref.state_dict().items()}), arch)
    rng = np.random.default_rng(seed)
    size, ctx = cfg.vision_config.image_size, cfg.text_config.max_position_embeddings
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = np.zeros((batch, ctx), np.int64)
    for i in range(batch):
        n = 3 + 4 * i
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = 49406, rng.integers(1, 49405, n), 49407
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
        n_img, n_txt = ref_img / np.linalg.norm(ref_img, axis=1, keepdims=True), ref_txt / np.linalg.norm(ref_txt, axis=1, keepdims=True)
        ref_logits = ref.logit_scale.exp().item() * n_img @ n_txt.T
    logits, _ = ours(mx.array(images), mx.array(ids.astype(np.int32)))
    return {"arch": arch, "image": rel(np.array(ours.encode_image(mx.array(images))), ref_img),
            "text": rel(np.array(ours.encode_text(mx.array(ids.astype(np.int32)))), ref_txt),
            "logits": rel(np.array(logits), ref_logits)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archs", default="tiny,small,ViT-B-32,ViT-B-16,ViT-L-14")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    rows = []
    for arch in args.archs.split(","):
        rows.append(measure(arch))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"# fp32 embedding parity with open_clip, {date.today()}",
             f"Machine: {platform.machine()} CPU. Seeded random-init `open_clip.model.CLIP`, converted; batch 4; "
             "relative error ‖Δ‖/‖ref‖ (bar: ≤ 1e-5).", "", "| arch | image embeddings | text embeddings | logits |",
             "|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['image']:.2e} | {r['text']:.2e} | {r['logits']:.2e} |" for r in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "embed_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
