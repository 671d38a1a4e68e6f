"""A site's part in a mean-embedding run, without Flower: load the silo, check
and record the privacy spend, release the noisy class-wise feature sums
(`fedgan.privacy.mean_embedding`). The ClientApp sends the release like a
DP-SGD round's update, through secure aggregation when the run has it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedgan.config.run import SiteSettings, parse_classes
from fedgan.errors import FedGanError
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.privacy.mean_embedding import FeatureMap, release
from fedgan.privacy.plan import plan_release, release_noise_figure
from fedgan.silo.options import SiloOptions
from fedgan.site.approval import Limits, check_run
from fedgan.site.round import RoundOutcome, admit_and_spend, site_images
from fedgan.update import SiteUpdate

log = logging.getLogger("fedgan.site")

MECHANISM = "mean-embedding"


class FeatureMismatch(FedGanError):
    """The site's random features are not the aggregator's."""


def release_round(
    site: SiteSettings,
    node_config: dict[str, Any],
    run_id: str,
    cfg: dict[str, Any],
    *,
    limits: Limits | None = None,
    secure: bool = False,
) -> RoundOutcome:
    """The site's one release. Its update is the release divided by its
    noisy image count (the sum of the release's noisy class counts, rounded,
    at least 1), weighted by that count, so the aggregate that FedAvg and
    secure aggregation compute (Σ wᵢxᵢ / Σ wᵢ) times Σ wᵢ is Σ releases.

    Why the noisy count and not the true one: the weight and the noise
    figure travel in the clear, and the true count would tell the
    aggregator the silo's size exactly, which the add/remove DP guarantee
    protects. The noisy count is read off the release, so it is
    post-processing and costs nothing."""
    dp = bool(cfg["dp"])
    if limits is not None:
        check_run(
            limits,
            site.site_id,
            dp=dp,
            noise_multiplier=None,
            target_epsilon=float(cfg["target-epsilon"]),
            secure_aggregation=secure,
        )
    classes = parse_classes(str(cfg["classes"]))
    size, channels = int(cfg["image-size"]), int(cfg["channels"])
    phi = FeatureMap(
        pixels=channels * size * size,
        features=int(cfg["embedding-features"]),
        length_scale=float(cfg["embedding-length-scale"]),
        seed=int(cfg["embedding-seed"]),
    )
    if phi.digest() != str(cfg["embedding-digest"]):
        raise FeatureMismatch(
            f"site {site.site_id}: the random features drawn here differ from the "
            "aggregator's (a different torch build draws other numbers from the same seed); "
            "run the site image of the aggregator's FedGAN release"
        )
    server_round = int(cfg["round"])
    images, labels, _ = site_images(
        site, SiloOptions.from_mapping(site.kind, size, channels, node_config), classes
    )
    n = images.shape[0]
    run_name = str(cfg["run-name"]) or run_id
    ledger = PrivacyLedger.in_work_dir(Path(site.work_dir))
    metrics: dict[str, float] = {}
    sigma = 0.0
    spend = None
    if dp:
        plan = plan_release(
            noise_multiplier=float(cfg["noise-multiplier"]),
            target_epsilon=float(cfg["target-epsilon"]),
            delta=float(cfg["delta"]),
            accountant=str(cfg["accountant"]),
            num_examples=n,
            noise_hint=ledger.latest_noise(run_name),
        )
        spend = admit_and_spend(
            site,
            ledger,
            plan,
            run_name,
            server_round,
            limits,
            float(cfg["target-epsilon"]),
            secure,
            mechanism=MECHANISM,
        )
        if isinstance(spend, RoundOutcome):
            return spend
        sigma = plan.noise_multiplier
        metrics.update(
            {
                "epsilon": spend.epsilon_after,
                "epsilon-budget": site.epsilon_budget,
                "delta": plan.delta,
                "noise-multiplier": sigma,
                "sample-rate": 1.0,
            }
        )
    started = time.perf_counter()
    values = release(phi, images, labels, len(classes), sigma)
    if spend is not None:
        ledger.complete(run=spend.run, server_round=server_round)
    weight = noisy_count(values)
    if dp:
        rows = max(len(classes), 1)
        metrics["noise-figure"] = release_noise_figure(sigma, rows * (phi.width + 1), weight)
    seconds = time.perf_counter() - started
    metrics["train-seconds"] = seconds
    log.info(
        "site %s round %d: released the mean embedding of %d images (%d values) in %.1f s%s",
        site.site_id,
        server_round,
        n,
        values.size,
        seconds,
        f", σ {sigma:.3f}, ε {metrics['epsilon']:.3f}" if dp else " (no DP)",
    )
    update = SiteUpdate(gen=[(values / weight).astype(np.float32)], disc=[], weight=weight)
    return RoundOutcome(update, metrics)


def noisy_count(values: np.ndarray) -> float:
    """The release's own image count: the sum of its noisy class counts,
    rounded, at least 1 (noise can push a tiny silo's to zero or below)."""
    return float(max(1, round(float(values[:, -1].sum()))))
