"""The mean-embedding mechanism (DP-MERF, Harder et al. 2021): each site releases
once, with Gaussian noise, the sum of a fixed random feature map over its images,
one row per class; G is fitted to the sum of the releases at the aggregator.

Why a second mechanism beside DP-SGD on D: DP-SGD adds noise to every one of D's
weights at every step, and on silos of a few hundred images that noise is many
times the clipped signal. Here a site adds noise once, to one vector. At ε = 10
on the benchmarks it came far closer to the centralized domain-FID than DP-SGD;
at ε = 1 it did not help on fundus (the figures are in bench/RESULTS.md).

The privacy argument, which the ledger's accounting rests on:

- φ(x) = [cos(Wx), sin(Wx)] / √F (random Fourier features of a Gaussian kernel)
  has ‖φ(x)‖ = 1 for every image x, because cos² + sin² = 1 in each of the F
  frequencies. W comes from the run's public seed and the length scale from the
  image size, never from any data, so φ itself reveals nothing.
- The release is R = Σᵢ [φ(xᵢ) ⊗ e_yᵢ, e_yᵢ]: per class, the feature sum and the
  count. Adding or removing one image changes one class row by (φ(x), 1), of L2
  norm √2 whatever the image: the sensitivity is `SENSITIVITY` = √2.
- R + N(0, (σ·√2)² I) is therefore one step of the Gaussian mechanism with noise
  multiplier σ at sampling rate 1, the same (σ, q, steps) triple the ledger
  accounts for DP-SGD rounds (Opacus's accountants, add/remove adjacency). The
  noise is a secure-mode Gaussian (four draws, halved) from the OS CSPRNG
  (`fedgan.privacy.secret_random`).
- Everything after the release reads only the releases: the aggregator recovers
  their sum (secure aggregation), and the generator fitted to it is
  post-processing, so it costs no further privacy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedgan.privacy.secret_random import SecretRandom

SENSITIVITY = math.sqrt(2.0)
# Images are embedded this many at a time, so memory stays at batch × 2F.
_BATCH = 256


@dataclass(frozen=True)
class FeatureMap:
    """φ for images of ``pixels`` values in [-1, 1]: ``features`` frequencies
    drawn from N(0, 1/ℓ²) with ℓ = ``length_scale``·√pixels (a kernel width that
    follows the image size, so it needs no data), from the public ``seed``.

    W is generated once per instance and held: pixels × features × 4 bytes
    (65 MB at 64 px grey with 4,000 features)."""

    pixels: int
    features: int
    length_scale: float
    seed: int
    _w: torch.Tensor = field(init=False, repr=False, compare=False)
    _digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pixels < 1 or self.features < 1 or not self.length_scale > 0:
            raise ValueError("pixels, features and length scale must be > 0")
        w = torch.randn(
            self.pixels, self.features, generator=torch.Generator().manual_seed(self.seed)
        )
        w = w / (self.length_scale * math.sqrt(self.pixels))
        object.__setattr__(self, "_w", w)
        # Hashed once, as drawn: W is up to 786 MB, and the aggregator checks
        # the digest against kept sums and fit states as well as the sites.
        object.__setattr__(self, "_digest", hashlib.sha256(w.numpy().tobytes()).hexdigest())

    @property
    def width(self) -> int:
        """Length of φ(x): a cosine and a sine per frequency."""
        return 2 * self.features

    def digest(self) -> str:
        """SHA-256 of W, so a site can check that it embeds with the very map
        the aggregator fits G to (a different torch could draw different
        numbers from the same seed, and a mismatch would fail silently)."""
        return self._digest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self._w
        if w.device != x.device:  # moved once, kept there
            w = w.to(x.device)
            object.__setattr__(self, "_w", w)
        p = x.flatten(1).to(w.dtype) @ w
        return torch.cat([p.cos(), p.sin()], 1) / math.sqrt(self.features)


def release(
    phi: FeatureMap,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    classes: int,
    noise_multiplier: float,
    *,
    secret_seed: int | None = None,
) -> np.ndarray:
    """The site's one release, [max(classes, 1), 2F + 1] in float64: per class
    the feature sum and the count, plus N(0, (σ·√2)²) on every value.

    ``labels`` None (an unconditional run): every image in the one row.
    ``secret_seed`` is for tests only; None seeds the noise from the OS CSPRNG."""
    rows = max(classes, 1)
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= rows):
        raise ValueError(f"labels must be class indices in [0, {rows})")
    out = torch.zeros(rows, phi.width + 1, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(images), _BATCH):
            y = labels[start : start + _BATCH]
            out[:, :-1].index_add_(0, y, phi(images[start : start + _BATCH]).double())
            out[:, -1].index_add_(0, y, torch.ones(len(y), dtype=torch.float64))
    if noise_multiplier > 0:
        noise = SecretRandom("release", secret_seed)
        out += noise.gaussian_noise(noise_multiplier * SENSITIVITY, out)
    return out.numpy()


def class_noise_figures(
    counts: np.ndarray, noise_multipliers: Sequence[float], width: int
) -> np.ndarray:
    """Per class row of the summed releases: the noise's expected norm over the
    largest norm that class's images can give it, σ·√(width + 1) / count with
    the sites' σ combined (σ² add). Every row gets the same noise however few
    images the class has, so above about 1 G learns that class mostly from
    noise. ``counts`` are the noisy counts of the sum: post-processing, no
    privacy cost."""
    sigma = math.sqrt(sum(s * s for s in noise_multipliers))
    return sigma * math.sqrt(width + 1) / np.maximum(np.asarray(counts, dtype=np.float64), 1.0)


@dataclass(frozen=True)
class Target:
    """What G is fitted to: each class's mean embedding and the class prior,
    from the (noisy) sum of the releases."""

    means: torch.Tensor  # [rows, 2F]
    prior: torch.Tensor  # [rows], sums to 1

    @classmethod
    def from_sum(cls, total: np.ndarray, min_count: float = 1.0) -> Target:
        """``total``: Σ releases, or any positive multiple of it (secure
        aggregation returns it divided by the sites' weights). Noise can push a
        small class's count to or below zero; it is floored at ``min_count``
        (in the units of ``total``) so the mean stays finite."""
        t = torch.as_tensor(np.asarray(total, dtype=np.float64))
        if t.ndim != 2 or t.shape[1] < 3:
            raise ValueError(f"a release sum is [classes, 2F + 1], got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("the release sum holds NaN or infinite values")
        counts = t[:, -1].clamp(min=min_count)
        return cls((t[:, :-1] / counts[:, None]).float(), (counts / counts.sum()).float())

    def loss(self, phi: Callable[[torch.Tensor], torch.Tensor], fakes, labels) -> torch.Tensor:
        """Σ_c prior_c·‖mean φ(G's class-c fakes) − target_c‖²: the squared
        MMD per class, weighted as the classes are common."""
        rows = self.means.shape[0]
        f = phi(fakes)
        sums = torch.zeros(rows, f.shape[1], dtype=f.dtype, device=f.device).index_add(0, labels, f)
        n = torch.bincount(labels, minlength=rows).clamp(min=1).to(f.dtype)
        means = sums / n[:, None]
        return ((means - self.means.to(f.device)) ** 2 * self.prior.to(f.device)[:, None]).sum()
