"""DICOM input (the optional 'dicom' extra: `pip install mlx-clip[dicom]`, which brings pydicom).

A DICOM slice becomes a 16-bit grayscale PIL image ("I;16"): the rescale slope/intercept and the window (centre/width,
if the file has one) are applied, then the window spans 0..65535, so `decode_image` treats it like any 16-bit scan.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DICOM_EXTENSIONS = (".dcm", ".dicom")


def is_dicom(source) -> bool:
    """A path ending in .dcm/.dicom, or bytes with the DICOM preamble's 'DICM' magic at offset 128."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    return str(source).lower().endswith(DICOM_EXTENSIONS)


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # lazily: only DICOM users need it
        raise ImportError("reading DICOM needs pydicom: pip install 'mlx-clip[dicom]' (or pip install pydicom)") from exc
    return pydicom


def _first(value):
    """Window values may be multi-valued (several presets): take the first."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def read_dicom(source) -> Image.Image:
    """A DICOM file (path or bytes) as an 'I;16' PIL image of its (windowed) first frame."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        x = ds.pixel_array.astype(np.float64)
    except (pydicom.errors.InvalidDicomError, AttributeError, KeyError) as exc:  # as OSError: the image is skipped
        raise OSError(f"not a readable DICOM image ({exc})") from exc
    if x.ndim == 3 and x.shape[-1] not in (3, 4):  # a multi-frame series: the first frame
        x = x[0]
    if x.ndim == 3:  # colour DICOM (ultrasound, pathology): grayscale, as the medical preset expects
        x = x[..., :3].mean(axis=-1)
    x = x * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        lo, hi = centre - width / 2, centre + width / 2
    else:
        lo, hi = float(x.min()), float(x.max())
    scaled = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 65535.0
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # 0 is white there
        scaled = 65535.0 - scaled
    return Image.fromarray(np.rint(scaled).astype(np.uint16))
