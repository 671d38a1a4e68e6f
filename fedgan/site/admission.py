"""One admission, before anything private is computed, for every mechanism
and for `fedgan site plan`: the round's DP plan for this silo, the site's
limits against it, and the write-ahead spend in the site's ledger.

The plan a site previews (`fedgan.site.plan`) is made by `plan_for`, the
same function the round runs, so the preview cannot drift from the code."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgan.atomic import write_atomic, write_text_atomic
from fedgan.config.round import RoundConfig
from fedgan.config.run import SiteSettings
from fedgan.model_init import weights_sha256
from fedgan.privacy.accountant import default_delta, epsilon
from fedgan.privacy.ledger import BudgetExhausted, PrivacyLedger, Spend
from fedgan.privacy.plan import RoundPlan, noise_to_signal, plan_release, plan_round
from fedgan.site.approval import AppRefused, Limits, check_run

log = logging.getLogger("fedgan.site")


def site_delta(
    site_id: str,
    configured: float,
    cfg: RoundConfig,
    images: int,
    recorded: Sequence[float] = (),
) -> float:
    """The δ this site accounts every spend at: its own (node config
    ``delta``), or `default_delta` of its silo's size, never the run's; and
    never above a δ its ledger already accounted at (``recorded``): ε at a
    larger δ is smaller, so a δ that rose (a run filtering the silo to a few
    images, a site raising DELTA) would re-read the whole history as cheaper.
    A run asking for a larger δ is refused; one asking for a smaller δ is
    planned at it (more noise) and accounted at the site's."""
    own = min([configured or default_delta(images), *recorded])
    asked = cfg.privacy.delta
    if asked > own:
        source = "node config delta" if configured else "from its silo's size"
        raise AppRefused(
            site_id,
            f"the run asks for δ {asked:g}, but this site accounts every spend at δ {own:g} "
            f"({source}); ε at a larger δ would understate what it spends. Run with delta "
            f"at most {own:g}, or 0 for each site's own",
        )
    return own


def plan_for(
    cfg: RoundConfig, images: int, noise_hint: float | None = None, site: float = 0.0
) -> RoundPlan | None:
    """The round's DP plan for a silo of ``images`` images (None without DP),
    at the run's δ, or at ``site``'s (see `site_delta`) when the run leaves
    it to the sites. A mean-embedding release reads every image once (q = 1,
    one step)."""
    p = cfg.privacy
    if not p.enabled:
        return None
    delta = p.delta or site
    if p.mean_embedding:
        return plan_release(
            noise_multiplier=p.noise_multiplier,
            target_epsilon=p.target_epsilon,
            delta=delta,
            accountant=p.accountant,
            num_examples=images,
            noise_hint=noise_hint,
        )
    return plan_round(
        noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon,
        max_grad_norm=p.max_grad_norm,
        delta=delta,
        accountant=p.accountant,
        num_examples=images,
        batch_size=cfg.local.batch_for(images),
        local_steps=cfg.local.d_steps_for(images),
        rounds=cfg.rounds,
        noise_hint=noise_hint,
    )


def check_plan(
    site_id: str,
    cfg: RoundConfig,
    plan: RoundPlan,
    images: int,
    parameters: int | None = None,
    max_figure: float | None = None,
) -> None:
    """Refuse a DP-SGD round that would read the whole silo at every step
    (sampling rate 1): its privacy rests on noise alone, with no
    amplification from sampling, and on a silo this small the noise drowns
    what D could learn (a random walk, and G fools it with anything); and,
    given D's ``parameters`` and the site's ``max_figure``, one whose noise
    figure is above it. Raised before the ledger is written, so the refusal
    costs the site nothing. A mean-embedding release reads every image once
    by design: exempt."""
    if cfg.privacy.mean_embedding:
        return
    if plan.sample_rate < 1:
        if parameters is not None and max_figure is not None:
            _check_noise(site_id, plan, images, parameters, max_figure)
        return
    batch = cfg.local.batch_for(images)
    raise AppRefused(
        site_id,
        f"the run's batch of {batch} would read this silo's {images} usable images whole at "
        f"every step (sampling rate 1, no privacy from sampling); a DP round needs more than "
        f"{batch} images here (the more, the less noise), or a run with batch-size below {images}",
    )


