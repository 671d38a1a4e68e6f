"""The numbers a site sees before it trains (`fedgan site plan`): the noise
readout against a real private step, and the forecast against the ledger's own
budget check, round by round."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from typer.testing import CliRunner

from fedgan.cli import app
from fedgan.gan.models import GanSpec, build, trainable_parameters
from fedgan.privacy import accountant
from fedgan.privacy.accountant import calibrate_noise, epsilon
from fedgan.privacy.ledger import BudgetExhausted, PrivacyLedger
from fedgan.privacy.plan import forecast_run, noise_to_signal, plan_round
from fedgan.site import work_dir
from fedgan.train import DPConfig, DPDiscriminatorStep


def _plan(images=300, rounds=6, steps=20, target=4.0, noise=0.0):
    return plan_round(
        noise_multiplier=noise,
        target_epsilon=target,
        max_grad_norm=1.0,
        delta=0.0,
        accountant="prv",
        num_examples=images,
        batch_size=32,
        local_steps=steps,
        rounds=rounds,
    )


@pytest.mark.parametrize(("sigma", "batch"), [(2.0, 16), (0.7, 8)])
def test_noise_readout_is_the_norm_of_a_real_private_step(sigma, batch):
    """‖noised sum‖ / (B·C) is √(ratio² + s²) with s ≤ 1 the clipped signal's
    share: the readout says how loud a step really is."""
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)
    _, disc = build(spec, seed=0)
    clip = 0.5
    step = DPDiscriminatorStep(
        disc, 1e-3, DPConfig(sigma, clip, 1.0, secret_seed=3), expected_batch=batch
    )
    real = torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    step.private_real_gradient(real)
    # Opacus divides the noised sum by the expected batch.
    measured = math.sqrt(sum(float((p.grad**2).sum()) for p in step.params)) / clip
    step.close()
    ratio = noise_to_signal(sigma, batch, trainable_parameters(disc))
    assert ratio > 3  # noise-dominated, as under DP at these sizes
    assert ratio * 0.97 <= measured <= math.sqrt(ratio**2 + 1) * 1.03


def test_noise_readout_falls_with_batch_and_grows_with_weights():
    assert noise_to_signal(1.0, 64, 10_000) == pytest.approx(noise_to_signal(1.0, 32, 10_000) / 2)
    assert noise_to_signal(1.0, 32, 40_000) == pytest.approx(noise_to_signal(1.0, 32, 10_000) * 2)
    with pytest.raises(ValueError, match="must be > 0"):
        noise_to_signal(1.0, 0, 10)


@pytest.mark.parametrize(("kind", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_repeated_rounds_are_accounted_as_opacus_accounts_them_one_by_one(kind, cls):
    """ε merges rounds of the same (σ, q) (a ledger gains one per round for
    life); the answer is Opacus's over the unmerged history."""
    history = [(1.1, 0.05, 40), (0.9, 0.1, 25)] * 4 + [(1.1, 0.05, 40)]
    reference = cls()
    reference.history = history
    assert epsilon(history, 1e-5, kind) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)


def test_a_new_silo_fits_the_run_it_was_calibrated_for():
    plan = _plan()
    forecast = forecast_run(plan, 6, [], budget=10.0)
    assert forecast.epsilon_before == 0.0
    assert forecast.epsilon_after == pytest.approx(4.0, rel=0.02)
    assert forecast.refused_from is None


def test_forecast_names_the_round_the_ledger_will_refuse(tmp_path):
    """A silo that already ran once: calibration aims this run alone at the
    target, so the budget stops it part-way. Spend it for real, round by
    round, and the ledger refuses at exactly the forecast round."""
    plan = _plan()
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.create("s1")
    for r in range(1, 7):  # an earlier run of the same plan: ε ≈ 4
        ledger.spend(
            run="earlier", server_round=r, round_=plan.as_round, delta=plan.delta, budget=1e9
        )
    forecast = forecast_run(plan, 6, ledger.history(), budget=5.0)
    assert forecast.epsilon_before == pytest.approx(4.0, rel=0.02)
    assert forecast.refused_from is not None and 1 < forecast.refused_from <= 6
    refused = None
    for r in range(1, 7):
        try:
            ledger.spend(
                run="now", server_round=r, round_=plan.as_round, delta=plan.delta, budget=5.0
            )
        except BudgetExhausted:
            refused = r
            break
    assert refused == forecast.refused_from


