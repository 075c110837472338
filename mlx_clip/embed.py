"""Embed image files and captions with a model (the work behind `mlxclip embed --images/--texts`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_clip.eval import encode_images, encode_texts

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def collect_images(sources) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively, sorted for a stable order)."""
    paths = []
    for src in map(Path, sources):
        if src.is_dir():
            paths += sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif src.is_file():
            paths.append(src)
        else:
            raise FileNotFoundError(f"{src}: no such image file or folder")
    return paths


def read_texts(path) -> list[str]:
    """One caption per line; blank lines skipped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def embed_images(model, preprocess, paths, batch_size: int = 32) -> np.ndarray:
    return encode_images(model, preprocess, list(paths), batch_size)


def embed_texts(model, tokenizer, texts, batch_size: int = 256) -> np.ndarray:
    return encode_texts(model, tokenizer, list(texts), batch_size)


def embed_to_npz(model, tokenizer, preprocess, images=(), texts_file=None, out="embeddings.npz", batch_size=32) -> dict:
    """Write normalized embeddings: keys image_embeddings, image_paths, text_embeddings, texts."""
    paths = collect_images(images)
    texts = read_texts(texts_file) if texts_file else []
    result = {
        "image_embeddings": embed_images(model, preprocess, paths, batch_size),
        "image_paths": np.array([str(p) for p in paths]),
        "text_embeddings": embed_texts(model, tokenizer, texts),
        "texts": np.array(texts),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(out)
    return result
