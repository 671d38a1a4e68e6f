"""Per-sample clipping by its definition: one sample at a time through
autograd, no Opacus and no ClippedGradient (the reference both are tested
against)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def clipped_sum(
    model: torch.nn.Module, loss_of: Callable[[int], torch.Tensor], batch: int, clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ_i min(1, C/(‖g_i‖ + 1e-6))·g_i over the model's parameters, and the
    unclipped norms ‖g_i‖; ``loss_of(i)`` is sample i's loss."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(batch):
        grads = torch.autograd.grad(loss_of(i).sum(), params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        ]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        norms.append(norm)
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (norm + 1e-6))
    return total, torch.tensor(norms)
