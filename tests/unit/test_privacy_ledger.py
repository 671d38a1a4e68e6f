"""The site's privacy ledger: ε equals Opacus's for the same history, write-ahead spends,
budget refusals, damage."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedgan.privacy.accountant import calibrate_noise, default_delta, epsilon
from fedgan.privacy.ledger import BudgetExhausted, LedgerError, PrivacyLedger

ROUND = (1.1, 0.05, 40)


def _spend(ledger, r, budget=100.0, round_=ROUND):
    return ledger.spend(run="run-a", server_round=r, round_=round_, delta=1e-5, budget=budget)


@pytest.mark.parametrize(("kind", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_ledger_epsilon_equals_opacus_for_the_same_history(tmp_path, kind, cls):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    history = [(1.1, 0.05, 40), (0.9, 0.1, 25), (1.3, 0.02, 60)]
    for r, round_ in enumerate(history, start=1):
        ledger.spend(
            run="x", server_round=r, round_=round_, delta=1e-5, budget=1e9, accountant=kind
        )
    reference = cls()
    reference.history = history
    assert ledger.epsilon(1e-5, kind) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_monotonically_and_is_recorded(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    values = [_spend(ledger, r).epsilon_after for r in range(1, 6)]
    assert values == sorted(values) and values[0] > 0 and len(set(values)) == 5
    assert [s.round for s in ledger.spends()] == [1, 2, 3, 4, 5]


def test_write_ahead_counts_an_interrupted_round(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    _spend(ledger, 1)
    ledger.complete(run="run-a", server_round=1)
    _spend(ledger, 2)  # the site dies here, before `complete`
    restarted = PrivacyLedger(path)
    assert len(restarted.spends()) == 2
    assert restarted.epsilon(1e-5) == pytest.approx(epsilon([ROUND, ROUND], 1e-5))


def test_budget_exhausted_records_nothing_and_reports_both_numbers(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    first = _spend(ledger, 1, budget=10.0)
    before = path.read_bytes()
    with pytest.raises(BudgetExhausted) as info:
        _spend(ledger, 2, budget=first.epsilon_after * 1.01)
    assert info.value.spent == pytest.approx(first.epsilon_after)
    assert info.value.after > info.value.budget
    assert "budget exhausted" in str(info.value)
    assert path.read_bytes() == before


def test_ledger_is_append_only(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    _spend(ledger, 1)
    first = path.read_bytes()
    _spend(ledger, 2)
    assert path.read_bytes().startswith(first)
    assert [json.loads(line)["type"] for line in path.read_text().splitlines()] == [
        "spend",
        "spend",
    ]


def test_damaged_ledger_refuses_training_and_is_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    _spend(ledger, 1)
    with open(path, "a") as fh:
        fh.write('{"type": "spend", "run": "x", "rou')  # torn write
    damaged = path.read_bytes()
    with pytest.raises(LedgerError, match="line 2"):
        _spend(ledger, 2)
    assert path.read_bytes() == damaged


def test_noiseless_round_is_infinite_epsilon_and_calibration_meets_target():
    assert epsilon([(0.0, 0.1, 10)], 1e-5) == float("inf")
    assert epsilon([], 1e-5) == 0.0
    sigma = calibrate_noise(4.0, 1e-5, 0.1, 300)
    assert epsilon([(sigma, 0.1, 300)], 1e-5) <= 4.0 + 0.05
    assert epsilon([(sigma * 0.9, 0.1, 300)], 1e-5) > 4.0
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
