"""Aspect-preserving resize and pad to a square, shared by every reader."""

from __future__ import annotations

from PIL import Image


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Scale the longer side to ``size`` and pad the shorter one with black,
    so anatomy is never stretched."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: box-reduce by an integer factor first, then Lanczos the
    # rest: several times faster on large downscales, and visually the same.
    resized = image.resize(
        new,
        Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC,
        reducing_gap=2.0 if scale < 1 else None,
    )
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas
