"""A site's part in a mean-embedding run, without Flower: load the silo, check
and record the privacy spend, release the noisy class-wise feature sums
(`fedgan.privacy.mean_embedding`). The ClientApp sends the release like a
DP-SGD round's update, through secure aggregation when the run has it."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedgan.config.round import RoundConfig
from fedgan.config.run import SiteSettings
from fedgan.errors import FedGanError
from fedgan.privacy.mean_embedding import FeatureMap, release
from fedgan.privacy.plan import release_noise_figure
from fedgan.silo.options import SiloOptions
from fedgan.site.admission import admit, check_limits
from fedgan.site.approval import Limits
from fedgan.site.round import RoundOutcome, site_images
from fedgan.update import Release

log = logging.getLogger("fedgan.site")


class FeatureMismatch(FedGanError):
    """The site's random features are not the aggregator's."""


def release_round(
    site: SiteSettings,
    node_config: dict[str, Any],
    run_id: str,
    cfg: RoundConfig,
    *,
    limits: Limits | None = None,
    secure: bool = False,
) -> RoundOutcome:
    """The site's one release. Its update is the release divided by its
    noisy image count (the sum of the release's noisy class counts, rounded,
    at least 1), weighted by that count in a plain round, so that the
    aggregate (Σ wᵢxᵢ / Σ wᵢ) times Σ wᵢ is Σ releases. Under secure
    aggregation every site counts equally (no weight is known before the
    sites mask), so the aggregate is the mean of the sites' normalised
    releases: each hospital's images weigh as a whole, whatever their number,
    and the class counts the aggregator reports are estimates.

    Why the noisy count and not the true one: the weight and the noise
    figure travel in the clear, and the true count would tell the
    aggregator the silo's size exactly, which the add/remove DP guarantee
    protects. The noisy count is read off the release, so it is
    post-processing and costs nothing."""
    check_limits(limits, site.site_id, cfg, secure, sigma=None)  # before the silo is read
    phi = _features(site, cfg)
    size, channels = cfg.model.image_size, cfg.model.channels
    images, labels, _ = site_images(
        site, SiloOptions.from_mapping(site.kind, size, channels, node_config), cfg.model.classes
    )
    n = images.shape[0]
    admission = admit(site, cfg, n, run_id=run_id, limits=limits, secure=secure)
    if not admission.admitted:
        return RoundOutcome(None, refusal=admission.refusal)
    plan, spend = admission.plan, admission.spend
    sigma = plan.noise_multiplier if plan is not None else 0.0
    started = time.perf_counter()
    values = release(phi, images, labels, len(cfg.model.classes), sigma)
    admission.complete()
    weight = noisy_count(values)
    metrics: dict[str, float] = {}
    if plan is not None and spend is not None:
        rows = max(len(cfg.model.classes), 1)
        metrics = {
            "epsilon": spend.epsilon_after,
            "epsilon-budget": site.epsilon_budget,
            "delta": spend.delta,
            "noise-multiplier": sigma,
            "sample-rate": 1.0,
            "noise-figure": release_noise_figure(sigma, rows * (phi.width + 1), weight),
        }
    metrics["train-seconds"] = seconds = time.perf_counter() - started
    log.info(
        "site %s round %d: released the mean embedding of %d images (%d values) in %.1f s%s",
        site.site_id,
        cfg.round,
        n,
        values.size,
        seconds,
        f", σ {sigma:.3f}, ε {metrics['epsilon']:.3f}" if "epsilon" in metrics else " (no DP)",
    )
    return RoundOutcome(Release((values / weight).astype(np.float32), weight), metrics)


def _features(site: SiteSettings, cfg: RoundConfig) -> FeatureMap:
    """The run's random features, drawn here from their public seed and
    checked against the aggregator's by hash."""
    m = cfg.model
    phi = FeatureMap(
        pixels=m.channels * m.image_size * m.image_size,
        features=cfg.privacy.embedding_features,
        length_scale=cfg.privacy.embedding_length_scale,
        seed=cfg.embedding_seed,
    )
    if phi.digest() != cfg.embedding_digest:
        raise FeatureMismatch(
            f"site {site.site_id}: the random features drawn here differ from the "
            "aggregator's (a different torch build draws other numbers from the same seed); "
            "run the site image of the aggregator's FedGAN release"
        )
    return phi


def noisy_count(values: np.ndarray) -> float:
    """The release's own image count: the sum of its noisy class counts,
    rounded, at least 1 (noise can push a tiny silo's to zero or below)."""
    return float(max(1, round(float(values[:, -1].sum()))))
