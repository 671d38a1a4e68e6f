"""Image sets with known relations, for the evaluation metrics' tests."""

from __future__ import annotations

import torch


def blobs(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (N×1×16×16); ``shift`` moves a set
    away from an unshifted one by a known amount."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 32, 32, generator=g), 2)
    return (x * 2 + shift).clamp(-1, 1)
