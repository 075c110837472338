"""Batches for training and evaluation: decode + augment in parallel threads with prefetch, deterministic given the
seed, resumable to the exact sample, sharded across ranks without overlap.

Each sample is decoded with Pillow (`decode_image`: 16-bit PNGs at full precision, TIFF, a decompression-bomb check,
skip accounting) in a `concurrent.futures` thread pool; Pillow releases the GIL while decoding and resizing, so the
threads run in parallel. mlx-data's `prefetch` carried this parallelism before and was dropped: its thread pool's
destructor sets the stop flag without holding the queue lock, so a worker between its wait predicate and its wait
misses the wake-up and the destructor's `join` blocks forever (a loop that builds, drains and drops
`dx.stream_python_iterable(...).prefetch(4, 2)` hung in `ThreadPool::~ThreadPool` in 3 of 5 tries, within 1.5k-30k
rounds; the test suite hung there about once in eight runs). Batching stays in Python because captions are strings
and a skipped image must not shift the next batch.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from mlx_clip.data.images import DEFAULT_MAX_PIXELS, BadImageError, SkipCounter, decode_image


@dataclass
class LoaderConfig:
    batch_size: int = 32
    train: bool = True  # train: shuffle, augment, drop the last partial batch; eval: none of these
    seed: int = 0
    random_crop: bool = True  # train only: random resized crop (else the model's eval preprocessing)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # fraction of the image area kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    hflip: bool = False  # off by default: flips change meaning for charts, text and handed anatomy
    rotate90: bool = False  # random multiples of 90 degrees: for images without an "up" (micrographs, surfaces)
    num_threads: int = 2
    prefetch: int = 64  # samples decoded ahead
    max_bad_fraction: float = 0.01
    min_bad_count: int = 100  # images seen before the bad-fraction check applies
    max_pixels: int = DEFAULT_MAX_PIXELS
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000  # streamed sources only (they cannot be permuted as a whole)
    # train only, multiscale: one view per entry, a random-resized crop with area range crop_scale * entry, all at
    # one size (so the step keeps one shape); images come as (B, V, H, W, 3). () : one view, (B, H, W, 3).
    views: tuple[float, ...] = ()


def crop_box(width: int, height: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h) of a random area/aspect crop, 10 tries, then
    the largest centred crop within the ratio bounds."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, scale, ratio, rng: np.random.Generator) -> Image.Image:
    """Crop then bicubic resize, in that order, as torchvision does on PIL images (open_clip's train transform)."""
    left, top, w, h = crop_box(img.width, img.height, scale, ratio, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def _shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle of a stream with a fixed-size buffer (deterministic given the rng)."""
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = int(rng.integers(0, buffer))
        yield pool[j]
        pool[j] = item
    for j in rng.permutation(len(pool)):
        yield pool[j]


class Loader:
    """Iterate batches `{"images": (B,H,W,3) float32, "texts": list[str], "labels": int64 (B,), "keys": list[str]}`
    (+ `"input_ids"` when `tokenize` is given; images (B,V,H,W,3) with `config.views`). One `iter()` runs the rest
    of the current epoch.

    `records` is a list (shuffled as a whole each epoch) or a re-iterable stream such as `WebDataset`.
    `preprocess` is the model's `mlx_clip.preprocess.Preprocess` (image_size, to_numpy, normalize_array).
    """

    def __init__(self, records: Sequence[dict] | Iterable[dict], preprocess, config: LoaderConfig | None = None,
                 tokenize: Callable[[list[str]], np.ndarray] | None = None, skips: SkipCounter | None = None):
        self.records = getattr(records, "records", records)  # accept a `Source` too
        self.preprocess = preprocess
        self.config = config = config or LoaderConfig()
        self.tokenize = tokenize
        self.skips = skips or SkipCounter(config.max_bad_fraction, config.min_bad_count)
        if not 0 <= config.rank < config.world_size:
            raise ValueError(f"rank {config.rank} is outside world_size {config.world_size}")
        self.epoch = 0
        self.position = 0  # samples of this rank's epoch order consumed by the batches yielded so far

    @property
    def streamed(self) -> bool:
        return not isinstance(self.records, Sequence)

    # ---- which samples, in which order ----------------------------------------------------------------------------

    def _rng(self, *extra) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, *extra])

    def _order(self) -> np.ndarray:
        """This rank's record indices for the current epoch (map-style sources)."""
        c, n = self.config, len(self.records)
        order = self._rng().permutation(n) if c.train else np.arange(n)
        mine = order[c.rank::c.world_size]
        # Training ranks must take the same number of steps, so drop the < world_size remainder (a different one
        # each epoch); evaluation keeps every sample so that the ranks together cover the set exactly once.
        return mine[: n // c.world_size] if c.train else mine

    def _epoch_items(self, start: int) -> Iterator[tuple[int, dict]]:
        """(ordinal, record) pairs of this rank's epoch order from `start`."""
        c = self.config
        if not self.streamed:
            order = self._order()
            for ordinal in range(start, len(order)):
                yield ordinal, self.records[int(order[ordinal])]
            return
        mine = (r for i, r in enumerate(self.records) if i % c.world_size == c.rank)
        if c.train:
            mine = _shuffled(mine, c.shuffle_buffer, self._rng(c.rank, 1))
        for ordinal, record in enumerate(mine):
            if ordinal >= start:  # resuming a stream re-reads it, but skipped records are not decoded
                yield ordinal, record

    def __len__(self) -> int:
        """Batches per epoch (before any skipped images); map-style sources only."""
        if self.streamed:
            raise TypeError("a streamed source has no length")
        n, b = len(self._order()), self.config.batch_size
        return n // b if self.config.train else math.ceil(n / b)

    # ---- per-sample work (runs in the decode threads) -----------------------------------------------------------

    def _pixels(self, record: dict, ordinal: int) -> np.ndarray:
        c, pre = self.config, self.preprocess
        if not (c.train and c.random_crop):
            # Native mode: the model's preprocessing resizes 16-bit images at full precision, like open_clip would.
            img = decode_image(record["image"], max_pixels=c.max_pixels, mode=None)
            return np.asarray(pre.to_numpy(img), dtype=np.float32)
        img = decode_image(record["image"], max_pixels=c.max_pixels)
        # Seeded per sample, not per thread or rank: keyed by the sample's position in the epoch's global order
        # (rank r's ordinal o is position o*N + r), so N ranks crop each sample as one process does.
        position = ordinal * c.world_size + c.rank
        if not c.views:
            return self._view(img, c.crop_scale, self._rng(0, 2, position))
        # view 0 draws as a single-view run does; the others from their own streams
        return np.stack([self._view(img, (c.crop_scale[0] * s, c.crop_scale[1] * s),
                                    self._rng(0, 2, position, *([v] if v else [])))
                         for v, s in enumerate(c.views)])

    def _view(self, img: Image.Image, scale, rng: np.random.Generator) -> np.ndarray:
        c, pre = self.config, self.preprocess
        img = random_resized_crop(img, pre.image_size, scale, c.crop_ratio, rng)
        if c.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if c.rotate90 and (quarter := int(rng.integers(4))):  # drawn last: runs without it keep their random stream
            img = img.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[quarter - 1])
        return np.asarray(pre.normalize_array(np.asarray(img, dtype=np.uint8)), dtype=np.float32)

    def _decode(self, record: dict, ordinal: int) -> tuple[np.ndarray | None, str]:
        """(pixels, "") or (None, why) for an image that cannot be decoded; other errors propagate to the caller."""
        try:
            return self._pixels(record, ordinal), ""
        except BadImageError as exc:
            return None, str(exc)

    def _samples(self, start: int) -> Iterator[tuple[int, dict, np.ndarray | None, str]]:
        """(ordinal, record, pixels or None, error) in ordinal order, `prefetch` samples decoded ahead in threads."""
        c = self.config
        pool = ThreadPoolExecutor(max(c.num_threads, 1), thread_name_prefix="mlxclip-decode")
        ahead: deque[tuple[int, dict, Future]] = deque()
        try:
            for ordinal, record in self._epoch_items(start):
                ahead.append((ordinal, record, pool.submit(self._decode, record, ordinal)))
                if len(ahead) > c.prefetch:
                    yield self._done(*ahead.popleft())
            while ahead:
                yield self._done(*ahead.popleft())
        finally:
            # A consumer that stops early (steps reached, an error) must not leave threads decoding for nobody.
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _done(ordinal: int, record: dict, future: Future) -> tuple[int, dict, np.ndarray | None, str]:
        pixels, error = future.result()
        return ordinal, record, pixels, error

    # ---- batches -----------------------------------------------------------------------------------------------

    def _collate(self, rows: list[tuple[dict, np.ndarray]]) -> dict:
        texts = [r["caption"] for r, _ in rows]
        batch = {
            "images": np.stack([p for _, p in rows]).astype(np.float32, copy=False),
            "texts": texts,
            "labels": np.array([-1 if r["label"] is None else r["label"] for r, _ in rows], dtype=np.int64),
            "keys": [r["key"] for r, _ in rows],
        }
        if self.tokenize is not None:
            batch["input_ids"] = self.tokenize(texts)
        return batch

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        rows = []
        for ordinal, record, pixels, error in self._samples(self.position):
            if pixels is None:
                self.skips.skip(str(record["key"]), error)
                continue
            self.skips.ok()
            rows.append((record, pixels))
            if len(rows) == c.batch_size:
                self.position = ordinal + 1
                yield self._collate(rows)
                rows = []
        if rows and not c.train:
            yield self._collate(rows)
        self.skips.check(final=True)
        self.epoch, self.position = self.epoch + 1, 0

    def forever(self) -> Iterator[dict]:
        """Batches across epochs without end (training by steps)."""
        while True:
            # A run resumed at the very end of an epoch finds an empty remainder there; only a whole epoch is an error.
            whole, yielded = self.position == 0, False
            for batch in self:
                yielded = True
                yield batch
            if whole and not yielded:
                raise ValueError(f"no full batch of {self.config.batch_size} in an epoch: too few samples")

    # ---- resume ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        c = self.config
        return {"epoch": self.epoch, "position": self.position, "seed": c.seed, "rank": c.rank,
                "world_size": c.world_size, "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        c = self.config
        if (state["seed"], state["world_size"]) != (c.seed, c.world_size):
            raise ValueError(
                f"data state was saved with seed={state['seed']}, world_size={state['world_size']}; this loader has "
                f"seed={c.seed}, world_size={c.world_size}, so the saved position would point at other samples"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skips.load_state_dict(state["skips"])
