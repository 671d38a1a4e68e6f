"""Render generated images as a grid PNG for people to look at."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W in [-1, 1] to N×H×W×C uint8."""
    arr = images.detach().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def grid_png(images: torch.Tensor, columns: int = 8, pad: int = 2) -> bytes:
    pics = to_uint8(images)
    n, h, w, c = pics.shape
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = pics[i]
    out = io.BytesIO()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(out, format="PNG")
    return out.getvalue()
