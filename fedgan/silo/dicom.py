"""Minimal DICOM reader: single-frame grayscale images with rescale and window.

The full loader (VOI LUT, MONOCHROME1, multi-frame, filters, skip reasons)
belongs to the silo issue; this one is enough to train on synthetic silos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from fedgan.silo import SiloError
from fedgan.silo.resize import fit_square, to_unit_range


def _first(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def windowed_uint8(ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT (slope/intercept), then the stored window, to 0..255."""
    pixels = ds.pixel_array.astype(np.float32)
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1.0)) + float(
        getattr(ds, "RescaleIntercept", 0.0)
    )
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(pixels.min()), float(pixels.max())
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.astype(np.uint8)


def load_dicom(directory: Path, image_size: int) -> np.ndarray:
    if not directory.is_dir():
        raise SiloError(f"{directory} is not a directory; set the site's data dir to its silo")
    images = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
                continue
            gray = windowed_uint8(ds)
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue
        if gray.ndim != 2:
            continue
        images.append(to_unit_range(np.asarray(fit_square(Image.fromarray(gray), image_size))))
    if not images:
        raise SiloError(f"{directory} holds no readable single-frame grayscale DICOM image")
    return np.stack(images)
