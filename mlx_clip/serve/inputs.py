"""Request bodies and what they carry: image bytes from base64 / data URLs (URLs are refused, never fetched), safe
decoding with the pixel limit read from the header, and the per-request item limit.

Status codes: 400 for content that cannot be used (bad base64, an undecodable, truncated or unsupported image, empty
input, a URL); 413 for too much (pixels, items; the body size is the middleware's); 422 for a body that does not fit
the schema (FastAPI's validation, reworded into our error shape).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from mlx_clip.data.images import IMAGE_FORMATS, BadImageError, decode_image  # the one allow-list, shared
from mlx_clip.serve.errors import ApiError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://\S*$")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)


# ---- schemas -----------------------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (`user`)


class EmbeddingsRequest(_Body):
    input: str | list[str] = Field(description="Texts, or images as data URLs (data:image/png;base64,...).")
    model: str | None = Field(None, description="Ignored: the server embeds with the model it was started with.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Keep the first N dims and renormalize.")


class TextsRequest(_Body):
    texts: list[str]


class ImagesRequest(_Body):
    images: list[str] = Field(description="Base64 image bytes or data URLs.")


class SimilarityRequest(_Body):
    images: list[str]
    texts: list[str]


class ClassifyRequest(_Body):
    images: list[str]
    labels: list[str]
    templates: list[str] | None = Field(None, description="'{}' marks the label; default 'a photo of a {}.'")
    top_k: int | None = Field(None, ge=1)


# ---- checks ------------------------------------------------------------------------------------------------------

def check_items(name: str, items: list, limit: int, count: int | None = None) -> None:
    """400 for an empty list or an empty string in it, 413 above `limit` (`count` overrides len(items))."""
    if not items:
        raise ApiError(400, "empty_input", f"'{name}' is empty: send at least one item", param=name)
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            raise ApiError(400, "empty_input", f"'{name}[{i}]' is an empty string", param=name)
    count = len(items) if count is None else count
    if count > limit:
        raise ApiError(413, "too_many_items", f"'{name}' asks for {count} embeddings, more than this server's "
                       f"limit of {limit} per request (--max-client-batch); split the request", param=name)


def check_templates(templates: list[str]) -> None:
    for t in templates:
        if t.count("{}") != 1:
            raise ApiError(400, "bad_template", f"template {t!r} must contain '{{}}' exactly once", param="templates")


def is_data_url(text: str) -> bool:
    return text[:5].lower() == "data:"


def refuse_url(text: str, name: str) -> None:
    if _URL.match(text.strip()):
        raise ApiError(400, "url_not_fetched", f"'{name}' is a URL ({text[:60]!r}); this server never fetches URLs: "
                       "send the image bytes as base64 or a data URL (data:image/png;base64,...)", param=name)


def image_bytes(text: str, name: str) -> bytes:
    """Bytes of a data URL (`data:image/...;base64,...`) or of plain base64."""
    refuse_url(text, name)
    if is_data_url(text):
        match = _DATA_URL.match(text)
        if not match or "base64" not in match.group(2).lower():
            raise ApiError(400, "bad_data_url", f"'{name}' is not a base64 data URL (data:image/png;base64,...)",
                           param=name)
        if match.group(1) and not match.group(1).lower().startswith("image/"):
            raise ApiError(400, "unsupported_image_format", f"'{name}' has media type {match.group(1)!r}, "
                           "not an image", param=name)
        text = text[match.end():]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"'{name}' is not valid base64 ({exc})", param=name) from exc
    if not data:
        raise ApiError(400, "empty_input", f"'{name}' holds no bytes", param=name)
    return data


def open_image(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """Decode safely: format allow-list and pixel count from the header first (413), then the pixel data (400)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as header:
                width, height = header.size
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires at open for > ~179 Mpx
        raise ApiError(413, "image_too_large", f"{name}: {exc} Refused before decoding (limit {max_pixels:,} "
                       "pixels, --max-image-pixels)", param=name) from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, "unsupported_image_format", f"{name}: not an image in a supported format "
                       f"({', '.join(IMAGE_FORMATS)})", param=name) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "bad_image", f"{name}: unreadable image header ({exc})", param=name) from exc
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{name}: {width}x{height} = {width * height:,} pixels, more than "
                       f"this server's limit of {max_pixels:,} (--max-image-pixels); nothing was decoded", param=name)
    try:
        return decode_image(data, max_pixels=max_pixels, mode=None)  # mode kept: preprocessing converts like open_clip
    except BadImageError as exc:
        raise ApiError(400, "bad_image", f"{name}: {str(exc).split(': ', 1)[-1]}", param=name) from exc
