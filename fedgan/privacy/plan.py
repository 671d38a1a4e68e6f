"""What one round of DP training at a site will be: σ, q, steps, δ.

The operator requests DP in the run config; the site turns the request into
numbers for its own silo (its size sets q and δ), so the accounting is the
site's, not the server's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgan.privacy.accountant import calibrate_noise, default_delta


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
) -> RoundPlan:
    """σ as requested, or calibrated so that ``rounds`` rounds of
    ``local_steps`` steps reach ``target_epsilon`` and no more."""
    sample_rate = min(1.0, batch_size / max(1, num_examples))
    delta = delta if delta > 0 else default_delta(num_examples)
    if noise_multiplier <= 0:
        noise_multiplier = calibrate_noise(
            target_epsilon, delta, sample_rate, rounds * local_steps, accountant
        )
    return RoundPlan(noise_multiplier, sample_rate, local_steps, delta, accountant, max_grad_norm)
