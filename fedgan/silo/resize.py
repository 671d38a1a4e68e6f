"""Aspect-preserving resize and pad to a square, shared by every reader."""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Scale the longer side to ``size`` and pad the shorter one with black,
    so anatomy is never stretched."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: box-reduce by an integer factor first, then Lanczos the
    # rest; 5-10x faster for 512 -> 64 and visually the same.
    resized = image.resize(
        new,
        Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC,
        reducing_gap=2.0 if scale < 1 else None,
    )
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8-range values (H×W or H×W×C) to float32 C×H×W in [-1, 1]."""
    arr = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
