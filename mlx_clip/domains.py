"""Domain presets for `mlxclip finetune --domain medical|industrial|scientific`.

A preset is a set of option values a domain expert would pick: prompt templates, an augmentation policy that keeps
the label true, and the recommended method and hyper-parameters. It only fills options the user did not give:
defaults < preset < YAML < flags. The recipe (lr 5e-4, multi_positive, 3 epochs of batch 64) is the one
benchmarks/results/demo.md chose on the bundled model; benchmarks/results/domain.md compares the other methods.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# What every preset recommends unless it says otherwise (see benchmarks/results/demo.md for how it was chosen).
BASE_RECIPE = dict(adapter="full", lr=5e-4, epochs=3, batch_size=64, warmup=10, weight_decay=0.05,
                   loss="multi_positive", schedule="cosine")


@dataclass(frozen=True)
class Augmentation:
    """What may change an image without changing its label. The loader applies `hflip`, `rotate90` and
    `crop_scale`; `colour_jitter` documents the policy (the pipeline has no colour jitter: 'off' is what it does)."""

    hflip: bool = False
    crop_scale: str = "0.6,1.0"  # random-resized-crop area range; a high floor keeps small findings in frame
    colour_jitter: bool = False  # never for radiographs: intensity *is* the finding (HU-like values)
    rotate90: bool = False  # micrographs have no "up"; charts and anatomy do
    why: str = ""


@dataclass(frozen=True)
class DomainPreset:
    name: str
    templates: tuple[str, ...]
    augmentation: Augmentation
    recipe: dict = field(default_factory=dict)  # TrainingArgs values (and `adapter`) this domain recommends
    notes: str = ""

    def training_defaults(self) -> dict:
        """TrainingArgs field -> value that this preset fills when the user did not give it."""
        aug = self.augmentation
        return {**BASE_RECIPE, "hflip": aug.hflip, "rotate90": aug.rotate90, "augment_scale": aug.crop_scale,
                **self.recipe}

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "medical": DomainPreset(
        name="medical",
        templates=("a scan showing {}.", "a grayscale medical image with {}.", "a CT scan with {}.",
                   "an MRI slice with {}.", "a radiograph showing {}.", "{}."),
        augmentation=Augmentation(
            hflip=False, crop_scale="0.8,1.0",
            why="no colour jitter (intensity carries the finding); no flips (laterality: left/right anatomy); "
                "mild crops so a lesion at the edge stays in the image"),
        notes="16-bit grayscale PNG/TIFF are rescaled, not clipped; DICOM needs the 'dicom' extra (pydicom)."),
    "industrial": DomainPreset(
        name="industrial",
        templates=("a photo of {}.", "an inspection image showing {}.", "a close-up of a surface with {}.",
                   "{} on a metal or fabric surface.", "a defect inspection photo: {}."),
        augmentation=Augmentation(
            hflip=True, crop_scale="0.85,1.0",
            why="defect-preserving crops (>= 85% of the area: a small hole or scratch is not cropped away); "
                "flips are safe (a mirrored scratch is still a scratch)"),
        notes="'no defect' is a class: a crop that removed the defect would teach a wrong label, hence the high floor."),
    "scientific": DomainPreset(
        name="scientific",
        templates=("an image of {}.", "a figure showing {}.", "a scientific image of {}.", "a micrograph of {}.",
                   "{}."),
        augmentation=Augmentation(
            hflip=False, rotate90=False, crop_scale="0.7,1.0",
            why="micrographs alone could be flipped and rotated, but scientific sets mix in charts, where a flip turns "
                "a rising trend into a falling one (synth info.json: hflip_safe = false); pass --hflip --rotate90 "
                "for micrograph-only data"),
        notes="For micrograph-only data add --hflip --rotate90."),
}


def get_preset(domain: str) -> DomainPreset:
    if domain not in PRESETS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[domain]


def apply_preset(values: dict, domain: str) -> dict:
    """`values` (YAML + flags, only what the user gave) completed with the domain preset; given values win."""
    return {**get_preset(domain).training_defaults(), **values}


AUGMENTATION_KEYS = ("hflip", "rotate90", "augment_scale")


def fill_defaults(values: dict) -> dict:
    """defaults < domain preset < method defaults < given `values` (YAML + flags). A preset's recipe is for the
    method it recommends; for a feature adapter (clip-adapter, tip-adapter, coop) only its augmentation stays, for
    full/lit/lora its whole recipe (the method's own options, e.g. lock_image for lit, on top)."""
    from mlx_clip.adapters import FEATURE_METHODS, adapter_defaults

    preset = get_preset(values["domain"]).training_defaults() if values.get("domain") else {}
    method = values.get("adapter", preset.get("adapter", "full"))
    if method in FEATURE_METHODS:
        preset = {k: v for k, v in preset.items() if k in AUGMENTATION_KEYS}
    return {**preset, **adapter_defaults(method), **values, "adapter": method}


def write_templates(domain: str, path) -> Path:
    """The preset's templates as a `templates.txt` (one '{}' template per line)."""
    path = Path(path)
    path.write_text("".join(t + "\n" for t in get_preset(domain).templates))
    return path


# ---- normalisation statistics from the data (`mlxclip data stats`) -------------------------------------------------

def channel_stats(records, max_images: int | None = None, max_pixels: int | None = None) -> dict:
    """Per-channel mean and std of the images (RGB in [0, 1], as the model's normalisation expects), streamed: one
    image at a time into float64 sums, so any number of images fits in memory. Unreadable images are counted."""
    from mlx_clip.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image

    total, total_sq, count, images, skipped = np.zeros(3), np.zeros(3), 0, 0, 0
    for record in getattr(records, "records", records):
        if max_images is not None and images >= max_images:
            break
        try:
            img = decode_image(record["image"], max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        except BadImageError:
            skipped += 1
            continue
        x = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
        count += len(x)
        images += 1
    if count == 0:
        raise ValueError("no readable images to compute statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return {"mean": [float(m) for m in mean], "std": [float(max(s, 1e-6)) for s in std], "images": images,
            "pixels": int(count), "skipped": skipped}


def data_stats(data: str, out: str | None = None, max_images: int | None = None) -> dict:
    """`mlxclip data stats`: statistics of a data source (any format `open_source` reads); JSON written to `out`."""
    from mlx_clip.data.sources import open_source

    stats = channel_stats(open_source(data, caption_key=None), max_images)
    if out:
        Path(out).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def with_data_stats(preprocess, records, max_images: int = 2000):
    """`preprocess` normalising with the data's own mean/std (`--normalize-from-data`); saved with the final model."""
    import dataclasses

    stats = channel_stats(records, max_images)
    return dataclasses.replace(preprocess, mean=tuple(stats["mean"]), std=tuple(stats["std"]))
