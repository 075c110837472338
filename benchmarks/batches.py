"""Seeded, fixed inputs that both backends see as the very same numpy arrays.

`fixed_batches` goes through the real front end (PIL images of random sizes, so preprocessing resizes and crops;
captions through the tokenizer): the parity run trains on it and checks those stages too. `random_batch` is the cheap
kind the speed benchmark needs (pixel values do not change the time).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mlx_clip.config import CLIPConfig
from mlx_clip.preprocess import Preprocess
from mlx_clip.tokenizer import Tokenizer

# Ten classes, each a colour and an object: images are noisy blocks of the class colour, captions name the class. Pairs
# of a class share their caption, so no model can drive the loss to zero on a batch that holds a class twice: the
# curve falls and levels off instead of collapsing onto 0, where relative differences would say nothing.
CLASSES = [("red", "car", (200, 30, 30)), ("green", "tree", (30, 170, 40)), ("blue", "boat", (30, 60, 200)),
           ("yellow", "lamp", (230, 210, 40)), ("purple", "flower", (130, 40, 160)), ("orange", "ball", (240, 140, 20)),
           ("black", "shoe", (20, 20, 20)), ("white", "cup", (235, 235, 235)), ("brown", "chair", (120, 70, 30)),
           ("gray", "phone", (128, 128, 128))]


def pairs(n: int, seed: int) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """n (image, caption, class) triples: a coarse grid of the class colour plus noise, upscaled to a random size
    (so preprocessing resizes and crops), and "a photo of a COLOUR OBJECT"."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    images, captions = [], []
    for label in labels:
        colour, thing, rgb = CLASSES[label]
        grid = np.clip(np.array(rgb) + rng.normal(0, 40, (rng.integers(2, 7), rng.integers(2, 7), 3)), 0, 255)
        size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
        images.append(Image.fromarray(grid.astype(np.uint8)).resize(size, Image.BILINEAR))
        captions.append(f"a photo of a {colour} {thing}")
    return images, captions, labels.astype(np.int32)


def fixed_batches(config: CLIPConfig, batch: int, n_batches: int, seed: int = 0) -> list[dict]:
    """`n_batches` batches of `batch` pairs: images (B, H, W, 3) float32, input_ids (B, L) int32, labels,
    texts, and the PIL images they came from (for the preprocessing check)."""
    preprocess = Preprocess(image_size=config.vision_config.image_size)
    tokenizer = Tokenizer.default(config.text_config.max_position_embeddings)
    images, captions, labels = pairs(batch * n_batches, seed)
    out = []
    for i in range(n_batches):
        part = slice(i * batch, (i + 1) * batch)
        out.append({
            "images": np.stack([preprocess.to_numpy(img) for img in images[part]]),
            "input_ids": tokenizer.tokenize_numpy(captions[part]),
            "labels": labels[part],  # class ids (the CLIP loss does not read them)
            "texts": captions[part],
            "pil": images[part],
        })
    return out


DEFAULT_CAPTIONS = "3 to context - 3"  # random_batch's word tokens per caption when none are asked for
CAPTION_HELP = (f"Word tokens per caption: N, or A-B drawn uniformly (default {DEFAULT_CAPTIONS}). Both backends get the "
                "same 77-token rows; MLX cuts the padding after the batch's longest caption, as the product does.")


def parse_caption_tokens(spec: str | None) -> tuple[int, int] | None:
    """"A-B" (word tokens per caption drawn uniformly from A..B) or "N" (every caption N); None/"" -> the default."""
    if not spec:
        return None
    lo, _, hi = str(spec).partition("-")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"--caption-tokens: expected N or A-B (word tokens per caption), got {spec!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--caption-tokens: need 1 <= A <= B, got {spec!r}")
    return bounds


def add_card_step_args(ap) -> None:
    """The arguments every card script (gpu_ab, gpu_host, gpu_profile, gpu_regime) takes for its train step: the bench's
    GPU rows' arch, batch, dtype and captions by default."""
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--caption-tokens", default="5-30", help=CAPTION_HELP)


def random_batch(config: CLIPConfig, batch: int, seed: int = 0, words: tuple[int, int] | None = None) -> dict:
    """Normal pixels and token rows shaped as the tokenizer's (SOT, words, EOT, zero padding). `words` bounds the
    word tokens of a caption (both ends included; at most the context less SOT and EOT); by default 3 to context - 3,
    so a batch's longest caption nearly fills the context."""
    rng = np.random.default_rng(seed)
    size, ctx = config.vision_config.image_size, config.text_config.max_position_embeddings
    lo, hi = words or (3, max(ctx - 3, 3))
    ids = np.zeros((batch, ctx), np.int32)
    for row in ids:
        n = min(int(rng.integers(lo, hi + 1)), ctx - 2)
        row[0], row[1 : n + 1], row[n + 1] = 49406, rng.integers(1, 49405, n), 49407
    return {"images": rng.standard_normal((batch, size, size, 3)).astype(np.float32), "input_ids": ids,
            "labels": np.arange(batch, dtype=np.int32)}


def caption_rows(rng, rows: int, length: int, vocab: int, words: int, shortest: int, longest: int) -> np.ndarray:
    """(rows, length) int32 rows shaped as captions are (SOT, shortest..longest word tokens, EOT, zero padding) whose
    words come from a `words`-word vocabulary, so ids repeat within a batch as real captions' do ("a photo of a ..."):
    where a GPU's scatter-add adds a repeated id's rows in arrival order (benchmarks/determinism.py,
    tests/test_gpu_embedding.py)."""
    chosen = rng.integers(1, vocab - 2, words)
    ids = np.zeros((rows, length), np.int32)
    for row in ids:
        n = int(rng.integers(shortest, longest + 1))
        row[0], row[1:n + 1], row[n + 1] = vocab - 2, rng.choice(chosen, n), vocab - 1  # SOT, words, EOT
    return ids
