"""The mean-embedding mechanism: the facts its privacy argument rests on (unit
feature norm, sensitivity √2, noise σ·√2, the ledger's accounting), the site's
release and the aggregator's fit of G."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedgan.config.appbundle import default_run_config
from fedgan.config.round import RoundConfig
from fedgan.config.run import ConfigError, RunSettings, SiteSettings
from fedgan.gan.models import GanSpec, Generator
from fedgan.privacy.accountant import epsilon
from fedgan.privacy.embedding_fit import fit_generator
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.privacy.mean_embedding import (
    SENSITIVITY,
    FeatureMap,
    Target,
    class_noise_figures,
    release,
)
from fedgan.silo.synth import synth_silo
from fedgan.site import work_dir
from fedgan.site.approval import AppRefused, Limits
from fedgan.site.release import FeatureMismatch, noisy_count, release_round
from fedgan.update import Release


def _phi(pixels: int = 64, features: int = 300, seed: int = 0) -> FeatureMap:
    return FeatureMap(pixels=pixels, features=features, length_scale=0.6, seed=seed)


def test_every_image_embeds_to_unit_norm():
    phi = _phi()
    x = torch.cat(
        [torch.rand(20, 1, 8, 8) * 2 - 1, torch.ones(1, 1, 8, 8), -torch.ones(1, 1, 8, 8)]
    )
    norms = phi(x).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(len(x)), rtol=0, atol=1e-5)


def test_one_image_moves_the_release_by_exactly_the_sensitivity():
    phi = _phi()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.arange(30) % 3
    with_all = release(phi, x, y, 3, 0.0)
    without_last = release(phi, x[:-1], y[:-1], 3, 0.0)
    assert np.linalg.norm(with_all - without_last) == pytest.approx(SENSITIVITY, rel=1e-6)
    # Counts land in the last column, per class.
    assert with_all[:, -1].tolist() == [10.0, 10.0, 10.0]


def test_release_noise_has_the_calibrated_scale():
    phi = _phi(features=2000)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    clean = release(phi, x, None, 0, 0.0)
    noisy = release(phi, x, None, 0, 0.7, secret_seed=3)
    assert clean.shape == (1, 4001)
    assert np.std(noisy - clean) == pytest.approx(0.7 * math.sqrt(2), rel=0.05)
    assert not np.array_equal(release(phi, x, None, 0, 0.7), release(phi, x, None, 0, 0.7))


def test_feature_map_is_reproducible_from_its_seed_and_digest_tells_maps_apart():
    assert _phi().digest() == _phi().digest()
    assert _phi().digest() != _phi(seed=1).digest()
    assert _phi().digest() != _phi(features=301).digest()


def test_target_normalises_per_class_and_floors_noisy_counts():
    total = np.array([[2.0, 4.0, 2.0], [1.0, 1.0, -0.5]])
    t = Target.from_sum(total, min_count=0.5)
    torch.testing.assert_close(t.means, torch.tensor([[1.0, 2.0], [2.0, 2.0]]))
    torch.testing.assert_close(t.prior, torch.tensor([0.8, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        Target.from_sum(np.array([[np.nan, 1.0, 1.0]]))


def _two_class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 dark, class 1 bright: separable by mean intensity."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 16, 16, generator=g) * 0.4 - 0.2) + (y.float() * 1.2 - 0.6)[
        :, None, None, None
    ]
    return x.clamp(-1, 1), y


def test_fitted_generator_draws_the_requested_class():
    """The fit reads only the release sum and still learns which class is
    which: class 1 fakes come out bright, class 0 fakes dark."""
    x, y = _two_class_images(200, seed=0)
    phi = FeatureMap(pixels=256, features=500, length_scale=0.6, seed=0)
    total = release(phi, x[:100], y[:100], 2, 0.0) + release(phi, x[100:], y[100:], 2, 0.0)
    spec = GanSpec(image_size=16, channels=1, latent_dim=16, width=8, num_classes=2)
    torch.manual_seed(0)
    gen = Generator(spec)
    fit = fit_generator(gen, phi, Target.from_sum(total), steps=150, lr=3e-3, per_class=32)
    assert fit.loss < 0.5 * fit.first_loss
    gen.eval()
    with torch.no_grad():
        z = torch.randn(64, spec.latent_dim)
        dark = gen(z, torch.zeros(64, dtype=torch.long)).mean()
        bright = gen(z, torch.ones(64, dtype=torch.long)).mean()
    assert dark < -0.2 and bright > 0.2


def test_fit_refuses_a_target_of_the_wrong_classes():
    phi = _phi(pixels=256)
    gen = Generator(GanSpec(image_size=16, channels=1, latent_dim=8, width=8, num_classes=3))
    target = Target.from_sum(np.ones((2, phi.width + 1)))
    with pytest.raises(ValueError, match="2 class rows, G 3 classes"):
        fit_generator(gen, phi, target, steps=1, lr=1e-3)


def _site(tmp_path, budget: float = 10.0) -> SiteSettings:
    silo = synth_silo(tmp_path / "silo", "fundus", 12, seed=0, size=16)
    work_dir.init(tmp_path / "work", "site-a")
    return SiteSettings(
        site_id="site-a",
        data_dir=str(silo),
        kind="fundus",
        work_dir=str(tmp_path / "work"),
        device="cpu",
        epsilon_budget=budget,
    )


def _cfg(**overrides) -> RoundConfig:
    run = default_run_config()
    run.update(
        {
            "num-server-rounds": 1,
            "mechanism": "mean-embedding",
            "image-size": 16,
            "embedding-features": 200,
            "run-dir": "/runs/me-unit",
            "target-epsilon": 4.0,
            **overrides,
        }
    )
    settings = RunSettings.from_run_config(run)
    digest = FeatureMap(
        pixels=3 * 16 * 16,
        features=200,
        length_scale=settings.privacy.embedding_length_scale,
        seed=settings.train.seed,
    ).digest()
    return settings.round_config(1, digest)


def test_site_release_records_one_step_at_rate_one_before_releasing(tmp_path):
    site = _site(tmp_path)
    outcome = release_round(site, {}, "flower-1", _cfg())
    assert outcome.update is not None
    assert isinstance(outcome.update, Release) and outcome.update.values.shape == (1, 401)
    # The weight is the release's own noisy count (12 images plus noise σ√2),
    # and the class column of release / weight is then 1 up to rounding.
    assert abs(outcome.update.weight - 12.0) < 6 * 2.0 * SENSITIVITY
    assert abs(float(outcome.update.values[0, -1]) - 1.0) <= 0.5 / outcome.update.weight + 1e-6
    (spend,) = PrivacyLedger.in_work_dir(tmp_path / "work").spends()
    assert (spend.steps, spend.sample_rate, spend.mechanism) == (1, 1.0, "mean-embedding")
    assert spend.run == "me-unit"
    assert spend.epsilon_after == pytest.approx(
        epsilon([(spend.noise, 1.0, 1)], spend.delta, "prv"), rel=1e-9
    )
    assert 3.9 <= spend.epsilon_after <= 4.0
    assert outcome.metrics["epsilon"] == spend.epsilon_after
    assert outcome.metrics["noise-multiplier"] == spend.noise


def test_the_weight_a_site_sends_is_its_noisy_count_not_its_silo_size(tmp_path, monkeypatch):
    """The weight travels in the clear (FedAvg weight, secure-aggregation
    advertisement, `examples` in metrics.jsonl); the true count would tell
    the aggregator the silo's size. With the noise seed fixed, the weight is
    the rounded sum of the release's noisy counts, and it is not 12."""
    import fedgan.privacy.mean_embedding as me

    seeded = me.SecretRandom
    monkeypatch.setattr(me, "SecretRandom", lambda purpose, _seed: seeded(purpose, 20261128))
    outcome = release_round(_site(tmp_path), {}, "flower-1", _cfg(**{"target-epsilon": 0.5}))
    assert outcome.update is not None
    weight = outcome.update.weight
    noisy = float(outcome.update.values[:, -1].astype(np.float64).sum()) * weight
    assert weight == max(1, round(noisy)) and weight != 12.0
    sigma = outcome.metrics["noise-multiplier"]
    assert outcome.metrics["noise-figure"] == pytest.approx(sigma * math.sqrt(401) / weight)


