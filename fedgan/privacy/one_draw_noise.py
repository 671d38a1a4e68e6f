"""Opacus's noise step for the clipped sum, drawn once for all of D's
parameters instead of once per parameter, from the OS's CSPRNG.

Why once: on a GPU the private step is bound by the host launching kernels
(bench/RESULTS.md), and Opacus's secure-mode noise is about a dozen kernels
per parameter (a zero fill, one draw thrown away, four draws each added, the
sum halved, then the add to the clipped sum): some 150 launches per step for
D's 13 parameter tensors, against a handful here. Why not Opacus's draw: it
comes from a `torch.Generator`, a non-cryptographic generator keyed by 64
bits (`fedgan.privacy.secret_random`). The mechanism is unchanged: i.i.d.
N(0, σ²C²) per coordinate, with secure mode's sum of four draws.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedgan.privacy.secret_random import SecretRandom


class _SecretNoise:
    """``add_noise`` for an Opacus optimizer whose clipped sums are in
    ``p.summed_grad``: one draw for all of them, from ``noise_source``
    (set right after construction; there is no default)."""

    noise_source: SecretRandom
    params: list[torch.Tensor]
    noise_multiplier: float
    max_grad_norm: float

    def add_noise(self) -> None:
        # Opacus's adaptive clipping sets the adjusted multiplier; accounting
        # keeps noise_multiplier.
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        summed = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        for s in summed:
            # A clipped sum noised twice would leak: Opacus refuses, so do we.
            _check_processed_flag(s)
        flat = torch.cat([s.reshape(-1) for s in summed])
        flat = flat + self.noise_source.gaussian_noise(multiplier * self.max_grad_norm, flat)
        for p, chunk in zip(self.params, flat.split([s.numel() for s in summed]), strict=True):
            p.grad = chunk.view_as(p)
        for s in summed:
            _mark_as_processed(s)


class OneDrawNoiseOptimizer(_SecretNoise, DPOptimizerFastGradientClipping):
    """The clipped sum is in ``p.grad`` when ``pre_step`` runs (ghost mode)."""


class SecretNoiseDPOptimizer(_SecretNoise, DPOptimizer):
    """Opacus's per-sample-gradient optimizer (hooks, functorch)."""
