"""Limits enforced before any route code runs, as one ASGI middleware (order: auth, concurrency, body size):

- auth: with an API key set, every route except the public ones needs `Authorization: Bearer KEY` (401 otherwise);
- concurrency: beyond `max_concurrent` inference requests in flight, 429 at once with Retry-After, never a queue;
- body size: 413 from Content-Length before reading, and by counting streamed bytes (chunked bodies carry no length).
  The body is read here, at most the limit, and replayed to the route.

Per-item limits (pixels, items per request) need the parsed body and live in `inputs.py`.
"""

from __future__ import annotations

import hmac

from mlx_clip.serve.config import ServeConfig
from mlx_clip.serve.errors import ApiError, send_error

PUBLIC_PATHS = frozenset({"/health", "/"})  # the page itself is public; the calls it makes send the key
RETRY_AFTER_S = 1


def bearer_ok(headers: dict, api_key: str | None) -> bool:
    if api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class LimitsMiddleware:
    def __init__(self, app, config: ServeConfig, metrics=None):
        self.app, self.config, self.metrics = app, config, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in PUBLIC_PATHS and not bearer_ok(headers, self.config.api_key):
            return await send_error(send, ApiError(
                401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"}))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.config.max_concurrent:
            return await send_error(send, ApiError(
                429, "overloaded", f"{self.in_flight} requests in flight, the limit (--max-concurrent); retry after "
                f"{RETRY_AFTER_S}s", headers={"Retry-After": str(RETRY_AFTER_S)}))
        self._count(+1)
        try:
            body = await self._read_body(headers, receive)
            if isinstance(body, ApiError):
                return await send_error(send, body)
            await self.app(scope, _replay(body, receive), send)
        finally:
            self._count(-1)

    def _count(self, step: int) -> None:
        self.in_flight += step
        if self.metrics is not None:
            self.metrics.in_flight.set(self.in_flight)

    async def _read_body(self, headers: dict, receive) -> bytes | ApiError:
        limit = self.config.max_body_bytes
        too_large = ApiError(413, "body_too_large", f"request body over this server's limit of {limit:,} bytes "
                             f"(--max-body-mb {self.config.max_body_mb:g})")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "bad_content_length", f"Content-Length {length!r} is not a byte count")
            if int(length) > limit:
                return too_large
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""  # the client left; the route sees an empty body and its answer goes nowhere
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the buffered body over once, then waits on the real one (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