@pytest.mark.parametrize(("counts", "expected"), [([3.4, 5.3], 9.0), ([-4.0, 2.2], 1.0)])
def test_noisy_count_rounds_and_never_falls_below_one(counts, expected):
    values = np.zeros((len(counts), 5))
    values[:, -1] = counts
    assert noisy_count(values) == expected


def test_site_release_refuses_past_its_budget_and_records_nothing(tmp_path):
    site = _site(tmp_path, budget=3.0)
    outcome = release_round(site, {}, "flower-1", _cfg())
    assert outcome.update is None and outcome.refusal is not None
    assert outcome.refusal.after > 3.0
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []


def test_site_release_refuses_features_other_than_the_aggregators(tmp_path):
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, embedding_digest="0" * 64)
    with pytest.raises(FeatureMismatch, match="site-a: the random features"):
        release_round(_site(tmp_path), {}, "flower-1", cfg)
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []


def test_site_limits_apply_to_the_release(tmp_path):
    with pytest.raises(AppRefused, match="noise multiplier"):
        release_round(
            _site(tmp_path),
            {},
            "flower-1",
            _cfg(),
            limits=Limits(min_noise_multiplier=5.0),
            secure=True,
        )
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num-server-rounds": 3}, "releases once per site"),
        ({"attributes": "age=0:100"}, "conditions on classes only"),
        ({"mechanism": "dp-merf"}, "use dp-sgd or mean-embedding"),
        ({"embedding-features": 0}, "must be > 0"),
    ],
)
def test_mean_embedding_settings_are_checked(overrides, match):
    run = default_run_config()
    run.update({"num-server-rounds": 1, "mechanism": "mean-embedding", **overrides})
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(run)


