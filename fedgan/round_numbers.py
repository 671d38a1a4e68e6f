"""The numbers a site reports about its round, and which of them travel
only as a sum.

Under secure aggregation a site's losses, its update's norm, its clip flags
and its noise figure ride at the end of its update, inside the masked vector,
so the aggregator learns only their mean over the round's survivors: one
site's numbers would say things about it that DP does not cover (a noise
figure grows with 1/batch, and an automatic batch with the silo's size) or
that the mask exists to hide (how far its update moved). Only what the audit
needs per site stays in the clear: ε, its budget, δ and σ (`CLEAR`).

Each number is encoded as v / bound, cut to [-1, 1] and scaled to the
quantization range [-r, r], so its precision does not depend on r: after
dequantizing, one number's mean is within bound · error_bound / r of the
exact mean. Norms and noise figures span orders of magnitude, so they travel
as log10 and their mean is a geometric mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# What a site's reply carries in the clear under secure aggregation: the
# privacy ledger's figures, which auditors and the operator need per site.
CLEAR = frozenset({"epsilon", "epsilon-budget", "delta", "noise-multiplier"})

# Never sent, in any round: the sampling rate is batch / images (the exact
# count), and training time grows with the count. The site's log keeps both.
KEPT_AT_SITE = frozenset({"sample-rate", "train-seconds"})

# Below this a log-encoded number reads as this (a norm or a figure of 0).
_LOG_FLOOR = 1e-8


@dataclass(frozen=True)
class Stat:
    name: str  # the metric's key in a site's reply
    bound: float  # the encoded value is cut to [-bound, bound]
    log: bool = False  # encoded as log10 (the mean is a geometric mean)

    def encode(self, value: float) -> float:
        """In [-1, 1]."""
        v = math.log10(max(value, _LOG_FLOOR)) if self.log else value
        if not math.isfinite(v):
            v = self.bound if v > 0 else -self.bound
        return max(-1.0, min(1.0, v / self.bound))

    def decode(self, mean: float) -> float:
        v = mean * self.bound
        if self.log:
            # At the floor: every site sent 0 (a term that is off).
            return 0.0 if v <= math.log10(_LOG_FLOOR) + 0.01 else float(10.0**v)
        # Every number here is ≥ 0 (losses, fractions); quantization's error
        # must not make a mean of zeros read as slightly negative.
        return max(0.0, float(v))


# G's and D's losses (D's on generated images only: its real-image half is
# not DP and stays at the site), λ·mode-seeking, the update's norm before the
# update clip, whether the update clip cut it, the fraction of values cut by
# secure aggregation's range, and the DP noise figure.
DCGAN = (
    Stat("g-loss", 32.0),
    Stat("d-loss", 32.0),
    # λ·(latent distance / image distance): up to ~1e5 when G collapses.
    Stat("mode-seeking-loss", 8.0, log=True),
    Stat("update-norm", 8.0, log=True),
    Stat("update-clipped", 1.0),
    Stat("secagg-clipped", 1.0),
    Stat("noise-figure", 8.0, log=True),
)
RELEASE = (Stat("secagg-clipped", 1.0), Stat("noise-figure", 8.0, log=True))


def stats_for(mean_embedding: bool) -> tuple[Stat, ...]:
    """The numbers appended to a round's masked vector, in order; both sides
    pick them from the run's mechanism."""
    return RELEASE if mean_embedding else DCGAN


def encode(stats: tuple[Stat, ...], metrics: Mapping[str, float], value_range: float) -> np.ndarray:
    """The numbers to append to the update, each in [-r, r]. A number the
    site does not have (no DP: no noise figure) is sent as 0; the aggregator
    knows from the run's config which ones mean something."""
    encoded = [s.encode(float(metrics.get(s.name, 0.0))) for s in stats]
    return np.array(encoded, dtype=np.float64) * value_range


def decode(stats: tuple[Stat, ...], means: np.ndarray, value_range: float) -> dict[str, float]:
    """The survivors' mean of each number, from the mean of the appended values."""
    if means.shape != (len(stats),):
        raise ValueError(f"expected {len(stats)} appended numbers, got shape {means.shape}")
    return {s.name: s.decode(float(m) / value_range) for s, m in zip(stats, means, strict=True)}


def clipped_fraction(values: np.ndarray, value_range: float) -> float:
    """The fraction of an update's values outside [-r, r] (cut by quantizing)."""
    if values.size == 0:
        return 0.0
    return float(np.count_nonzero(np.abs(values) > value_range)) / values.size
