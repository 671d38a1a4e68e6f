"""Opacus's noise step for the clipped sum, drawn once for all of D's
parameters instead of once per parameter.

Why: on a GPU the private step is bound by the host launching kernels
(bench/RESULTS.md), and Opacus's secure-mode noise is about a dozen kernels
per parameter (a zero fill, one draw thrown away, four draws each added, the
sum halved, then the add to the clipped sum): some 150 launches per step for
D's 13 parameter tensors, against about 13 here. Here the clipped sums
are flattened into one vector and Opacus's own ``_generate_noise`` noises it
in one call, so the mechanism is unchanged: i.i.d. N(0, σ²C²) per
coordinate, with the same secure-mode construction against floating-point
attacks, from the same CSPRNG-seeded generator.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)


class OneDrawNoiseOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` (the clipped sum is in ``p.grad``
    when ``pre_step`` runs) whose ``add_noise`` draws the noise once."""

    def add_noise(self) -> None:
        # Opacus's adaptive clipping sets the adjusted multiplier; accounting
        # keeps noise_multiplier.
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        summed = [p.summed_grad for p in self.params]
        for s in summed:
            # A clipped sum noised twice would leak: Opacus refuses, so do we.
            _check_processed_flag(s)
        flat = torch.cat([s.reshape(-1) for s in summed])
        flat = flat + _generate_noise(
            std=multiplier * self.max_grad_norm,
            reference=flat,
            generator=self.generator,
            secure_mode=self.secure_mode,
        )
        for p, chunk in zip(self.params, flat.split([s.numel() for s in summed]), strict=True):
            p.grad = chunk.view_as(p)
        for s in summed:
            _mark_as_processed(s)
