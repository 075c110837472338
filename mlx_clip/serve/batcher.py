"""Dynamic micro-batching: items from concurrent requests are grouped, per queue, into one model call of up to
`max_batch` items, or fewer once the oldest waiting item has waited `max_wait_ms`.

The model runs on one dedicated thread, never on the event loop, so the server keeps accepting, refusing and
answering health checks while a batch computes; one thread also keeps MLX calls serialized. While the model is busy
the queues fill, so under load batches form without any waiting; at low load an item waits at most `max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class Batcher:
    """`await submit(kind, items)` -> one result row per item, in order. `run(kind, items) -> (len(items), ...)` is
    called on the model thread with a list of items of one kind; `observe(kind, size, seconds)` and
    `queue_depth(kind, depth)` report to metrics."""

    def __init__(self, run: Callable[[str, list], np.ndarray], kinds=("image", "text"), max_batch: int = 32,
                 max_wait_ms: float = 5.0, observe=None, queue_depth=None):
        self.run, self.kinds = run, tuple(kinds)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.observe = observe or (lambda kind, size, seconds: None)
        self.queue_depth = queue_depth or (lambda kind, depth: None)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxclip-model")
        self._queues = {k: collections.deque() for k in self.kinds}  # (item, future, enqueued_at)
        self._wakeups: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeups = {k: asyncio.Event() for k in self.kinds}
        self._tasks = [asyncio.create_task(self._loop(k), name=f"batcher-{k}") for k in self.kinds]

    async def stop(self) -> None:
        """Fail what is still queued (uvicorn has already drained in-flight requests) and release the thread."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for queue in self._queues.values():
            while queue:
                _, future, _ = queue.popleft()
                if not future.done():
                    future.set_exception(RuntimeError("server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn, *args):
        """Run `fn` on the model thread (loading and warm-up go through here too)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- requests -----------------------------------------------------------------------------------------------
    async def submit(self, kind: str, items: list) -> np.ndarray:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        now = time.monotonic()
        self._queues[kind].extend((item, f, now) for item, f in zip(items, futures))
        self.queue_depth(kind, len(self._queues[kind]))
        self._wakeups[kind].set()
        return np.stack(await asyncio.gather(*futures))

    def depth(self, kind: str) -> int:
        return len(self._queues[kind])

    # ---- the loop -----------------------------------------------------------------------------------------------
    async def _loop(self, kind: str) -> None:
        queue, wakeup = self._queues[kind], self._wakeups[kind]
        while True:
            while not queue:
                wakeup.clear()
                await wakeup.wait()
            await self._fill(queue, wakeup)
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            self.queue_depth(kind, len(queue))
            live = [(item, f) for item, f, _ in batch if not f.done()]  # skip items of requests that went away
            if live:
                await self._compute(kind, live)

    async def _fill(self, queue: collections.deque, wakeup: asyncio.Event) -> None:
        """Wait until the batch is full or its oldest item has waited max_wait."""
        deadline = queue[0][2] + self.max_wait
        while len(queue) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _compute(self, kind: str, live: list) -> None:
        start = time.perf_counter()
        try:
            out = await self.call(self.run, kind, [item for item, _ in live])
        except Exception as exc:  # noqa: BLE001  (every waiting request gets the error, none hangs)
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        self.observe(kind, len(live), time.perf_counter() - start)
        for row, (_, f) in zip(out, live):
            if not f.done():
                f.set_result(row)
