"""Image preprocessing: PIL image -> normalized (H, W, 3) float32 pixels, equal to open_clip's eval transform.

open_clip (torchvision on PIL) does: resize the shortest side with PIL bicubic, center crop, `.convert("RGB")`,
divide by 255, normalize. We replay the same PIL calls in the same order (resize and crop happen in the image's own
mode, before the RGB conversion), so 8-bit images give the same pixels to float32 rounding.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_HF_RESAMPLE = {3: "bicubic", 2: "bilinear"}  # PIL enum values, which HF stores in `resample`
# High-depth grayscale modes and the factor that maps their full range onto 0..255. Mode "I" is what PIL (older
# versions, TIFF) uses for 16-bit files, so it is read as 16-bit; "F" follows PIL's own convention of 0..255.
_HIGH_DEPTH = {"I;16": 255 / 65535, "I;16L": 255 / 65535, "I;16B": 255 / 65535, "I;16N": 255 / 65535,
               "I": 255 / 65535, "F": 1.0}


def resized_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int]:
    """(width, height) after the resize, with torchvision's rounding: the long side is truncated, not rounded."""
    if resize_mode == "squash":
        return image_size, image_size
    short, long = min(width, height), max(width, height)
    new_long = int(image_size * long / short)
    return (image_size, new_long) if width <= height else (new_long, image_size)