def _yaml(tmp_path, rounds=6, steps=20, epsilon=4.0, dp="true"):
    path = tmp_path / "federation.yaml"
    path.write_text(
        f"run: {{rounds: {rounds}}}\n"
        "model: {image_size: 16, channels: 1, latent_dim: 8, width: 8}\n"
        f"training: {{local_steps: {steps}, batch_size: 32}}\n"
        f"privacy: {{dp: {dp}, target_epsilon: {epsilon}}}\n"
    )
    return path


def test_site_plan_command_reads_the_ledger_and_the_run(tmp_path):
    runner = CliRunner()
    work = tmp_path / "work"
    init = runner.invoke(app, ["site", "init", "--site-id", "s1", "--work-dir", str(work)])
    assert init.exit_code == 0 and "started the privacy ledger" in init.output
    config = _yaml(tmp_path)
    args = ["site", "plan", "--images", "300", "--config", str(config), "--work-dir", str(work)]
    out = runner.invoke(app, [*args, "--json", "--epsilon-budget", "5"])
    assert out.exit_code == 0, out.output
    fresh = json.loads(out.output)
    plan = _plan()
    assert fresh["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert fresh["local_steps"] == 20 and fresh["rounds"] == 6
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)
    assert fresh["discriminator_weights"] == trainable_parameters(build(spec)[1])
    assert fresh["refused_from_round"] is None and fresh["epsilon_before"] == 0.0

    ledger = PrivacyLedger.in_work_dir(work)
    for r in range(1, 7):
        ledger.spend(run="a", server_round=r, round_=plan.as_round, delta=plan.delta, budget=1e9)
    out = runner.invoke(app, [*args, "--epsilon-budget", "5"])
    assert out.exit_code == 0, out.output
    expected = forecast_run(plan, 6, ledger.history(), 5.0).refused_from
    assert expected is not None
    assert f"round {expected} and later are refused" in out.output
    assert "6 rounds recorded" in out.output and "× the largest clipped" in out.output


