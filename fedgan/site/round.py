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

from fedgan.attributes import Attribute, read_site_attributes
from fedgan.attributes import parse as parse_attributes
from fedgan.attributes import sample as sample_attributes
from fedgan.attributes import width as attribute_width
from fedgan.config.run import SiteSettings, parse_classes, resolve_device, site_local_steps
from fedgan.gan.models import GanSpec, build, trainable_parameters
from fedgan.privacy.ledger import BudgetExhausted, PrivacyLedger, Spend
from fedgan.privacy.plan import RoundPlan, noise_to_signal, plan_round
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.site.approval import Limits, check_run
from fedgan.train import DPConfig, TrainConfig, train_local
from fedgan.update import SiteUpdate, clip_update, make_update
from fedgan.weights import get_arrays, set_arrays

log = logging.getLogger("fedgan.site")


@dataclass
class RoundOutcome:
    update: SiteUpdate | None
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: BudgetExhausted | None = None


def admit_and_spend(
    site: SiteSettings,
    ledger: PrivacyLedger,
    plan: RoundPlan,
    run_name: str,
    server_round: int,
    limits: Limits | None,
    target_epsilon: float,
    secure: bool,
    mechanism: str = "dp-sgd",
) -> Spend | RoundOutcome:
    """Before anything private is computed: the site's limits against the
    planned σ (raises `AppRefused`), then the write-ahead spend in the ledger.
    Returns the spend, or the budget refusal to reply with (nothing recorded)."""
    if limits is not None:
        check_run(
            limits,
            site.site_id,
            dp=True,
            noise_multiplier=plan.noise_multiplier,
            target_epsilon=target_epsilon,
            secure_aggregation=secure,
        )
    try:
        return ledger.spend(
            run=run_name,
            server_round=server_round,
            round_=plan.as_round,
            delta=plan.delta,
            budget=site.epsilon_budget,
            accountant=plan.accountant,
            mechanism=mechanism,
        )
    except BudgetExhausted as refusal:
        log.warning("site %s round %d: %s", site.site_id, server_round, refusal)
        return RoundOutcome(None, refusal=refusal)


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


def run_round(
    site: SiteSettings,
    node_config: dict[str, Any],
    run_id: str,
    cfg: dict[str, Any],
    global_gen: list[np.ndarray],
    global_disc: list[np.ndarray],
    *,
    limits: Limits | None = None,
    secure: bool = False,
) -> RoundOutcome:
    """``limits``: the site's own (`fedgan.site.approval`); a run weaker than them
    raises `AppRefused` before anything is trained or recorded."""
    if limits is not None:
        # Before the silo is read: what needs no calibration (σ is checked
        # once the plan has it).
        check_run(
            limits,
            site.site_id,
            dp=bool(cfg["dp"]),
            noise_multiplier=None,
            target_epsilon=float(cfg["target-epsilon"]),
            secure_aggregation=secure,
        )
    classes = parse_classes(str(cfg["classes"]))
    attrs = parse_attributes(str(cfg.get("attributes", "")))
    spec = GanSpec(
        image_size=int(cfg["image-size"]),
        channels=int(cfg["channels"]),
        latent_dim=int(cfg["latent-dim"]),
        width=int(cfg["width"]),
        num_classes=len(classes),
        attr_dim=attribute_width(attrs),
    )
    server_round = int(cfg["round"])
    gen, disc = build(spec)
    set_arrays(gen, global_gen)
    set_arrays(disc, global_disc)
    images, labels, vectors = site_images(
        site,
        SiloOptions.from_mapping(site.kind, spec.image_size, spec.channels, node_config),
        classes,
        attrs,
    )
    batch = int(cfg["batch-size"])
    train_cfg = TrainConfig(
        local_steps=site_local_steps(
            images.shape[0], batch, float(cfg["local-epochs"]), int(cfg["local-steps"])
        ),
        batch_size=batch,
        lr_g=float(cfg["lr-g"]),
        lr_d=float(cfg["lr-d"]),
        seed=int(cfg["seed"]),
        prox_mu=float(cfg["prox-mu"]),
        precision=site.precision,
        cond_lambda=float(cfg.get("cond-lambda", 1.0)),
        mode_seeking=float(cfg.get("mode-seeking", 0.0)),
    )
    metrics: dict[str, float] = {}
    dp = None
    ledger = PrivacyLedger.in_work_dir(Path(site.work_dir))
    if bool(cfg["dp"]):
        run_name = str(cfg["run-name"]) or run_id
        plan = plan_round(
            noise_multiplier=float(cfg["noise-multiplier"]),
            target_epsilon=float(cfg["target-epsilon"]),
            max_grad_norm=float(cfg["max-grad-norm"]),
            delta=float(cfg["delta"]),
            accountant=str(cfg["accountant"]),
            num_examples=images.shape[0],
            batch_size=train_cfg.batch_size,
            local_steps=train_cfg.local_steps,
            rounds=int(cfg["rounds"]),
            noise_hint=ledger.latest_noise(run_name),
        )
        spend = admit_and_spend(
            site, ledger, plan, run_name, server_round, limits, float(cfg["target-epsilon"]), secure
        )
        if isinstance(spend, RoundOutcome):
            return spend
        dp = DPConfig(plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate)
        noise_figure = noise_to_signal(
            plan.noise_multiplier, plan.sample_rate * images.shape[0], trainable_parameters(disc)
        )
        log.info(
            "site %s round %d: DP σ %.3f, q %.4f; each step's noise is %.1f× the largest "
            "clipped real-image gradient (fedgan site plan)",
            site.site_id,
            server_round,
            plan.noise_multiplier,
            plan.sample_rate,
            noise_figure,
        )
        metrics.update(
            {
                "epsilon": spend.epsilon_after,
                "epsilon-budget": site.epsilon_budget,
                "delta": plan.delta,
                "noise-multiplier": plan.noise_multiplier,
                "sample-rate": plan.sample_rate,
                # A number about the silo's size, not its content (README, Privacy).
                "noise-figure": noise_figure,
            }
        )
    result = train_local(
        gen,
        disc,
        images,
        train_cfg,
        device=resolve_device(site.device),
        dp=dp,
        progress=_progress(site.site_id, server_round),
        labels=labels,
        attributes=vectors,
        sample_attributes=(lambda n, g: sample_attributes(attrs, n, g)) if attrs else None,
    )
    if dp is not None:
        ledger.complete(run=spend.run, server_round=server_round)
    update = make_update(
        get_arrays(gen), get_arrays(disc), global_gen, global_disc, result.examples
    )
    update, clipped, norm = clip_update(update, float(cfg["update-clip"]))
    metrics.update(
        {
            "g-loss": result.g_loss,
            "d-loss": result.d_loss,
            "mode-seeking-loss": result.mode_seeking_loss,
            "train-seconds": result.seconds,
            "update-norm": norm,
            "update-clipped": float(clipped),
        }
    )
    log.info(
        "site %s round %d: %d steps on %d images in %.1f s%s",
        site.site_id,
        server_round,
        result.steps,
        result.examples,
        result.seconds,
        f", ε {metrics['epsilon']:.3f}" if "epsilon" in metrics else " (no DP)",
    )
    return RoundOutcome(update, metrics)
