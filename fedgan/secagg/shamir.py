"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

The field is larger than every secret shared here (256-bit seeds and X25519
private keys), so a secret is an element, not a set of chunks. Coefficients
come from the OS's CSPRNG. Fewer than t shares are consistent with every
possible secret: they reveal nothing."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedgan.secagg.errors import SecAggError

PRIME = 2**521 - 1  # a Mersenne prime
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs`` (distinct, non-zero)."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    coefficients = [secret, *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from any ``threshold`` shares (Lagrange at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot recover a {threshold}-of-n secret")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


def to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggError("a share is not a field element")
    return value
