"""One round as the run store keeps it: a line of ``metrics.jsonl``.

Typed here so that the round builds it field by field and a typo fails at
once; the readers (report, exporter, audit, progress lines) read the JSON
lines as plain dicts, so a field that is None is left out of the line, as it
was before this type existed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    round: int
    sites: list[str] = field(default_factory=list)  # whose updates are in the model
    sites_sampled: int = 0
    sites_available: int = 0
    sites_failed: int = 0  # errors and timeouts; a refusal is not a failure
    refused: dict[str, str] | None = None  # by the sites' own policies
    failures: list[str] | None = None
    # Privacy, as the sites report it (numbers only).
    epsilon: dict[str, float] | None = None
    epsilon_budget: dict[str, float] | None = None
    noise_figure: dict[str, float] | None = None  # plain rounds: each site's
    # Secure rounds: the geometric mean over the sum's sites (one site's
    # figure would tell its batch, and an automatic batch its image count).
    noise_figure_mean: float | None = None
    budget_exhausted: dict[str, dict[str, float]] | None = None
    # Secure aggregation.
    secagg: dict[str, Any] | None = None
    secagg_error_bound: float | None = None
    secagg_clipped_fraction: float | None = None  # mean over the sum's sites
    # What the round produced.
    examples: float | None = None
    update_bytes: dict[str, int] | None = None
    # The sites' means (secure rounds: unmasked with the sum). D's loss is on
    # generated images only: its real-image half is not DP and stays at the
    # site.
    g_loss: float | None = None
    d_loss: float | None = None
    mode_seeking_loss: float | None = None
    update_norm: float | None = None  # geometric mean in secure rounds
    updates_clipped: int | None = None
    # A mean-embedding round: G fitted to the sum of the sites' releases.
    mechanism: str | None = None
    fit_loss_first: float | None = None
    fit_steps: int | None = None
    fit_seconds: float | None = None
    fit_resumed_at: int | None = None
    class_counts: dict[str, float] | None = None
    class_noise_figure: dict[str, float] | None = None
    release_kept: bool | None = None  # fitted to the sum kept before a stop
    skipped: str | None = None  # why the model is unchanged
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(**data)
