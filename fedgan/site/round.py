"""One round at a site, without Flower: load the silo, check and record the
privacy spend, train, clip the update. The ClientApp only translates messages
to and from this."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgan import timeline
from fedgan.attributes import Attribute, read_site_attributes
from fedgan.attributes import parse as parse_attributes
from fedgan.attributes import sample as sample_attributes
from fedgan.config.round import RoundConfig
from fedgan.config.run import SiteSettings
from fedgan.gan.models import Discriminator, build, trainable_parameters
from fedgan.privacy.ledger import BudgetExhausted
from fedgan.privacy.plan import noise_to_signal
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.site.admission import Admission, admit, check_limits, check_start, preflight
from fedgan.site.approval import Limits
from fedgan.train import DPConfig, TrainConfig, resolve_device, train_local
from fedgan.update import Contribution, clip_update, make_update
from fedgan.weights import get_arrays, set_arrays

log = logging.getLogger("fedgan.site")


@dataclass
class RoundOutcome:
    update: Contribution | None  # None: the site refused for budget
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: BudgetExhausted | None = None


def site_images(
    site: SiteSettings,
    opts: SiloOptions,
    classes: tuple[str, ...] = (),
    attrs: tuple[Attribute, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The site's images, and for a conditional run their class indices,
    for an attribute-conditioned run their attribute vectors (images without
    one of the run's classes, or without usable attributes, are left out),
    through the preprocessing cache in its work dir (each round runs in a
    fresh ClientApp process). Logs counts only."""
    data = load_silo(Path(site.data_dir), opts, cache_dir=Path(site.work_dir) / "cache")
    report = data.require_images(f"site {site.site_id}'s silo").report
    log.info(
        "site %s: %d images (%s), %d files skipped",
        site.site_id,
        report.images,
        "cached" if report.cached else "read",
        len(report.skipped),
    )
    keep = list(range(len(data.labels)))
    index = {c: i for i, c in enumerate(classes)}
    if classes:
        keep = [i for i in keep if data.labels[i] in index]
        if not keep:
            raise SiloError(
                f"site {site.site_id}: no image carries one of the run's classes "
                f"({', '.join(classes)}); check the silo's labels"
            )
    vectors = None
    if attrs:
        table = read_site_attributes(Path(site.data_dir), site.kind, attrs)
        keep = [i for i in keep if data.keys[i] in table]
        if not keep:
            raise SiloError(
                f"site {site.site_id}: no image has usable {', '.join(a.name for a in attrs)} "
                "in attributes.csv"
            )
        vectors = torch.from_numpy(np.stack([table[data.keys[i]] for i in keep]))
    if len(keep) < len(data.labels):
        log.info(
            "site %s: %d images without the run's classes or attributes left out",
            site.site_id,
            len(data.labels) - len(keep),
        )
    images = torch.from_numpy(data.as_float())
    if len(keep) < len(data.labels):
        images = images[keep]
    labels = (
        torch.tensor([index[data.labels[i]] for i in keep], dtype=torch.long) if classes else None
    )
    return images, labels, vectors