@pytest.mark.parametrize("sigma", [0.53, 1.0, 4.06])
def test_ledger_accounting_of_a_release_matches_the_exact_gaussian_mechanism(sigma):
    """One release is one Gaussian mechanism of sensitivity 1 in units of
    σ (Balle & Wang 2018 give its exact ε(δ)); the PRV accountant the ledger
    uses at q = 1 must agree and never claim less."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def delta(eps: float) -> float:
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(
            -eps * sigma - 1 / (2 * sigma)
        )

    exact = brentq(lambda e: delta(e) - 1e-5, 0.01, 200)
    ledger = epsilon([(sigma, 1.0, 1)], 1e-5, "prv")
    assert exact <= ledger <= exact + 0.02


def test_site_plan_forecasts_the_release_as_the_site_will_spend_it(tmp_path):
    """`fedgan site plan` on a mean-embedding run gives the σ, ε and noise
    figure that the site's release then uses and records."""
    import json

    from typer.testing import CliRunner

    from fedgan.cli import app

    config = tmp_path / "federation.yaml"  # the run of `_cfg()`
    config.write_text(
        "run: {rounds: 1}\nmodel: {image_size: 16}\n"
        "privacy: {mechanism: mean-embedding, features: 200, target_epsilon: 4}\n"
    )
    args = ["site", "plan", "--images", "12", "--new-silo", "--config", str(config)]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["mechanism"] == "mean-embedding" and plan["release_values"] == 401
    assert (plan["sample_rate"], plan["local_steps"]) == (1.0, 1)
    assert plan["noise_to_signal"] == pytest.approx(plan["noise_multiplier"] * math.sqrt(401) / 12)
    assert "one mean-embedding release per site" in CliRunner().invoke(app, args).output
    outcome = release_round(_site(tmp_path), {}, "flower-1", _cfg())
    assert outcome.metrics["noise-multiplier"] == pytest.approx(plan["noise_multiplier"])
    assert outcome.metrics["epsilon"] == pytest.approx(plan["epsilon_after"])
    # The plan's figure is over the true 12 images, the site's over its noisy count.
    assert outcome.metrics["noise-figure"] == pytest.approx(
        plan["noise_to_signal"] * 12 / outcome.update.weight
    )


def test_a_rare_class_is_flagged_as_mostly_noise():
    """Every class row gets the same noise, so the figure falls with the
    class's count; the sites' σ combine as σ² add; a count pushed to or
    below zero by noise counts as one image."""
    figures = class_noise_figures(np.array([400.0, 40.0, -3.0]), [0.6, 0.8], 8000)
    np.testing.assert_allclose(figures, [1.0 * math.sqrt(8001) / n for n in (400, 40, 1)])
    from fedgan.progress import format_round

    record = {
        "round": 1,
        "seconds": 1.0,
        "sites": ["a", "b"],
        "sites_sampled": 2,
        "mechanism": "mean-embedding",
        "g_loss": 0.1,
        "fit_loss_first": 0.5,
        "class_counts": {"normal": 400.0, "rare": 40.0, "gone": -3.0},
        "class_noise_figure": dict(zip(("normal", "rare", "gone"), figures.tolist(), strict=True)),
    }
    lines = format_round(record, 1)
    assert len(lines) == 3 and "class normal" not in "".join(lines)
    assert lines[1] == (
        "  class rare: about 40 images in the sum; its noise is 2.2× its signal, "
        "so expect noise in its samples"
    )
    assert lines[2].startswith("  class gone: about 0 images in the sum")
