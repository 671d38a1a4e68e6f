"""`fedgan site plan`: what a run would cost one silo, before the site joins it.

No I/O here: the command reads the run's federation.yaml, the site's ledger and
its approval file, and prints what `assess` and `describe` give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgan.config.run import RunSettings
from fedgan.gan.models import build, trainable_parameters
from fedgan.privacy.accountant import Round
from fedgan.privacy.plan import (
    RoundPlan,
    RunForecast,
    forecast_run,
    noise_to_signal,
    release_noise_figure,
)
from fedgan.site.admission import check_plan, plan_for, site_delta
from fedgan.site.approval import AppRefused, Limits, check_run


@dataclass(frozen=True)
class SitePlan:
    run: RunSettings
    images: int
    budget: float
    # Why the site's own limits would refuse the run; None: they admit it.
    refusal: str | None
    # The rest is None for a run without DP.
    plan: RoundPlan | None = None
    forecast: RunForecast | None = None
    # D's trainable weights, d in the noise figure; for a mean-embedding run
    # the release's values.
    weights: int | None = None
    noise_figure: float | None = None
    delta: float = 0.0  # the δ this site accounts at (`admission.site_delta`)


def assess(
    run: RunSettings,
    images: int,
    history: Sequence[Round],
    limits: Limits,
    budget: float,
    delta: float = 0.0,
    recorded: Sequence[float] = (),
) -> SitePlan:
    """The round plan the site would make for ``images`` images, the run's
    forecast against the ledger's ``history`` at the site's δ (``delta``; 0:
    from the silo's size), and the site's limits' verdict. The plan is
    `fedgan.site.admission.plan_for`'s, the one the round makes."""
    if images < 1:
        raise ValueError(f"--images {images}: give the number of usable images in the silo (>= 1)")
    cfg = run.round_config(1)
    too_loose = None
    try:
        own = site_delta("this site", delta, cfg, images, recorded)
    except AppRefused as refused:
        own, too_loose = cfg.privacy.delta, refused.reason
    plan = plan_for(cfg, images, site=own)
    refusal = too_loose or _refusal(run, limits, plan.noise_multiplier if plan else None)
    if plan is not None and refusal is None:
        weights = trainable_parameters(build(run.spec)[1])
        try:
            check_plan("this site", cfg, plan, images, weights, limits.max_noise_figure)
        except AppRefused as refused:
            refusal = refused.reason
    if plan is None:
        return SitePlan(run, images, budget, refusal)
    if run.privacy.mean_embedding:
        values = max(run.spec.num_classes, 1) * (2 * run.privacy.embedding_features + 1)
        figure = release_noise_figure(plan.noise_multiplier, values, images)
    else:
        values = trainable_parameters(build(run.spec)[1])
        figure = noise_to_signal(plan.noise_multiplier, plan.sample_rate * images, values)
    forecast = forecast_run(plan, run.rounds, history, budget, delta=own)
    return SitePlan(run, images, budget, refusal, plan, forecast, values, figure, own)


def _declared_init(run: RunSettings) -> str:
    """The weights hash of the run's init as the round would declare it: from
    the file when it is readable here, else a placeholder that a policy
    refusing inits still refuses (a pin is checked in round 1)."""
    if not run.model_init:
        return ""
    from fedgan.config.run import ConfigError
    from fedgan.model_init import load_init

    try:
        return load_init(Path(run.model_init), run.spec).weights_sha256
    except ConfigError:
        return "(the run's model.init, not readable here)"


def _refusal(run: RunSettings, limits: Limits, noise: float | None) -> str | None:
    init = _declared_init(run)
    if init.startswith("(") and limits.init_hashes and not limits.refuse_init:
        init = ""  # a pin can only be checked against the weights, in round 1
    try:
        check_run(
            limits,
            "this site",
            dp=run.privacy.enabled,
            noise_multiplier=noise,
            target_epsilon=run.privacy.target_epsilon,
            secure_aggregation=run.secagg.enabled,
            init_sha256=init,
        )
    except AppRefused as refused:
        return refused.reason
    return None


def describe(p: SitePlan, ledger_note: str, policy_note: str) -> list[str]:
    """The lines `fedgan site plan` prints; the notes say where the ledger
    and the limits came from."""
    verdict = f"policy ({policy_note}): " + (
        f"its limits REFUSE this run: {p.refusal}" if p.refusal else "its limits admit this run"
    )
    if p.plan is None or p.forecast is None:
        return ["this run trains without DP (privacy.dp: false): there is no ε to plan", verdict]
    run, plan, forecast = p.run, p.plan, p.forecast
    how = (
        f"calibrated to reach ε {run.privacy.target_epsilon:g} after round {run.rounds}"
        if run.privacy.noise_multiplier <= 0
        else "as the run sets it"
    )
    if run.privacy.mean_embedding:
        lines = [
            f"run: one mean-embedding release per site, {run.spec.image_size} px, "
            f"{p.weights:,} values ({max(run.spec.num_classes, 1)} classes × "
            f"{run.privacy.embedding_features:,} features × 2 + counts)",
            f"silo of {p.images:,} images: every image once (q 1, one step), "
            f"{_delta(p)}, σ {plan.noise_multiplier:.3f} ({how}, {plan.accountant.upper()})",
            f"noise: the release's noise is {p.noise_figure:.2g}× its largest signal "
            "(σ·√values / images; docs/privacy.md)",
        ]
    else:
        lines = _sgd_lines(p, how)
    lines += [
        verdict,
        f"ledger: {ledger_note}, ε {forecast.epsilon_before:.3f} spent",
    ]
    return lines + _forecast_lines(p)


def _sgd_lines(p: SitePlan, how: str) -> list[str]:
    run, plan = p.run, p.plan
    assert plan is not None
    n_d = run.train.d_steps_per_g
    steps = f"{plan.steps} local steps" if n_d == 1 else f"{plan.steps} D steps ({n_d} per G step)"
    return [
        f"run: {run.rounds} rounds × {steps}, batch {run.train.batch_for(p.images)}, "
        f"{run.spec.image_size} px, D with {p.weights:,} weights",
        f"silo of {p.images:,} images: q {plan.sample_rate:.4g}, {_delta(p)}, "
        f"σ {plan.noise_multiplier:.3f} ({how}, {plan.accountant.upper()})",
        f"noise: each step's noise is {p.noise_figure:.1f}× the largest clipped real-image "
        "gradient (σ·√weights / batch; docs/privacy.md)",
    ]


def _delta(p: SitePlan) -> str:
    assert p.plan is not None
    if p.plan.delta == p.delta:
        return f"δ {p.delta:.3g}"
    return f"δ {p.plan.delta:.3g} (the run's; ε accounted at this site's δ {p.delta:.3g})"


def _forecast_lines(p: SitePlan) -> list[str]:
    run, forecast = p.run, p.forecast
    assert forecast is not None
    lines = []
    if forecast.refused_from is None:
        lines.append(
            f"this run: ε {forecast.epsilon_after:.3f} after round {run.rounds}, within the "
            f"budget of {p.budget:g}"
        )
    elif forecast.refused_from == 1:
        lines.append(
            f"this run: refused from round 1: one round would take ε past the budget of "
            f"{p.budget:g}"
        )
    else:
        lines.append(
            f"this run: rounds 1-{forecast.refused_from - 1} fit; round {forecast.refused_from} "
            f"and later are refused (ε {forecast.epsilon_after:.3f} after round {run.rounds}, "
            f"budget {p.budget:g})"
        )
    return lines


def as_dict(p: SitePlan) -> dict[str, Any]:
    """`fedgan site plan --json`."""
    out: dict[str, Any] = {
        "images": p.images,
        "rounds": p.run.rounds,
        "batch_size": p.run.train.batch_for(p.images),
        "dp": p.plan is not None,
        "mechanism": p.run.privacy.mechanism,
        "epsilon_budget": p.budget,
        "policy_refusal": p.refusal,
    }
    if p.plan is not None and p.forecast is not None:
        out |= {
            "local_steps": p.plan.steps // max(1, p.run.train.d_steps_per_g),
            "d_steps_per_g": p.run.train.d_steps_per_g,
            "noise_multiplier": p.plan.noise_multiplier,
            "calibrated": p.run.privacy.noise_multiplier <= 0,
            "sample_rate": p.plan.sample_rate,
            "delta": p.delta,
            "plan_delta": p.plan.delta,
            "accountant": p.plan.accountant,
            (
                "release_values" if p.run.privacy.mean_embedding else "discriminator_weights"
            ): p.weights,
            "noise_to_signal": p.noise_figure,
            "epsilon_before": p.forecast.epsilon_before,
            "epsilon_after": p.forecast.epsilon_after,
            "refused_from_round": p.forecast.refused_from,
        }
    return out