def test_site_plan_checks_the_sites_own_limits_without_writing(tmp_path):
    """A plan only looks: it names the limit that would refuse the run and
    creates no approval file or audit entry."""
    runner = CliRunner()
    config = _yaml(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    args = ["site", "plan", "--images", "300", "--config", str(config), "--work-dir", str(work)]
    out = runner.invoke(app, args)  # a work dir not set up: no ledger to plan from
    assert out.exit_code == 1 and "fedgan site init" in out.output and "--new-silo" in out.output
    assert list(work.iterdir()) == []
    assert (
        runner.invoke(app, ["site", "init", "--site-id", "s1", "--work-dir", str(work)]).exit_code
        == 0
    )
    kept = {p.name: p.read_bytes() for p in work.iterdir()}
    out = runner.invoke(app, args)
    assert out.exit_code == 0 and "its limits admit" in out.output
    assert {p.name: p.read_bytes() for p in work.iterdir()} == kept  # a plan only looks
    sigma = _plan().noise_multiplier
    policy = ["site", "policy", "--work-dir", str(work), "--min-noise", f"{sigma * 1.1:.3f}"]
    assert runner.invoke(app, policy).exit_code == 0
    out = runner.invoke(app, [*args, "--json"])
    assert "requires at least" in json.loads(out.output)["policy_refusal"]
    out = runner.invoke(app, args)
    assert "its limits REFUSE this run" in out.output


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--images", "0", "--new-silo"], "--images 0"),
        (["--images", "10", "--work-dir", "{tmp}/none"], "--new-silo"),
        (["--images", "10", "--new-silo", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    ],
)
def test_site_plan_refuses_bad_input_with_the_fix(tmp_path, extra, expect):
    out = CliRunner().invoke(app, ["site", "plan", *[a.format(tmp=tmp_path) for a in extra]])
    assert out.exit_code == 1 and expect in out.output


def test_site_plan_without_dp_says_there_is_nothing_to_plan(tmp_path):
    config = _yaml(tmp_path, dp="false")
    out = CliRunner().invoke(
        app, ["site", "plan", "--images", "50", "--new-silo", "--config", str(config)]
    )
    assert out.exit_code == 0 and "without DP" in out.output
    assert "REFUSE this run: the run turns differential privacy off" in out.output
    out = CliRunner().invoke(
        app, ["site", "plan", "--images", "50", "--new-silo", "--config", str(config), "--json"]
    )
    answer = json.loads(out.output)
    assert answer["dp"] is False and "privacy off" in answer["policy_refusal"]


def _searches(monkeypatch):
    calls = []
    search = accountant.get_noise_multiplier

    def spy(**kw):
        calls.append(kw)
        return search(**kw)

    monkeypatch.setattr(accountant, "get_noise_multiplier", spy)
    return calls


def test_a_calibrated_hint_skips_the_search_and_a_wrong_one_does_not(monkeypatch):
    args = (5.0, 1e-5, 0.05, 400)
    sigma = calibrate_noise(*args)
    calls = _searches(monkeypatch)
    assert calibrate_noise(*args, hint=sigma) == sigma and calls == []
    # Too little noise (ε over target) or far too much (ε well under it): searched again.
    for wrong in (sigma * 0.8, sigma * 1.5):
        assert calibrate_noise(*args, hint=wrong) == pytest.approx(sigma)
    assert len(calls) == 2
    assert epsilon([(sigma, 0.05, 400)], 1e-5) <= 5.0


def _one_site(tmp_path, images: int, budget: float = 10.0, **keys):
    """A synthetic fundus silo of ``images`` images, a run on it at 16 px with
    run-config ``keys`` over the defaults, the site's settings (its ε
    ``budget``), and the run's first G and D."""
    from fedgan.config.appbundle import default_run_config
    from fedgan.config.run import RunSettings, SiteSettings
    from fedgan.silo.synth import synth_silo

    silo = synth_silo(tmp_path / "silo", "fundus", images, seed=1, size=32)
    base = {"image-size": 16, "width": 8, "run-dir": str(tmp_path / "run")}
    cfg = RunSettings.from_run_config({**default_run_config(), **base, **keys})
    site = SiteSettings("s1", str(silo), "fundus", str(tmp_path / "work"), "cpu", budget)
    work_dir.init(Path(site.work_dir), site.site_id)
    gen, disc = build(cfg.spec, seed=0)
    return cfg, site, gen, disc


def _round(cfg, site, gen, disc, server_round: int):
    from fedgan.site import round as site_round
    from fedgan.weights import get_arrays

    return site_round.run_round(
        site, {}, "r", cfg.round_config(server_round), get_arrays(gen), get_arrays(disc)
    )


def test_dp_rounds_of_one_run_search_for_sigma_once_and_log_their_noise(
    tmp_path, caplog, monkeypatch
):
    """Round 2 takes round 1's σ from the ledger (checked, not trusted). The
    site's log gives every DP round the noise figure `fedgan site plan`
    forecast: a hospital sees it without reading code."""
    cfg, site, gen, disc = _one_site(
        tmp_path,
        12,
        **{"batch-size": 4, "local-steps": 2, "num-server-rounds": 3, "target-epsilon": 5.0},
    )
    calls = _searches(monkeypatch)
    with caplog.at_level("INFO", logger="fedgan.site"):
        outcomes = [_round(cfg, site, gen, disc, r) for r in (1, 2)]
    assert all(o.update is not None for o in outcomes)
    sigma = outcomes[0].metrics["noise-multiplier"]
    assert outcomes[1].metrics["noise-multiplier"] == sigma and len(calls) == 1
    expected = noise_to_signal(sigma, 4, trainable_parameters(disc))  # q·N = 4/12·12
    lines = [r.getMessage() for r in caplog.records if "× the largest clipped" in r.getMessage()]
    assert len(lines) == 2 and all(f"noise is {expected:.1f}×" in line for line in lines), lines


def test_a_tiny_silo_under_dp_is_refused_before_any_ledger_line(tmp_path):
    """Sampling rate 1 (batch ≥ silo): refused with the number of images it
    would need, and nothing spent; `fedgan site plan` says the same."""
    from fedgan.privacy.ledger import PrivacyLedger
    from fedgan.site import plan as site_plan
    from fedgan.site.approval import AppRefused, Limits

    cfg, site, gen, disc = _one_site(tmp_path, 6, **{"batch-size": 8})
    with pytest.raises(AppRefused, match="needs more than 8 images") as refused:
        _round(cfg, site, gen, disc, 1)
    assert "6 usable images" in refused.value.reason and "\n" not in refused.value.reason
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []
    preview = site_plan.assess(cfg, 6, [], Limits(), 10.0)
    assert preview.refusal == refused.value.reason
    assert site_plan.assess(cfg, 9, [], Limits(), 10.0).refusal is None


def test_a_round_whose_noise_drowns_the_silo_is_refused_before_any_ledger_line(tmp_path):
    """Noise figure above the site's limit: refused with the images it would
    need, nothing spent; the same run on a silo of that size passes, and
    `fedgan site plan` gives the same verdict."""
    from fedgan.privacy.ledger import PrivacyLedger
    from fedgan.site import plan as site_plan
    from fedgan.site import round as site_round
    from fedgan.site.approval import AppRefused, Limits
    from fedgan.weights import get_arrays

    keys = {"batch-size": 4, "local-steps": 20, "target-epsilon": 0.5}
    cfg, site, gen, disc = _one_site(tmp_path, 12, **keys)
    preview = site_plan.assess(cfg, 12, [], Limits(), 10.0)
    assert preview.noise_figure > 100, preview.noise_figure  # the default limit
    with pytest.raises(AppRefused, match=r"noise would be \d+× the strongest") as refused:
        site_round.run_round(
            site,
            {},
            "r",
            cfg.round_config(1),
            get_arrays(gen),
            get_arrays(disc),
            limits=Limits(),
            secure=True,
        )
    reason = refused.value.reason
    assert "this site trains up to 100×" in reason and "\n" not in reason
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []
    assert preview.refusal == reason
    needed = int(reason.split("needs about ")[1].split()[0])
    assert needed > 12
    assert site_plan.assess(cfg, needed, [], Limits(), 10.0).refusal is None
    # A site may set its own limit, or none.
    assert site_plan.assess(cfg, 12, [], Limits(max_noise_figure=None), 10.0).refusal is None


@pytest.mark.parametrize(("kind", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_with_several_d_steps_per_g_every_d_step_is_accounted(tmp_path, kind, cls):
    """n_D = 3: each round spends local-steps × 3 private steps, and the
    ledger's ε after two rounds equals Opacus's for that history of D steps."""
    from fedgan.privacy.ledger import PrivacyLedger
    from fedgan.site import plan as site_plan
    from fedgan.site.approval import Limits

    keys = {"batch-size": 4, "local-steps": 2, "d-steps-per-g": 3, "noise-multiplier": 1.2}
    cfg, site, gen, disc = _one_site(tmp_path, 12, budget=1000.0, accountant=kind, **keys)
    for r in (1, 2):
        outcome = _round(cfg, site, gen, disc, r)
    spends = PrivacyLedger.in_work_dir(tmp_path / "work").spends()
    assert [(s.noise, s.sample_rate, s.steps) for s in spends] == [(1.2, 4 / 12, 6)] * 2
    reference = cls()
    reference.history = [(1.2, 4 / 12, 6)] * 2
    expected = reference.get_epsilon(spends[-1].delta)
    assert outcome.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    preview = site_plan.assess(cfg, 12, [], Limits(), 1000.0)
    assert preview.plan.steps == 6 and "6 D steps (3 per G step)" in " ".join(
        site_plan.describe(preview, "new", "default")
    )


@pytest.mark.parametrize("images", [12, 300])
def test_the_default_batch_is_the_sites_own_and_the_ledger_and_trainer_agree(
    tmp_path, images, monkeypatch
):
    """batch-size 0 (the default): each site's expected batch is min(128,
    N/2). The ledger's q, the DP step's expected batch and the number of
    private steps must all be that one batch's."""
    import fedgan.train as train
    from fedgan.config.training import auto_batch
    from fedgan.privacy.ledger import PrivacyLedger

    seen = {}
    original = train.DPDiscriminatorStep.__init__

    def recording(self, disc, lr, dp, expected_batch, *args, **kwargs):
        seen.update(q=dp.sample_rate, expected=expected_batch)
        original(self, disc, lr, dp, expected_batch, *args, **kwargs)

    monkeypatch.setattr(train.DPDiscriminatorStep, "__init__", recording)
    cfg, site, gen, disc = _one_site(tmp_path, images, **{"local-steps": 2})
    assert cfg.train.batch_size == 0  # the shipped default
    outcome = _round(cfg, site, gen, disc, 1)
    batch = auto_batch(images)
    assert batch == min(128, images // 2)
    (spend,) = PrivacyLedger.in_work_dir(tmp_path / "work").spends()
    assert spend.sample_rate == pytest.approx(batch / images) == seen["q"]
    assert seen["expected"] == batch and spend.steps == 2
    assert outcome.metrics["sample-rate"] == pytest.approx(batch / images)
    # The site's update counts once: no image count leaves it, not as a weight.
    assert outcome.update is not None and outcome.update.weight == 1.0


def test_a_secure_rounds_preflight_refuses_what_training_would_without_spending(tmp_path):
    """Before a secure round's keys (issue 32, item 8): the noise-figure
    refusal and the budget refusal come before the site joins the roster,
    and neither writes the ledger; a round within both is admitted."""
    from fedgan.privacy.ledger import PrivacyLedger
    from fedgan.site import round as site_round
    from fedgan.site.approval import AppRefused, Limits

    keys = {"batch-size": 4, "local-steps": 20, "target-epsilon": 0.5}
    cfg, site, _, _ = _one_site(tmp_path, 12, **keys)
    with pytest.raises(AppRefused, match=r"noise would be \d+× the strongest"):
        site_round.preflight_round(site, {}, "r", cfg.round_config(1), Limits())
    assert PrivacyLedger.in_work_dir(tmp_path / "work").spends() == []
    ok = {"batch-size": 4, "local-steps": 2, "target-epsilon": 8.0}
    cfg, site, _, _ = _one_site(tmp_path / "ok", 12, budget=10.0, **ok)
    lenient = Limits(max_noise_figure=None)
    assert site_round.preflight_round(site, {}, "r", cfg.round_config(1), lenient) is None
    poor = dataclasses.replace(site, epsilon_budget=0.5)
    exhausted = site_round.preflight_round(poor, {}, "r", cfg.round_config(1), lenient)
    assert exhausted is not None and exhausted.after > 0.5 and exhausted.budget == 0.5
    assert PrivacyLedger.in_work_dir(tmp_path / "ok" / "work").spends() == []


def test_the_site_not_the_operator_picks_delta(tmp_path):
    """Issue 33: a history that cost ε 12.4 at δ 1e-5 costs 2.4 at δ 0.3, so
    a run that asked for δ 0.3 got past a spent budget of 10. The site
    accounts at its own δ (node config, or min(1e-5, 1/(10 n))), refuses a
    run asking for a larger one, and plans a run asking for a smaller one
    at it, with more noise."""
    from fedgan.privacy.ledger import PrivacyLedger
    from fedgan.site import round as site_round
    from fedgan.site.approval import AppRefused, Limits

    lenient = Limits(max_noise_figure=None)
    keys = {"batch-size": 4, "local-steps": 2, "target-epsilon": 1.0}
    cfg, site, _, _ = _one_site(tmp_path, 40, budget=10.0, **keys, delta=0.3)
    ledger = PrivacyLedger.in_work_dir(tmp_path / "work")
    ledger.spend(run="old", server_round=1, round_=(1.0, 0.1, 300), delta=1e-5, budget=100.0)
    with pytest.raises(
        AppRefused, match=r"asks for δ 0.3, but this site accounts every spend at δ 1e-05"
    ):
        site_round.preflight_round(site, {}, "r", cfg.round_config(1), lenient)
    assert len(ledger.spends()) == 1
    # Left to the site, δ is the site's: the spent budget refuses.
    cfg, _, _, _ = _one_site(tmp_path / "b", 40, budget=10.0, **keys, delta=0.0)
    exhausted = site_round.preflight_round(site, {}, "r", cfg.round_config(1), lenient)
    assert exhausted is not None and exhausted.spent == pytest.approx(12.4, abs=0.1)
    # A site that sets its own δ in its node config is held to it.
    strict = dataclasses.replace(site, delta=1e-7, epsilon_budget=100.0)
    cfg, _, _, _ = _one_site(tmp_path / "c", 40, **keys, delta=1e-6)
    with pytest.raises(
        AppRefused, match=r"δ 1e-06, but this site accounts .* at δ 1e-07 \(node config"
    ):
        site_round.preflight_round(strict, {}, "r", cfg.round_config(1), lenient)
    # δ never rises above one the ledger already accounted at (found by
    # review: a run filtering the silo to a few images raised the default).
    cfg, _, _, _ = _one_site(tmp_path / "e", 40, **keys, delta=0.0)
    below = PrivacyLedger.in_work_dir(tmp_path / "e" / "work")
    below.spend(run="old", server_round=1, round_=(1.0, 0.1, 300), delta=1e-9, budget=1e9)
    e_site = dataclasses.replace(site, work_dir=str(tmp_path / "e" / "work"))
    refused = site_round.preflight_round(
        dataclasses.replace(e_site, epsilon_budget=15.0), {}, "r", cfg.round_config(1), lenient
    )
    assert refused is not None and refused.spent > 12.4  # the history at δ 1e-9, not 1e-5
    # A run asking for a smaller δ than the site's is planned at it.
    cfg, _, _, _ = _one_site(tmp_path / "d", 40, **keys, delta=1e-8)
    loose = dataclasses.replace(site, delta=1e-6, epsilon_budget=100.0)
    outcome = _round(cfg, loose, *build(cfg.spec, seed=0), 1)
    assert outcome.metrics["delta"] == 1e-6  # ε is reported at the site's δ
    (spend,) = [s for s in PrivacyLedger.in_work_dir(tmp_path / "work").spends() if s.run != "old"]
    assert spend.delta == 1e-6


@pytest.mark.parametrize("site_consents", [False, True])
def test_a_run_alone_cannot_make_a_site_write_its_update_to_disk(
    tmp_path, monkeypatch, site_consents
):
    """Issue 33: `dump-updates` in the run config made every site write the
    raw update it sent to its disk. Test mode now needs the site's own node
    config as well."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgan import wire
    from fedgan.site import client_app, runtime
    from fedgan.site.approval import PolicyStore
    from fedgan.weights import get_arrays

    monkeypatch.setattr(runtime, "admitted_fab", "ab" * 32)
    for name in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process is told
        monkeypatch.setattr(TaskIdentity, name, 7)
    keys = {"batch-size": 4, "local-steps": 1, "dump-updates": True, "secagg": False}
    cfg, site, gen, disc = _one_site(tmp_path, 40, **keys)
    PolicyStore(Path(site.work_dir), "s1").update(
        require_secure_aggregation=False, max_noise_figure=None
    )
    node_config = {
        "site-id": "s1",
        "data-dir": site.data_dir,
        "kind": "fundus",
        "work-dir": site.work_dir,
        "device": "cpu",
        "dump-updates": str(site_consents).lower(),
    }
    content = wire.train_request(get_arrays(gen), get_arrays(disc), cfg.round_config(1).to_record())
    msg = Message(content=content, dst_node_id=1, message_type="train")
    reply = client_app.train(msg, Context(1, 1, node_config, RecordDict(), {}))
    assert wire.read_train_reply(reply.content)[0] is not None  # it trained and replied
    dumps = list((Path(site.work_dir) / "dumps").rglob("update.npz"))
    assert len(dumps) == (1 if site_consents else 0)


def test_a_site_calibrates_a_run_once_and_checks_the_sigma_it_kept(tmp_path, monkeypatch):
    """Issue 34: calibrating σ searches over a dozen accountings (about 3 s
    on a CPU); the first round's preflight and its training, each a fresh
    process, both searched. The preflight's σ is kept in the work dir and
    the training checks it with one accounting; a tampered one is caught by
    that check and the site searches again, to the same σ."""
    from fedgan.config.appbundle import default_run_config
    from fedgan.config.run import RunSettings, SiteSettings
    from fedgan.site import admission

    searches = _searches(monkeypatch)
    run = RunSettings.from_run_config(default_run_config() | {"run-dir": str(tmp_path / "run")})
    cfg = run.round_config(1)
    site = SiteSettings(
        site_id="site-a",
        data_dir=str(tmp_path / "data"),
        kind="fundus",
        work_dir=str(tmp_path / "work"),
        device="cpu",
        epsilon_budget=10.0,
    )
    work_dir.init(Path(site.work_dir), site.site_id)
    ask = {"run_id": "r", "limits": None}
    assert admission.preflight(site, cfg, 300, **ask) is None
    assert len(searches) == 1
    admitted = admission.admit(site, cfg, 300, secure=True, **ask)
    assert admitted.admitted and len(searches) == 1  # checked, not searched
    sigma = admitted.plan.noise_multiplier
    assert epsilon([admitted.plan.as_round] * cfg.rounds, admitted.plan.delta) <= 8.0

    # A kept σ edited to something weaker is not taken: the site searches.
    other = tmp_path / "other"
    site2 = dataclasses.replace(site, work_dir=str(other))
    work_dir.init(other, site.site_id)
    admission.preflight(site2, cfg, 300, **ask)
    (kept,) = (other / admission.NOISE_HINTS).iterdir()
    kept.write_text(json.dumps({"noise": sigma / 4}))
    again = admission.admit(site2, cfg, 300, secure=True, **ask)
    assert len(searches) == 3 and again.plan.noise_multiplier == sigma