def _check_noise(
    site_id: str, plan: RoundPlan, images: int, parameters: int, max_figure: float
) -> None:
    """Refuse a round whose every step's noise would drown what the silo's
    images could teach D (σ·√d over the expected batch; `fedgan site plan`
    prints it). With a fixed batch the figure falls about as 1/N (σ is
    calibrated ∝ q = batch/N), which gives the images it would need."""
    figure = noise_to_signal(plan.noise_multiplier, plan.sample_rate * images, parameters)
    if figure <= max_figure:
        return
    needed = math.ceil(images * figure / max_figure)
    raise AppRefused(
        site_id,
        f"each DP step's noise would be {figure:.0f}× the strongest signal of this silo's "
        f"{images} images (this site trains up to {max_figure:g}×); this run needs about "
        f"{needed} images here, or a larger batch-size (0: half the silo, up to 128), fewer "
        "rounds or steps, a larger target ε or a smaller model",
    )


def check_limits(
    limits: Limits | None, site_id: str, cfg: RoundConfig, secure: bool, sigma: float | None
) -> None:
    """The site's own limits (`fedgan.site.approval`): raises `AppRefused`
    for a run weaker than them. ``sigma`` None: before the silo is read,
    what needs no calibration."""
    if limits is not None:
        check_run(
            limits,
            site_id,
            dp=cfg.privacy.enabled,
            noise_multiplier=sigma,
            target_epsilon=cfg.privacy.target_epsilon,
            secure_aggregation=secure,
            init_sha256=cfg.init_sha256,
        )


def check_start(
    site: SiteSettings,
    cfg: RoundConfig,
    gen: list[np.ndarray],
    disc: list[np.ndarray],
    limits: Limits | None,
) -> None:
    """The model a run starts from, checked where the site can check it: in
    round 1 the global model is the declared pretrained init, or without one
    the random weights of the run's seed, so a model that hashes to neither
    is refused. A site whose policy refuses or pins inits must have made
    that check itself: it records it per run, and refuses a later round of
    a run whose round 1 it did not see (it cannot tell what the run started
    from, and the aggregator's word is not enough)."""
    strict = limits is not None and (limits.refuse_init or bool(limits.init_hashes))
    marker = _start_marker(site, cfg.run_name)
    if cfg.round != 1:
        if strict and not marker.exists():
            raise AppRefused(
                site.site_id,
                f"this site checks the model a run starts from in its round 1; it was not "
                f"asked in round 1 of run {cfg.run_name!r}, so it cannot (with fraction-sites 1 "
                "every site trains round 1)",
            )
        return
    if not (cfg.init_sha256 or strict):
        return  # nothing declared, nothing pinned: no need to hash the model
    received = weights_sha256(gen, disc)
    if cfg.init_sha256 and received != cfg.init_sha256:
        raise AppRefused(
            site.site_id,
            f"round 1's global model is not the pretrained init {cfg.init_sha256} the run "
            "declares (its weights hash differently)",
        )
    if not cfg.init_sha256 and strict and received != _random_start(cfg):
        raise AppRefused(
            site.site_id,
            "round 1's global model is neither a declared pretrained init nor the random "
            f"weights of the run's seed {cfg.embedding_seed}; this site's policy checks inits",
        )
    if strict:
        write_text_atomic(marker, received + "\n")


def _start_marker(site: SiteSettings, run_name: str) -> Path:
    # The run's name comes from the aggregator: hashed, never a path.
    digest = hashlib.sha256(run_name.encode()).hexdigest()[:32]
    return Path(site.work_dir) / "verified-starts" / digest


def _random_start(cfg: RoundConfig) -> str:
    from fedgan.gan.models import build
    from fedgan.weights import get_arrays

    gen, disc = build(cfg.model.spec(), seed=cfg.embedding_seed)
    return weights_sha256(get_arrays(gen), get_arrays(disc))


@dataclass(frozen=True)
class Admission:
    plan: RoundPlan | None = None  # None: the run has no DP
    spend: Spend | None = None  # recorded ahead; `complete` once the release is made
    refusal: BudgetExhausted | None = None  # the site's budget would be passed
    ledger: PrivacyLedger | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None

    def complete(self) -> None:
        """Mark the written-ahead spend as released (nothing without DP)."""
        if self.spend is not None and self.ledger is not None:
            self.ledger.complete(run=self.spend.run, server_round=self.spend.round)


