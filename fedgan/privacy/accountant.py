"""ε(δ) for a history of DP-SGD rounds, through Opacus's accountants.

A round is (noise multiplier σ, Poisson sampling rate q, steps). Rounds compose:
the history of every round ever spent on a silo is accounted together, so the
ε reported is the silo's total, not the last run's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Round = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def default_delta(num_examples: int) -> float:
    """δ = min(1e-5, 1/(10·n)), rounded down to a power of ten: well below
    1/n, so no single patient's record can be released outright with
    probability δ; rounded, because a site's reply carries its δ, and
    1/(10·n) itself would tell the aggregator n."""
    exact = min(1e-5, 1.0 / (10 * max(1, num_examples)))
    return 10.0 ** math.floor(math.log10(exact) + 1e-12)


@contextlib.contextmanager
def _quiet(kind: str) -> Iterator[None]:
    """PRV sizes its numerical domain with an internal RDP bound, which warns
    "Optimal order is the largest alpha" on every long history. That bound
    only sizes the grid, not ε, so under PRV the warning says nothing to a
    site; under RDP it stays (it means ε is looser than it could be). At
    sampling rate 1 (a mean-embedding release) PRV takes log(1 - q) = -inf
    inside a `where` that discards it: numpy's divide warning, not an error
    (its ε matches the exact Gaussian mechanism's; tests/unit/test_mean_embedding.py)."""
    with warnings.catch_warnings(), np.errstate(divide="ignore" if kind == "prv" else "warn"):
        if kind == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _accountant(kind: str) -> PRVAccountant | RDPAccountant:
    if kind == "prv":
        return PRVAccountant()
    if kind == "rdp":
        return RDPAccountant()
    raise ValueError(f"accountant {kind!r} is not supported; use prv or rdp")


def epsilon(history: Iterable[Round], delta: float, kind: str = "prv") -> float:
    """ε spent by ``history`` at ``delta`` (0 for an empty history)."""
    # Composition is commutative, so rounds with the same (σ, q) are one
    # entry of their summed steps. Opacus's PRV accountant costs grow faster
    # than linearly in entries (16 s for 40 rounds of a run against 0.4 s
    # merged), and a silo's ledger gains one per round for life.
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if n > 0:
            key = (float(s), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    if not steps:
        return 0.0
    if any(s <= 0 for s, _ in steps):
        return float("inf")  # a noiseless step gives no DP guarantee at all
    accountant = _accountant(kind)
    accountant.history = [(s, q, n) for (s, q), n in steps.items()]
    with _quiet(kind):
        return float(accountant.get_epsilon(delta))


# Opacus's calibration stops once ε is within this of the target, from below.
CALIBRATION_TOLERANCE = 0.01


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: str = "prv",
    hint: float | None = None,
) -> float:
    """The smallest σ whose ``steps`` steps at ``sample_rate`` stay within
    ``target_epsilon`` (the whole planned run, so budget is not overspent).

    ``hint``: a σ calibrated before (a site's earlier round of the same run;
    each round runs in a fresh process). It is used only if it passes the
    test Opacus's search stops on, ε in [target − 0.01, target], checked with
    one accounting instead of the search's dozen, each as slow as the run is
    long. A wrong or tampered hint costs that check and nothing else."""
    if target_epsilon <= 0:
        raise ValueError("target-epsilon must be > 0")
    if hint is not None and hint > 0:
        spent = epsilon([(hint, sample_rate, steps)], delta, kind)
        if target_epsilon - CALIBRATION_TOLERANCE <= spent <= target_epsilon:
            return float(hint)
    with _quiet(kind):
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
            )
        )
