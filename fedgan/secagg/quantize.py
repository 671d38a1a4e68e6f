"""Clip, weight and quantize an update to integers, and turn the sum back.

A site's weight is α = k / levels for the integer k it appends, so the server
divides by exactly Σk. The protocol's sites send k = levels (α = 1): every
update counts equally, because a weight by image count would need the sites'
counts, which never leave them (an exact count breaks add/remove-one DP).
Values are clipped to [-r, r], multiplied by α and stochastically rounded to
{0 … levels}: unbiased, with an error below one step (2r/levels) per value
and site."""

from __future__ import annotations

import secrets

import numpy as np

from fedgan.secagg.errors import SecAggError
from fedgan.secagg.params import SecAggParams


def quantize(
    values: np.ndarray, weight: int, params: SecAggParams, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, float]:
    """(the vector to mask: length + 2 integers, the fraction of values clipped)."""
    values = np.array(values, dtype=np.float64).reshape(-1)  # a copy: worked on in place
    if values.shape[0] != params.length:
        raise SecAggError(
            f"the update has {values.shape[0]} values, the round expects {params.length}"
        )
    if not np.isfinite(values).all():
        raise SecAggError("the update holds NaN or infinite values")
    if not 1 <= weight <= params.levels:
        raise SecAggError(f"weight units {weight} must be in 1..{params.levels}")
    # Rounding noise needs no secrecy, only independence; seed it freshly.
    rng = rng or np.random.default_rng(secrets.randbits(128))
    r = params.value_range
    clipped = float(np.count_nonzero((values > r) | (values < -r))) / values.shape[0]
    np.clip(values, -r, r, out=values)
    # v ∈ [-r, r] → α·v mapped onto [0, levels], then floor(x + U[0, 1)).
    values *= (weight / params.levels) * params.levels / (2 * r)
    values += params.levels / 2
    values += rng.random(values.shape[0])
    np.floor(values, out=values)
    np.clip(values, 0, params.levels, out=values)
    q = values.astype(params.dtype)
    return np.concatenate([q, np.array([weight, 1], dtype=params.dtype)]), clipped


def dequantize_mean(
    total: np.ndarray, survivors: int, params: SecAggParams
) -> tuple[np.ndarray, int]:
    """(Σ α_i v_i / Σ α_i, Σ k_i) from the unmasked sum. The count field must
    equal the number of survivors and the weight field must be plausible:
    anything else means the masks did not cancel."""
    total = np.asarray(total, dtype=np.uint64) & np.uint64(params.modulus - 1)
    count, weight = int(total[-1]), int(total[-2])
    if count != survivors:
        raise SecAggError(
            f"unmasking failed: the count field is {count}, expected {survivors} "
            "(a share or a masked input was wrong)"
        )
    if not survivors <= weight <= survivors * params.levels:
        raise SecAggError(f"unmasking failed: the weight field {weight} is out of range")
    step = 2 * params.value_range / params.levels
    sums = total[:-2].astype(np.float64)
    # Σ α_i v_i = step·Σq − count·r ; Σ α_i = weight / levels
    mean = (sums * step - count * params.value_range) * (params.levels / weight)
    return mean, weight


def error_bound(survivors: int, weight: int, params: SecAggParams) -> float:
    """The largest possible |dequantized − exact weighted mean| per value."""
    return survivors * (2 * params.value_range / params.levels) * params.levels / weight
