"""Safe image decoding: refuse decompression bombs before decoding, map 16-bit and float images to 8-bit RGB,
and count the images a run had to skip so a broken dataset stops the run instead of silently shrinking it."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels: far above any CLIP input, far below a bomb
# The only Pillow decoders tried on image bytes: common formats with self-contained, well-exercised decoders. The rest
# (EPS runs Ghostscript; PCX, TGA, ICO, PSD, ... are rarely fuzzed) is refused. DICOM goes through pydicom instead.
# JPEG covers camera MPO files too (Pillow opens them through its JPEG entry).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class BadImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, corrupt or too large to decode safely."""


class TooManyBadImagesError(RuntimeError):
    """More images were skipped than `max_bad_fraction` allows."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{len(source)} bytes in memory>"


def _open_lazy(source) -> Image.Image:
    """Open an image reading only its header (Pillow decodes pixel data on `load()`)."""
    from mlx_clip.data.dicom import is_dicom, read_dicom

    if is_dicom(source):  # pydicom (optional extra) reads it whole; the size check below still applies
        return read_dicom(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)), formats=IMAGE_FORMATS)
    return Image.open(source, formats=IMAGE_FORMATS)


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB, scaling high bit depths instead of clipping them.

    Pillow's own `convert("RGB")` clips 16-bit values at 255, which turns most medical/scientific images white.
    Same conventions as `mlx_clip.preprocess`: I;16* and I span 0..65535, F spans 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        scale = 1.0 if img.mode == "F" else 255.0 / 65535.0
        g = np.clip(np.rint(np.asarray(img, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2))
    return img.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1: Pillow's conversion is exact for these


def decode_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str | None = "RGB") -> Image.Image:
    """Decode a path or encoded bytes into a PIL image (8-bit RGB by default; `mode=None` keeps the file's mode).

    Only `IMAGE_FORMATS` are opened (plus DICOM, through pydicom). The pixel count is read from the header and checked
    against `max_pixels` before any pixel data is decoded, so a small file claiming huge dimensions costs nothing.
    Every failure raises `BadImageError` naming the image.
    """
    name = _describe(source)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit; ours is explicit, so silence the duplicate.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_lazy(source)
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"{name}: refusing to decode a {width}x{height} image ({width * height:,} pixels > limit "
                    f"{max_pixels:,}); possible decompression bomb"
                )
            img.load()  # the actual decode; truncated or corrupt data fails here
    except BadImageError:
        raise
    except FileNotFoundError as exc:
        raise BadImageError(f"{name}: file not found") from exc
    except UnidentifiedImageError as exc:  # Pillow cannot tell "not an image" from "a format we did not allow"
        raise BadImageError(f"{name}: not an image in an accepted format ({', '.join(IMAGE_FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if mode is None:
        return img
    if mode != "RGB":
        return img.convert(mode)
    return _to_8bit_rgb(img)


@dataclass
class SkipCounter:
    """Counts images seen and skipped; raises `TooManyBadImagesError` once the skipped fraction passes the limit.

    The check waits for `min_count` images so that one bad file early on does not abort a run; `check(final=True)`
    applies the limit regardless (end of an epoch or an evaluation).
    """

    max_bad_fraction: float = 0.01
    min_count: int = 100
    seen: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first few skipped paths and reasons, for the error
    max_examples: int = 5

    def ok(self) -> None:
        self.seen += 1

    def skip(self, name: str, reason: str) -> None:
        self.seen += 1
        self.skipped += 1
        log.warning("skipping image %s: %s", name, reason)
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{name}: {reason}")
        self.check()

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def check(self, final: bool = False) -> None:
        if self.skipped == 0 or (self.seen < self.min_count and not final):
            return
        if self.fraction > self.max_bad_fraction:
            shown = "\n  ".join(self.examples)
            raise TooManyBadImagesError(
                f"skipped {self.skipped} of {self.seen} images ({self.fraction:.1%}), more than the allowed "
                f"{self.max_bad_fraction:.1%} (--max-bad-fraction). First skipped:\n  {shown}"
            )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.examples = list(state.get("examples", []))
