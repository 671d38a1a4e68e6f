"""The randomness DP's guarantee rests on: the Poisson sample of each step
and the Gaussian noise on the clipped sum, drawn from the OS's CSPRNG.

A `torch.Generator` is a Mersenne Twister (or Philox) keyed by 64 bits:
whoever learns or guesses the seed can replay every sample and subtract
every noise draw, and the guarantee is gone. Opacus's secure mode relied on
torchcsprng for this, which no longer builds against current PyTorch. Here
the stream is AES-256 in counter mode under a key from ``os.urandom`` (the
`cryptography` package; a CSPRNG by the standard construction), one key for
sampling and another for noise, so neither can be derived from the other.
Uniforms take 53 bits each; normals come by Box-Muller, and the noise keeps
Opacus's secure-mode sum of four draws against floating-point attacks
(Mironov 2012; Opacus's ``_generate_noise``).
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_SCALE = 2.0**-53
_MASK = (1 << 53) - 1  # the low 53 bits of a word: as uniform as the high ones


class SecretRandom:
    """One AES-256-CTR stream. ``test_seed`` derives the key from a number
    instead of ``os.urandom``: for tests that need a repeatable run, never
    set in production (`fedgan.train.DPConfig.secret_seed`)."""

    def __init__(self, purpose: str, test_seed: int | None = None) -> None:
        if test_seed is None:
            key = os.urandom(32)
        else:
            key = hashlib.sha256(f"fedgan test {purpose} {test_seed}".encode()).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def _words(self, n: int) -> torch.Tensor:
        """n uniform 64-bit words (int64, on the CPU)."""
        out = bytearray(8 * n + 15)  # update_into wants a block's slack
        self._stream.update_into(bytes(8 * n), out)
        return torch.frombuffer(out, dtype=torch.int64, count=n)

    def uniform(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """n float64 uniform on (0, 1] (53 bits each; never 0, so log is safe),
        converted where they are used."""
        words = self._words(n).to(device)
        return ((words & _MASK).to(torch.float64) + 1.0) * _SCALE

    def normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """n standard normals (float64) on ``device`` by Box-Muller."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs, device)
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]

    def poisson_sample(self, n: int, rate: float) -> torch.Tensor:
        """The indices of a Poisson sample of n items, each in with
        probability ``rate``."""
        return torch.nonzero(self.uniform(n) < rate).view(-1)

    def gaussian_noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std²) per coordinate, shaped and placed like ``reference``:
        the sum of four draws, halved (the variance is std²), as Opacus's
        secure mode does against floating-point attacks."""
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        total = self.normal(n, reference.device)
        for _ in range(3):
            total += self.normal(n, reference.device)
        return (total * (std / 2)).to(reference.dtype).view_as(reference)