# σ calibrated for a run, kept between the site's tasks (each a fresh
# process): calibration searches over a dozen accountings (about 3 s on a
# CPU), a kept σ is checked with one (`calibrate_noise`), so the first train
# of a run no longer searches again after its preflight. A stale or edited
# file costs that check and a search, nothing else.
NOISE_HINTS = "noise-hints"


def noise_hint(site: SiteSettings, ledger: PrivacyLedger, run: str) -> float | None:
    """The σ this site last used or calibrated for ``run``: its ledger's
    latest spend in the run, else the one its preflight kept."""
    spent = ledger.latest_noise(run)
    if spent is not None:
        return spent
    try:
        kept = json.loads(_noise_file(site, run).read_text("utf-8"))["noise"]
        return float(kept) if isinstance(kept, int | float) and kept > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _noise_file(site: SiteSettings, run: str) -> Path:
    name = hashlib.sha256(run.encode()).hexdigest()[:32]  # a run name is the aggregator's text
    return Path(site.work_dir) / NOISE_HINTS / f"{name}.json"


def _remember_noise(site: SiteSettings, run: str, noise: float) -> None:
    try:
        data = json.dumps({"run": run, "noise": noise}).encode()
        write_atomic(_noise_file(site, run), data, mode=0o600)
    except OSError as exc:  # a hint only: the next task calibrates again
        log.warning("site %s: could not keep the calibrated σ (%s)", site.site_id, exc)


def preflight(
    site: SiteSettings,
    cfg: RoundConfig,
    images: int,
    *,
    run_id: str,
    limits: Limits | None,
    parameters: int | None = None,
) -> BudgetExhausted | None:
    """What `admit` would refuse, decided without writing the ledger: a
    secure round asks this before the site advertises keys, so that a site
    that would refuse never joins the roster, and a round that then cannot
    reach its threshold is abandoned before any site spends. Raises
    `AppRefused` as `admit` does; returns a budget refusal, or None."""
    if not cfg.privacy.enabled:
        return None
    ledger = PrivacyLedger.in_work_dir(Path(site.work_dir))
    delta = site_delta(site.site_id, site.delta, cfg, images, ledger.deltas())
    run_name = cfg.run_name or run_id
    plan = plan_for(cfg, images, noise_hint(site, ledger, run_name), delta)
    assert plan is not None
    _remember_noise(site, run_name, plan.noise_multiplier)
    max_figure = limits.max_noise_figure if limits is not None else None
    check_plan(site.site_id, cfg, plan, images, parameters, max_figure)
    check_limits(limits, site.site_id, cfg, True, plan.noise_multiplier)
    history = ledger.history()
    after = epsilon([*history, plan.as_round], delta, plan.accountant)
    if after <= site.epsilon_budget:
        return None
    spent = epsilon(history, delta, plan.accountant)
    return BudgetExhausted(spent, after, site.epsilon_budget)


def admit(
    site: SiteSettings,
    cfg: RoundConfig,
    images: int,
    *,
    run_id: str,
    limits: Limits | None,
    secure: bool,
    parameters: int | None = None,
) -> Admission:
    """Plan, check the limits with the planned σ (raises `AppRefused`), and
    record the spend ahead in the site's ledger; a budget refusal is
    returned, nothing recorded. ``run_id``: Flower's, for a run without a
    name of its own. ``parameters``: D's trainable weights, for the noise
    figure the site's limits bound (None: not checked)."""
    if not cfg.privacy.enabled:
        return Admission()
    ledger = PrivacyLedger.in_work_dir(Path(site.work_dir))
    delta = site_delta(site.site_id, site.delta, cfg, images, ledger.deltas())
    run_name = cfg.run_name or run_id
    plan = plan_for(cfg, images, noise_hint(site, ledger, run_name), delta)
    assert plan is not None
    max_figure = limits.max_noise_figure if limits is not None else None
    check_plan(site.site_id, cfg, plan, images, parameters, max_figure)
    check_limits(limits, site.site_id, cfg, secure, plan.noise_multiplier)
    try:
        spend = ledger.spend(
            run=run_name,
            server_round=cfg.round,
            round_=plan.as_round,
            delta=delta,
            budget=site.epsilon_budget,
            accountant=plan.accountant,
            mechanism=cfg.privacy.mechanism,
        )
    except BudgetExhausted as refusal:
        log.warning("site %s round %d: %s", site.site_id, cfg.round, refusal)
        return Admission(plan, refusal=refusal, ledger=ledger)
    return Admission(plan, spend, ledger=ledger)
