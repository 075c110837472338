"""`ServeConfig`: every knob of `mlxclip serve`, one field per flag (the CLI builds this and calls `serve`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mlx_clip.data.images import DEFAULT_MAX_PIXELS

API_KEY_ENV = "MLXCLIP_API_KEY"


@dataclass
class ServeConfig:
    model: str = field(default="builtin", metadata={"help": "Model dir, hub id or 'builtin'."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    max_batch: int = field(default=32, metadata={"help": "Most items (images or texts) per model call."})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "Longest an item waits for others to fill its batch; a busy model batches without waiting."})
    max_concurrent: int = field(default=128, metadata={
        "help": "Most inference requests in flight; beyond it requests get 429 with Retry-After at once."})
    max_body_mb: float = field(default=8.0, metadata={"help": "Largest request body in MiB (413 above)."})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "Largest image (width x height) decoded; checked from the header before decoding (413 above)."})
    max_client_batch: int = field(default=256, metadata={
        "help": "Most inputs one request may ask the model to embed (413 above); /classify counts labels x templates."})
    api_key: str | None = field(default=None, metadata={
        "help": f"Bearer key required on every route but /health and / (default: ${API_KEY_ENV})."})
    graceful_timeout: float = field(default=30.0, metadata={
        "help": "On SIGTERM: seconds to finish in-flight requests before exiting."})
    index: str | None = field(default=None, metadata={
        "help": "An `mlxclip index` dir: enables POST /search (404 without)."})

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        positive = ("max_batch", "max_concurrent", "max_body_mb", "max_image_pixels", "max_client_batch")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.graceful_timeout < 0:
            raise ValueError("max_wait_ms and graceful_timeout must be >= 0")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def public_limits(self) -> dict:
        """What a client may send (shown by GET /info)."""
        return {"max_body_bytes": self.max_body_bytes, "max_image_pixels": self.max_image_pixels,
                "max_client_batch": self.max_client_batch, "max_concurrent": self.max_concurrent,
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms, "auth": self.api_key is not None}
