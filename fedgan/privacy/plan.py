"""What one round of DP training at a site will be: σ, q, steps, δ.

The operator requests DP in the run config; the site turns the request into
numbers for its own silo (its size sets q and δ), so the accounting is the
site's, not the server's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedgan.privacy.accountant import Round, calibrate_noise, default_delta, epsilon
from fedgan.privacy.mean_embedding import SENSITIVITY


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    max_grad_norm: float

    @property
    def as_round(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan_round(
    *,
    noise_multiplier: float,
    target_epsilon: float,
    max_grad_norm: float,
    delta: float,
    accountant: str,
    num_examples: int,
    batch_size: int,
    local_steps: int,
    rounds: int,
    noise_hint: float | None = None,
) -> RoundPlan:
    """σ as requested, or calibrated so that ``rounds`` rounds of
    ``local_steps`` steps reach ``target_epsilon`` and no more (``noise_hint``:
    see `calibrate_noise`)."""
    sample_rate = min(1.0, batch_size / max(1, num_examples))
    delta = delta if delta > 0 else default_delta(num_examples)
    if noise_multiplier <= 0:
        noise_multiplier = calibrate_noise(
            target_epsilon, delta, sample_rate, rounds * local_steps, accountant, noise_hint
        )
    return RoundPlan(noise_multiplier, sample_rate, local_steps, delta, accountant, max_grad_norm)


def plan_release(
    *,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    accountant: str,
    num_examples: int,
    noise_hint: float | None = None,
) -> RoundPlan:
    """A mean-embedding release (`fedgan.privacy.mean_embedding`): every image
    once, so q = 1 and one step, with the release's sensitivity √2 in place
    of a clipping norm."""
    return plan_round(
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        max_grad_norm=SENSITIVITY,
        delta=delta,
        accountant=accountant,
        num_examples=num_examples,
        batch_size=num_examples,
        local_steps=1,
        rounds=1,
        noise_hint=noise_hint,
    )


def noise_to_signal(noise_multiplier: float, expected_batch: float, parameters: int) -> float:
    """σ·√d / B: the norm of one step's noise over the largest norm the
    clipped real-image gradient sum can have (B images, each clipped to C; the
    noise is N(0, σ²C²) on each of D's d weights, so C cancels). Above ~10 the
    signal survives only by averaging over many steps; it is the number that
    says whether a silo is large enough for the ε it is asked to meet."""
    if expected_batch <= 0 or parameters <= 0:
        raise ValueError("expected batch and parameter count must be > 0")
    return noise_multiplier * math.sqrt(parameters) / expected_batch


def release_noise_figure(noise_multiplier: float, values: int, examples: int) -> float:
    """‖noise‖ / largest ‖signal‖ of a mean-embedding release
    (`fedgan.privacy.mean_embedding`): σ·√2·√values over n·√2 (n images'
    feature sums have norm at most n, their counts n). DP-SGD's figure
    (`noise_to_signal`) asks the same of one of its many steps, whose noise
    later steps partly average away; the release is noised once and nothing
    averages it (docs/privacy.md)."""
    return noise_multiplier * math.sqrt(values) / max(1, examples)


@dataclass(frozen=True)
class RunForecast:
    """What a whole run would spend on one silo, given its ledger so far."""

    epsilon_before: float  # the silo's ledger before the run
    epsilon_after: float  # after every planned round (a site sampled every round)
    # The first round the site would refuse as over budget; None if all fit.
    refused_from: int | None


def forecast_run(
    plan: RoundPlan,
    rounds: int,
    history: Sequence[Round],
    budget: float,
    delta: float = 0.0,
) -> RunForecast:
    """Compose the ledger's history with the planned rounds, as the site's
    budget check will (at the site's ``delta``; 0: the plan's), round by
    round. Calibration aims the run alone at the target ε, so a silo that
    already spent budget in earlier runs runs out part-way; this says at
    which round, before any of it is spent."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    delta = delta or plan.delta

    def after(k: int) -> float:
        return epsilon([*history, *[plan.as_round] * k], delta, plan.accountant)

    before, final = after(0), after(rounds)
    refused = None
    if final > budget:
        # ε grows with every round, so bisect for the first one over budget.
        low, high = 0, rounds  # after(low) <= budget (or low = 0), after(high) > budget
        while high - low > 1:
            middle = (low + high) // 2
            if after(middle) > budget:
                high = middle
            else:
                low = middle
        refused = high
    return RunForecast(before, final, refused)
