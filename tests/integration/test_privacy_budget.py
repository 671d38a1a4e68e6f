"""A real 2-site federation with DP where one site's ε budget runs out: it is
refused at the right round, left out afterwards, and the run finishes."""

from __future__ import annotations

import json

import pytest

from fedgan.config.run import RunSettings
from fedgan.demo import run_demo
from fedgan.gan.models import build, trainable_parameters
from fedgan.privacy.accountant import epsilon
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.privacy.plan import noise_to_signal
from tests.federations import small_federation

pytestmark = pytest.mark.integration

SIGMA, BATCH, IMAGES, STEPS = 1.0, 4, 16, 3


def test_site_with_small_budget_is_refused_and_run_finishes(tmp_path):
    q = BATCH / IMAGES
    e1 = epsilon([(SIGMA, q, STEPS)], 1e-5)
    e2 = epsilon([(SIGMA, q, STEPS)] * 2, 1e-5)
    budget = (e1 + e2) / 2
    lines: list[str] = []
    run_dir = run_demo(
        small_federation(
            tmp_path,
            "budget",
            rounds=3,
            images_per_site=IMAGES,
            local_steps=STEPS,
            extra_config={
                "noise-multiplier": SIGMA,
                "batch-size": BATCH,
                "delta": 1e-5,
                # Once site-2 is refused site-1 trains alone, and a secure
                # sum of one update is refused; this test is about budgets.
                "secagg": False,
            },
            node_config={"site-2": {"epsilon-budget": str(budget)}},
        ),
        say=lines.append,
    )
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["sites"] == ["site-1", "site-2"]
    assert rounds[0]["epsilon"]["site-2"] == pytest.approx(e1, rel=1e-6)
    refusal = rounds[1]["budget_exhausted"]["site-2"]
    assert refusal["epsilon"] == pytest.approx(e1, rel=1e-6)
    assert refusal["epsilon_next"] == pytest.approx(e2, rel=1e-6)
    assert refusal["budget"] == pytest.approx(budget)
    assert rounds[1]["sites"] == ["site-1"] and rounds[1]["sites_failed"] == 0
    assert rounds[2]["sites"] == ["site-1"] and rounds[2]["sites_sampled"] == 1
    # The noise figure each site reported: σ·√d / B with D as the run built it.
    run = RunSettings.from_run_config(json.loads((run_dir / "run-config.json").read_text()))
    figure = noise_to_signal(SIGMA, BATCH, trainable_parameters(build(run.spec)[1]))
    assert rounds[0]["noise_figure"] == pytest.approx({"site-1": figure, "site-2": figure})
    assert rounds[2]["epsilon"]["site-1"] == pytest.approx(
        epsilon([(SIGMA, q, STEPS)] * 3, 1e-5), rel=1e-6
    )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["budget_exhausted"] == ["site-2"]
    assert any("site-2 refused: budget exhausted" in line for line in lines)
    ledger = PrivacyLedger.in_work_dir(run_dir / "sites" / "site-2")
    assert [s.round for s in ledger.spends()] == [1]  # the refused round spent nothing
    assert ledger.epsilon(1e-5) == pytest.approx(e1, rel=1e-9)
    assert len(PrivacyLedger.in_work_dir(run_dir / "sites" / "site-1").spends()) == 3
