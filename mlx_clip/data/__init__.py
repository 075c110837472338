"""Data: sources (CSV/TSV, JSONL, class folders, WebDataset shards), safe decoding, the batch pipeline and the
synthetic domain datasets."""

from mlx_clip.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    SkipCounter,
    TooManyBadImagesError,
    decode_image,
)
from mlx_clip.data.pipeline import Loader, LoaderConfig, crop_box, random_resized_crop
from mlx_clip.data.sources import (
    DataError,
    Source,
    WebDataset,
    expand_braces,
    open_source,
    read_csv,
    read_folder,
    read_jsonl,
    read_webdataset,
)
from mlx_clip.data.synth import DOMAINS, synthesize, synthesize_generic

__all__ = [
    "DEFAULT_MAX_PIXELS", "DOMAINS", "BadImageError", "DataError", "Loader", "LoaderConfig", "SkipCounter", "Source",
    "TooManyBadImagesError", "WebDataset", "crop_box", "decode_image", "expand_braces", "open_source",
    "random_resized_crop", "read_csv", "read_folder", "read_jsonl", "read_webdataset", "synthesize",
    "synthesize_generic",
]