def _progress(site_id: str, server_round: int):
    """The site's progress bar: a log line at every tenth of the round (the
    ClientApp has no terminal; its log is what the site's operator watches)."""
    start = time.perf_counter()

    def report(step: int, total: int) -> None:
        if step == total or step % max(1, total // 10) == 0:
            done = step / total
            bar = "#" * round(20 * done) + "." * (20 - round(20 * done))
            elapsed = time.perf_counter() - start
            log.info(
                "site %s round %d [%s] %d/%d steps, %.1f s",
                site_id,
                server_round,
                bar,
                step,
                total,
                elapsed,
            )

    return report


def preflight_round(
    site: SiteSettings,
    node_config: dict[str, Any],
    run_id: str,
    cfg: RoundConfig,
    limits: Limits | None,
) -> BudgetExhausted | None:
    """Before a secure round's keys: every refusal `run_round` or
    `fedgan.site.release.release_round` would make before spending (limits,
    the DP plan, the noise figure, the budget), made now from the silo's
    size, without training or writing the ledger. Raises `AppRefused`;
    returns a budget refusal, or None."""
    check_limits(limits, site.site_id, cfg, True, sigma=None)
    options = SiloOptions.from_mapping(
        site.kind, cfg.model.image_size, cfg.model.channels, node_config
    )
    attrs = () if cfg.privacy.mean_embedding else parse_attributes(cfg.model.attributes)
    images, _, _ = site_images(site, options, cfg.model.classes, attrs)
    parameters = (
        None if cfg.privacy.mean_embedding else trainable_parameters(build(cfg.model.spec())[1])
    )
    return preflight(
        site, cfg, images.shape[0], run_id=run_id, limits=limits, parameters=parameters
    )


def run_round(
    site: SiteSettings,
    node_config: dict[str, Any],
    run_id: str,
    cfg: RoundConfig,
    global_gen: list[np.ndarray],
    global_disc: list[np.ndarray],
    *,
    limits: Limits | None = None,
    secure: bool = False,
) -> RoundOutcome:
    """``limits``: the site's own (`fedgan.site.approval`); a run weaker than
    them raises `AppRefused` before anything is trained or recorded."""
    check_limits(limits, site.site_id, cfg, secure, sigma=None)  # before the silo is read
    check_start(site, cfg, global_gen, global_disc, limits)
    attrs = parse_attributes(cfg.model.attributes)
    gen, disc = build(cfg.model.spec())
    set_arrays(gen, global_gen)
    set_arrays(disc, global_disc)
    options = SiloOptions.from_mapping(
        site.kind, cfg.model.image_size, cfg.model.channels, node_config
    )
    images, labels, vectors = site_images(site, options, cfg.model.classes, attrs)
    timeline.mark("site.silo", site=site.site_id, round=cfg.round)
    train_cfg = _train_config(cfg, site, images.shape[0])
    admission = admit(
        site,
        cfg,
        images.shape[0],
        run_id=run_id,
        limits=limits,
        secure=secure,
        parameters=trainable_parameters(disc),
    )
    if not admission.admitted:
        return RoundOutcome(None, refusal=admission.refusal)
    dp, metrics = _dp(site, cfg, admission, images.shape[0], disc)
    timeline.mark("site.admitted", site=site.site_id, round=cfg.round)
    result = train_local(
        gen,
        disc,
        images,
        train_cfg,
        device=resolve_device(site.device),
        dp=dp,
        progress=_progress(site.site_id, cfg.round),
        labels=labels,
        attributes=vectors,
        sample_attributes=(lambda n, g: sample_attributes(attrs, n, g)) if attrs else None,
    )
    timeline.mark("site.steps", site=site.site_id, round=cfg.round)
    admission.complete()
    # Every site's update counts once: weighting by image count would send
    # the exact count, which DP does not cover (the site's log keeps it).
    update = make_update(get_arrays(gen), get_arrays(disc), global_gen, global_disc, 1)
    update, clipped, norm = clip_update(update, cfg.privacy.update_clip)
    metrics |= {
        "g-loss": result.g_loss,
        # D's loss on generated images: the real half is not DP and stays here.
        "d-loss": result.d_loss_generated,
        "mode-seeking-loss": result.mode_seeking_loss,
        "train-seconds": result.seconds,
        "update-norm": norm,
        "update-clipped": float(clipped),
    }
    _log_trained(site.site_id, cfg.round, result, metrics)
    return RoundOutcome(update, metrics)


def _train_config(cfg: RoundConfig, site: SiteSettings, images: int) -> TrainConfig:
    t = cfg.local
    return TrainConfig(
        local_steps=t.steps_for(images),
        batch_size=t.batch_for(images),
        lr_g=t.lr_g,
        lr_d=t.lr_d,
        seed=t.seed,
        prox_mu=t.prox_mu,
        precision=site.precision,
        cond_lambda=t.cond_lambda,
        mode_seeking=t.mode_seeking,
        d_steps_per_g=t.d_steps_per_g,
        adaptive_d=t.adaptive_d,
        g_ema=t.g_ema,
    )


def _dp(
    site: SiteSettings, cfg: RoundConfig, admission: Admission, images: int, disc: Discriminator
) -> tuple[DPConfig | None, dict[str, float]]:
    """The trainer's DP settings from the admitted plan, and the numbers the
    reply carries about them."""
    plan, spend = admission.plan, admission.spend
    if plan is None or spend is None:
        return None, {}
    noise_figure = noise_to_signal(
        plan.noise_multiplier, plan.sample_rate * images, trainable_parameters(disc)
    )
    log.info(
        "site %s round %d: DP σ %.3f, q %.4f; each step's noise is %.1f× the largest "
        "clipped real-image gradient (fedgan site plan)",
        site.site_id,
        cfg.round,
        plan.noise_multiplier,
        plan.sample_rate,
        noise_figure,
    )
    metrics = {
        "epsilon": spend.epsilon_after,
        "epsilon-budget": site.epsilon_budget,
        "delta": spend.delta,  # the δ its ε is at: the site's
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
        # A number about the silo's size, not its content (docs/privacy.md).
        "noise-figure": noise_figure,
    }
    return DPConfig(plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate), metrics


def _log_trained(site_id: str, server_round: int, result: Any, metrics: dict[str, float]) -> None:
    log.info(
        "site %s round %d: %d G steps and %d D steps on %d images in %.1f s; G loss %.3f, "
        "D loss %.3f (%.3f on generated images, the part sent)%s",
        site_id,
        server_round,
        result.steps,
        result.d_steps,
        result.examples,
        result.seconds,
        result.g_loss,
        result.d_loss,
        result.d_loss_generated,
        f", ε {metrics['epsilon']:.3f}" if "epsilon" in metrics else " (no DP)",
    )
