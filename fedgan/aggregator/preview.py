"""What the aggregator draws from G after each round: the fixed 8×8 sample
grid, and the random inputs its BatchNorm statistics are recomputed from.

Fixed seeds, so the grids of successive rounds show the same latent points
and a person can watch one image change."""

from __future__ import annotations

import torch

from fedgan.attributes import parse as parse_attributes
from fedgan.attributes import sample as sample_attributes
from fedgan.config.run import RunSettings
from fedgan.gan.models import Generator
from fedgan.samples import grid_png

SAMPLE_GRID = 64


class Preview:
    def __init__(self, settings: RunSettings) -> None:
        spec = settings.spec
        self.latent_dim, self.classes = spec.latent_dim, spec.num_classes
        self.attrs = parse_attributes(settings.attributes)
        self.z = torch.randn(
            SAMPLE_GRID, spec.latent_dim, generator=torch.Generator().manual_seed(1234)
        )
        # Conditional runs: each row of the 8×8 grid is one class, cycling.
        self.y = torch.arange(SAMPLE_GRID) // 8 % self.classes if self.classes else None
        # Attribute-conditioned runs: a fixed draw from the declared ranges.
        self.a = (
            sample_attributes(self.attrs, SAMPLE_GRID, torch.Generator().manual_seed(4321))
            if self.attrs
            else None
        )

    def inputs(self, n: int, rng: torch.Generator) -> tuple:
        """Random inputs for G, drawn as the sites draw them for fakes."""
        z = torch.randn(n, self.latent_dim, generator=rng)
        y = torch.randint(0, self.classes, (n,), generator=rng) if self.classes else None
        return z, y, sample_attributes(self.attrs, n, rng) if self.attrs else None

    def grid(self, gen: Generator) -> bytes:
        gen.eval()
        with torch.no_grad():
            return grid_png(gen(self.z, self.y, self.a))