def center_crop_box(width: int, height: int, image_size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's CenterCrop: offsets are round((side - crop) / 2).
    The resize leaves the short side equal to the crop, so torchvision's zero-padding branch never runs here."""
    top = int(round((height - image_size) / 2.0))
    left = int(round((width - image_size) / 2.0))
    return left, top, left + image_size, top + image_size


def _rgb_uint8(img: Image.Image, size: tuple[int, int], resample, crop: bool, image_size: int) -> np.ndarray:
    """open_clip's order of operations on an 8-bit image: resize and crop in its own mode, then convert to RGB
    (so P resizes with nearest and LA/RGBA with premultiplied alpha, as PIL does there)."""
    if img.size != size:
        img = img.resize(size, resample)
    if crop:
        img = img.crop(center_crop_box(*img.size, image_size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _rgb_float(img: Image.Image, size: tuple[int, int], resample, crop: bool, image_size: int) -> np.ndarray:
    """16/32-bit grayscale kept at full precision (PIL's convert("RGB") would keep only the top 8 bits): scale to
    0..255, resize in float mode 'F' one axis at a time clamping to 0..255 after each pass, as PIL's 8-bit resample
    does, minus its rounding to integers; then replicate to 3 channels."""
    scale = np.float32(_HIGH_DEPTH[img.mode])
    x = Image.fromarray(np.clip(np.asarray(img).astype(np.float32) * scale, 0.0, 255.0))  # float32 -> mode "F"
    for step in ((size[0], x.height), size):  # horizontal pass, then vertical: PIL's own pass order
        if x.size != step:
            x = Image.fromarray(np.clip(np.asarray(x.resize(step, resample)), 0.0, 255.0))
    if crop:
        x = x.crop(center_crop_box(*x.size, image_size))
    gray = np.clip(np.asarray(x, dtype=np.float32), 0.0, 255.0)
    return np.repeat(gray[:, :, None], 3, axis=2)


@dataclass
class Preprocess:
    """open_clip's eval transform as a config: `resize_mode` "shortest" (resize short side + center crop) or
    "squash" (resize both sides to image_size); `interpolation` "bicubic" or "bilinear"."""

    image_size: int = 224
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {self.resize_mode!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean} and {self.std}")

    # --- pixels -------------------------------------------------------------------------------------------------
    def to_numpy(self, img: Image.Image) -> np.ndarray:
        """(image_size, image_size, 3) float32, normalized."""
        size = resized_size(img.width, img.height, self.image_size, self.resize_mode)
        crop = self.resize_mode == "shortest"
        to_rgb = _rgb_float if img.mode in _HIGH_DEPTH else _rgb_uint8
        pixels = to_rgb(img, size, _RESAMPLE[self.interpolation], crop, self.image_size)
        return self.normalize_array(pixels if pixels.dtype == np.uint8 else pixels / np.float32(255))

    def __call__(self, img: Image.Image) -> mx.array:
        return mx.array(self.to_numpy(img))

    def batch(self, images) -> mx.array:
        """(B, image_size, image_size, 3)."""
        return mx.array(np.stack([self.to_numpy(img) for img in images]))

    def normalize_array(self, x):
        """Normalize already-cropped pixels (..., H, W, 3): uint8 in 0..255 or float in 0..1. numpy in, numpy out;
        mx.array in, mx.array out."""
        if isinstance(x, mx.array):
            x = x.astype(mx.float32) / 255.0 if x.dtype == mx.uint8 else x.astype(mx.float32)
            return (x - mx.array(self.mean)) / mx.array(self.std)
        x = np.asarray(x)
        x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    # --- Hugging Face CLIPImageProcessor config -----------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        square = {"height": self.image_size, "width": self.image_size}
        shortest = self.resize_mode == "shortest"
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.image_size} if shortest else square,
            "resample": int(_RESAMPLE[self.interpolation]),
            "do_center_crop": shortest,
            "crop_size": square,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "preprocessor config") -> "Preprocess":
        """Read a CLIPImageProcessor dict; missing keys take CLIPImageProcessor's defaults. Raises ValueError naming
        `source` and the field for values that are malformed or describe a transform we do not implement."""
        def check(ok, field, why):
            if not ok:
                raise ValueError(f"{source}: field {field!r} {why} (got {d.get(field)!r})")

        for flag in ("do_resize", "do_rescale"):
            check(d.get(flag, True) is True, flag, "must be true: only resize + rescale pipelines are supported")
        check(math.isclose(float(d.get("rescale_factor", 1 / 255)), 1 / 255), "rescale_factor", "must be 1/255")
        check(d.get("resample", 3) in _HF_RESAMPLE, "resample", "must be 3 (bicubic) or 2 (bilinear)")
        crop = _side(d.get("crop_size", 224), "crop_size", check)
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, dict) and "shortest_edge" not in size:
            resize_mode, side = "squash", _side(size, "size", check)
            check(not d.get("do_center_crop", True) or crop == side, "crop_size", f"must equal size {side}")
        else:
            resize_mode = "shortest"
            side = _side(size["shortest_edge"] if isinstance(size, dict) else size, "size", check)
            check(d.get("do_center_crop", True) is True, "do_center_crop", "must be true with size.shortest_edge")
            check(crop == side, "crop_size", f"must equal size.shortest_edge {side}")
        if d.get("do_normalize", True):
            mean, std = (_triple(d.get(k, dflt), k, check) for k, dflt in
                         (("image_mean", OPENAI_MEAN), ("image_std", OPENAI_STD)))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(side, mean, std, resize_mode, _HF_RESAMPLE[d.get("resample", 3)])

    @classmethod
    def from_dir(cls, path, image_size: int = 224) -> "Preprocess":
        """Read `path/preprocessor_config.json`; without one, the default transform at `image_size`."""
        file = Path(path) / CONFIG_NAME
        if not file.exists():
            return cls(image_size=image_size)
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(file))

    def save(self, out_dir) -> Path:
        """Write `out_dir/preprocessor_config.json` (loadable by transformers.CLIPImageProcessor)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return out / CONFIG_NAME


def _side(value, field, check) -> int:
    """A square side from an int or a {height, width} dict."""
    if isinstance(value, dict):
        check(set(value) == {"height", "width"} and value["height"] == value["width"], field,
              "must be an int or a square {height, width}")
        value = value["height"]
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, "must be a positive int")
    return value


def _triple(value, field, check) -> tuple:
    """HF accepts one number for all channels or a list of 3."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    check(isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
          field, "must be a number or a list of 3 numbers")
    return tuple(float(v) for v in value)
