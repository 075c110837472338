"""`mlxclip serve`: an HTTP embedding service (FastAPI + uvicorn) over `encode_image` / `encode_text`."""

from mlx_clip.serve.app import create_app, router, serve
from mlx_clip.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "router", "serve"]
