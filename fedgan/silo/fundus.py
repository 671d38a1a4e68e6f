"""Fundus photographs: crop to the circular field of view, resize, optional
local-contrast normalisation, RGB.

The field of view is found by thresholding the dark border every fundus
camera leaves around the retina; cropping to it first means the retina, not
the border, fills the training image whatever the camera's framing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fedgan.silo.report import SkipFile
from fedgan.silo.resize import fit_square

EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
# Fraction of the brightest level below which a pixel counts as border.
BORDER_FRACTION = 0.08


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr / top * 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"))


def field_of_view(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the bright retina."""
    gray = rgb.astype(np.float32).mean(axis=2)
    threshold = max(8.0, BORDER_FRACTION * float(gray.max()))
    mask = gray > threshold
    if mask.mean() < 0.01:
        raise SkipFile("no field of view: the image is (almost) black")
    rows = np.flatnonzero(mask.sum(axis=1) > 0.01 * mask.shape[1])
    cols = np.flatnonzero(mask.sum(axis=0) > 0.01 * mask.shape[0])
    if rows.size == 0 or cols.size == 0:
        raise SkipFile("no field of view: the bright area is too thin")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def local_contrast(rgb: np.ndarray, size: int) -> np.ndarray:
    """Subtract a wide Gaussian blur (Graham's preprocessing) and restore the
    black border, so lesions stand out whatever the illumination."""
    img = Image.fromarray(rgb)
    blur = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 30))))
    out = np.clip(4.0 * rgb.astype(np.float32) - 4.0 * blur + 128.0, 0, 255).astype(np.uint8)
    border = rgb.astype(np.float32).mean(axis=2) <= max(8.0, BORDER_FRACTION * rgb.max())
    out[border] = 0
    return out


def decode_fundus_file(path: Path, size: int, contrast: bool) -> np.ndarray:
    """One image to uint8 size×size×3, or `SkipFile` with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                rgb = _to_rgb8(img)
        top, bottom, left, right = field_of_view(rgb)
        square = fit_square(Image.fromarray(rgb[top:bottom, left:right]), size)
        out = np.asarray(square)
        return local_contrast(out, size) if contrast else out
    except SkipFile:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipFile("image too large (decompression-bomb guard)") from None
    except MemoryError:
        raise SkipFile("image too large for memory") from None
    except Exception as exc:  # one bad file never stops the silo
        raise SkipFile(f"unreadable image ({type(exc).__name__})") from None
