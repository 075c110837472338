"""The model behind the routes: loading and warm-up off the event loop, inputs to pixels / token ids on a small
thread pool, and embeddings through the `Batcher`. Routes (and later routers, such as a search index) only call
`embed_images` / `embed_texts` and read `info`; the model stays in this one place."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_clip.serve.batcher import Batcher
from mlx_clip.serve.config import ServeConfig
from mlx_clip.serve.errors import ApiError
from mlx_clip.serve.inputs import open_image
from mlx_clip.tokenizer import trim_padding

MAX_WORD_CHARS = 100
log = logging.getLogger("uvicorn.error.mlxclip")  # printed with uvicorn's own lines


def bound_text(text: str, tokenizer) -> str:
    """The part of `text` the tokenizer needs. Only `context_length` tokens reach the model, but BPE time grows with
    the square of a word's length (one 30,000-letter random "word" takes a minute), so long texts are cut to the
    whitespace-separated words that fill the context (counted word by word; the tokenizer splits words at whitespace
    too), each cut at MAX_WORD_CHARS (longer ones are URLs or junk; only their own tail tokens can change)."""
    length = tokenizer.context_length
    if len(text) <= 1000 and all(len(w) <= MAX_WORD_CHARS for w in text.split()):
        return text  # the usual case, already cheap
    kept, tokens = [], 0
    for word in text.split(maxsplit=2 * length)[: 2 * length]:  # never split a huge text whole
        kept.append(word[:MAX_WORD_CHARS])
        tokens += len(tokenizer.encode(kept[-1]))
        if tokens >= length:
            break
    return " ".join(kept)  # the tokenizer collapses whitespace to " " anyway


class Engine:
    def __init__(self, config: ServeConfig, loader: Callable, metrics=None):
        self.config, self.loader, self.metrics = config, loader, metrics
        # What responses call the model: a dir's name (never the server's filesystem path), or the hub id / "builtin".
        path = Path(config.model).expanduser()
        self.model_id = path.resolve().name if path.is_dir() else config.model
        self.model = self.tokenizer = self.preprocess = None
        self.logit_scale: float | None = None
        self.ready = False
        self.error: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] = lambda exc: None
        self.batcher = Batcher(self._run, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                               observe=metrics.observe_batch if metrics else None,
                               queue_depth=metrics.set_queue_depth if metrics else None)
        # Decoding and resizing release the GIL in Pillow: a few threads keep the model thread fed.
        self.prep = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="mlxclip-prep")
        # Decoded pixels are large (0.6 MB per 224 px image) and requests many: at most this many images are decoded
        # and waiting for the model at once, enough to keep batches full; the rest wait as their encoded bytes.
        self._image_slots = asyncio.Semaphore(4 * config.max_batch)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start batching and load in the background: /health says 503 until `ready`."""
        self.batcher.start()
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            started = time.perf_counter()
            await self.batcher.call(self._load_and_warm)
            self.ready = True
            log.info("model %s ready in %.1fs", self.config.model, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001  (a model that cannot load stops the server with its error)
            self.error = exc
            log.error("could not load model %s: %s", self.config.model, exc)
            self.on_failure(exc)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.prep.shutdown(wait=False, cancel_futures=True)

    def _load_and_warm(self) -> None:
        """On the model thread, so MLX sees one thread throughout. Warm-up runs the largest and smallest batch of
        each tower once, so the first requests do not pay for allocation."""
        self.model, self.tokenizer, self.preprocess = self.loader()
        self.logit_scale = float(np.exp(np.array(self.model.logit_scale.astype(mx.float32))))  # read once, here
        size = self.preprocess.image_size
        for n in sorted({1, self.config.max_batch}):
            self._run("image", [np.zeros((size, size, 3), np.float32)] * n)
            self._run("text", list(self.tokenizer.tokenize_numpy(["warm up"] * n)))

    def _run(self, kind: str, items: list) -> np.ndarray:
        batch = np.stack(items)
        x = mx.array(batch if kind == "image" else trim_padding(batch))
        encode = self.model.encode_image if kind == "image" else self.model.encode_text
        return np.array(encode(x, normalize=True).astype(mx.float32))

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is still loading; retry shortly", headers={"Retry-After": "1"})

    # ---- what the routes call -----------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        cfg = self.model.config if self.model is not None else None
        return {"model": self.model_id, "ready": self.ready,
                "dim": cfg.projection_dim if cfg else None,
                "image_size": cfg.vision_config.image_size if cfg else None,
                "context_length": cfg.text_config.max_position_embeddings if cfg else None,
                "logit_scale": self.logit_scale if cfg else None}

    async def _prep(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def _pixels(self, data: bytes, name: str) -> np.ndarray:
        return self.preprocess.to_numpy(open_image(data, self.config.max_image_pixels, name))

    async def embed_images(self, images: list[bytes], names: list[str]) -> np.ndarray:
        """(N, dim) normalized embeddings of encoded images; ApiError names a bad one."""
        self.check_ready()
        return np.stack(await asyncio.gather(*[self._embed_image(d, n) for d, n in zip(images, names)]))

    async def _embed_image(self, data: bytes, name: str) -> np.ndarray:
        # One image at a time through the slot, so a request larger than the slots cannot wait on itself.
        async with self._image_slots:
            pixels = await self._prep(self._pixels, data, name)
            return (await self.batcher.submit("image", [pixels]))[0]

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """((N, dim) normalized embeddings, number of tokens including start/end, after truncation)."""
        self.check_ready()
        ids = await self._prep(lambda: self.tokenizer.tokenize_numpy([bound_text(t, self.tokenizer) for t in texts]))
        eot = self.tokenizer.eot_token_id
        tokens = int(sum(int(np.argmax(row == eot)) + 1 for row in ids))
        return await self.batcher.submit("text", list(ids)), tokens
