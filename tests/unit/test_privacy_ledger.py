"""The site's privacy ledger: ε equals Opacus's for the same history, write-ahead spends,
budget refusals, damage, and failing closed: a missing, truncated or edited ledger refuses,
a crash at any write point never under-counts, and concurrent spends cannot both pass."""

from __future__ import annotations

import json
import threading

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedgan.privacy.accountant import calibrate_noise, default_delta, epsilon
from fedgan.privacy.ledger import BudgetExhausted, LedgerError, PrivacyLedger

ROUND = (1.1, 0.05, 40)


@pytest.fixture
def ledger(tmp_path):
    made = PrivacyLedger(tmp_path / "ledger.jsonl")
    made.create("site-a")
    return made


def _spend(ledger, r, budget=100.0, round_=ROUND):
    return ledger.spend(run="run-a", server_round=r, round_=round_, delta=1e-5, budget=budget)


@pytest.mark.parametrize(("kind", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_ledger_epsilon_equals_opacus_for_the_same_history(ledger, kind, cls):
    history = [(1.1, 0.05, 40), (0.9, 0.1, 25), (1.3, 0.02, 60)]
    for r, round_ in enumerate(history, start=1):
        ledger.spend(
            run="x", server_round=r, round_=round_, delta=1e-5, budget=1e9, accountant=kind
        )
    reference = cls()
    reference.history = history
    assert ledger.epsilon(1e-5, kind) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_monotonically_and_is_recorded(ledger):
    values = [_spend(ledger, r).epsilon_after for r in range(1, 6)]
    assert values == sorted(values) and values[0] > 0 and len(set(values)) == 5
    assert [s.round for s in ledger.spends()] == [1, 2, 3, 4, 5]


def test_write_ahead_counts_an_interrupted_round(ledger):
    path = ledger.path
    _spend(ledger, 1)
    ledger.complete(run="run-a", server_round=1)
    _spend(ledger, 2)  # the site dies here, before `complete`
    restarted = PrivacyLedger(path)
    assert len(restarted.spends()) == 2
    assert restarted.epsilon(1e-5) == pytest.approx(epsilon([ROUND, ROUND], 1e-5))


def test_budget_exhausted_records_nothing_and_reports_both_numbers(ledger):
    path = ledger.path
    first = _spend(ledger, 1, budget=10.0)
    before = path.read_bytes()
    with pytest.raises(BudgetExhausted) as info:
        _spend(ledger, 2, budget=first.epsilon_after * 1.01)
    assert info.value.spent == pytest.approx(first.epsilon_after)
    assert info.value.after > info.value.budget
    assert "budget exhausted" in str(info.value)
    assert path.read_bytes() == before


def test_ledger_is_append_only_and_chained(ledger):
    path = ledger.path
    _spend(ledger, 1)
    first = path.read_bytes()
    _spend(ledger, 2)
    assert path.read_bytes().startswith(first)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in lines] == ["created", "spend", "spend"]
    assert [r["seq"] for r in lines] == [1, 2, 3]
    assert json.loads(ledger.head.read_text())["entries"] == 3


def test_an_edited_line_refuses_training_and_is_kept(ledger):
    path = ledger.path
    _spend(ledger, 1)
    _spend(ledger, 2)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"steps": 40', '"steps": 4')  # less spent, it would say
    path.write_text("\n".join(lines) + "\n")
    damaged = path.read_bytes()
    with pytest.raises(LedgerError, match="line 3 does not follow line 2"):
        _spend(ledger, 3)
    assert path.read_bytes() == damaged
    path.write_text("garbage\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(LedgerError, match="line 1 is not a ledger record"):
        ledger.spends()


def test_a_deleted_ledger_refuses_instead_of_reading_as_nothing_spent(ledger):
    """Issue 33: after a site's budget was spent, deleting the ledger let the
    next round through at ε 2.56."""
    first = _spend(ledger, 1, budget=10.0)
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="is missing: this silo's privacy history"):
        _spend(ledger, 2, budget=first.epsilon_after * 1.01)
    with pytest.raises(LedgerError, match="is missing"):
        ledger.history()
    assert not ledger.path.exists()  # never started anew behind the site's back


@pytest.mark.parametrize("damage", ["truncate", "empty", "no-head", "stale-head"])
def test_a_truncated_or_replaced_ledger_refuses(ledger, damage):
    _spend(ledger, 1)
    head = ledger.head.read_text()
    _spend(ledger, 2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    if damage == "truncate":  # the last whole spend cut off
        ledger.path.write_text("".join(lines[:-1]))
    elif damage == "empty":
        ledger.path.write_text("")
    elif damage == "no-head":
        ledger.head.unlink()
    else:  # an older copy of the head beside the full ledger: one line too many is
        # a lost head update (kept); two are not
        ledger.head.write_text(head)
        _spend(ledger, 3)
        ledger.head.write_text(head)
    with pytest.raises(LedgerError, match=r"truncated or replaced|head|missing"):
        _spend(ledger, 9)


def test_a_crash_at_any_write_point_never_under_counts(ledger, monkeypatch):
    """A spend is acknowledged only after its line is fsynced; the head
    follows. Killed between the two, the line counts; killed mid-line (a
    torn, unacknowledged tail), the round never trained and the tail is cut
    at the next spend."""
    _spend(ledger, 1)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("killed after the line, before the head")

    monkeypatch.setattr(PrivacyLedger, "_write_head", crash)
    with pytest.raises(KeyboardInterrupt):
        _spend(ledger, 2)
    monkeypatch.undo()
    assert [s.round for s in ledger.spends()] == [1, 2]  # counted, not lost
    _spend(ledger, 3)
    with open(ledger.path, "a") as fh:
        fh.write('{"type": "spend", "run": "x", "rou')  # killed mid-write
    assert [s.round for s in ledger.spends()] == [1, 2, 3]
    _spend(ledger, 4)
    assert [s.round for s in ledger.spends()] == [1, 2, 3, 4]
    assert ledger.path.read_text().endswith("}\n")
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon([ROUND] * 4, 1e-5))


def test_concurrent_spends_at_one_site_cannot_both_pass_the_budget(ledger):
    """Two rounds at one site (two runs) with room for one: the check and
    the append are one step under the ledger's lock."""
    one = epsilon([ROUND], 1e-5)
    budget = (one + epsilon([ROUND, ROUND], 1e-5)) / 2  # one round fits, two do not
    outcomes: list[str] = []

    def spend(r: int) -> None:
        try:
            _spend(ledger, r, budget=budget)
            outcomes.append("spent")
        except BudgetExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=spend, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused", "spent"]
    assert len(ledger.spends()) == 1


def test_a_ledger_from_before_the_chain_is_upgraded_not_dropped(tmp_path):
    path = tmp_path / "ledger.jsonl"
    old = {"type": "spend", "run": "r", "round": 1, "steps": 40, "noise": 1.1}
    old |= {"sample_rate": 0.05, "delta": 1e-5, "accountant": "prv", "epsilon_after": 1.0}
    path.write_text(json.dumps(old | {"time": 1.0}) + "\n")
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="head"):
        ledger.spends()  # unchecked until chained
    ledger.upgrade()
    with pytest.raises(LedgerError, match="chained already"):
        ledger.upgrade()
    assert [s.round for s in ledger.spends()] == [1]
    _spend(ledger, 2)
    assert [s.round for s in ledger.spends()] == [1, 2]
    with pytest.raises(LedgerError, match="never started anew"):
        ledger.create("site-a")


def test_noiseless_round_is_infinite_epsilon_and_calibration_meets_target():
    assert epsilon([(0.0, 0.1, 10)], 1e-5) == float("inf")
    assert epsilon([], 1e-5) == 0.0
    sigma = calibrate_noise(4.0, 1e-5, 0.1, 300)
    assert epsilon([(sigma, 0.1, 300)], 1e-5) <= 4.0 + 0.05
    assert epsilon([(sigma * 0.9, 0.1, 300)], 1e-5) > 4.0
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    # Rounded down to a power of ten: δ travels in the clear, and 1/(10 n)
    # would tell n (found by review).
    assert default_delta(123_456) == pytest.approx(1e-7)
    assert default_delta(20_000) == default_delta(99_999) == pytest.approx(1e-6)


def _site_dir(tmp_path):
    from fedgan.site import work_dir

    work = tmp_path / "site"
    work_dir.ensure(work, "site-a")  # the container's first start
    PrivacyLedger.in_work_dir(work).spend(
        run="r", server_round=1, round_=ROUND, delta=1e-5, budget=100.0
    )
    return work


@pytest.mark.parametrize("attack", ["no-head-empty", "no-head-stripped", "wiped-but-cache"])
def test_a_site_start_never_reads_a_tampered_ledger_as_nothing_spent(tmp_path, attack):
    """Found by review: deleting the head and emptying the ledger (or
    stripping its hashes) was 'upgraded' at the next start, and deleting the
    four files the setup made looked like a new site."""
    from fedgan.site import work_dir

    work = _site_dir(tmp_path)
    ledger = PrivacyLedger.in_work_dir(work)
    (work / "cache").mkdir()
    if attack == "no-head-empty":
        ledger.head.unlink()
        ledger.path.write_text("")
    elif attack == "no-head-stripped":
        ledger.head.unlink()
        lines = [json.loads(x) for x in ledger.path.read_text().splitlines()]
        stripped = [{k: v for k, v in r.items() if k not in ("prev", "seq")} for r in lines]
        ledger.path.write_text("".join(json.dumps(r) + "\n" for r in stripped[1:]))
    else:
        for name in ("privacy-ledger.jsonl", "privacy-ledger.jsonl.head", "approval.json"):
            (work / name).unlink()
        for name in ("audit.jsonl", "audit.jsonl.head"):
            (work / name).unlink(missing_ok=True)
    with pytest.raises(LedgerError):
        work_dir.ensure(work, "site-a")
    assert not ledger.head.exists() or attack == "wiped-but-cache"
    with pytest.raises(LedgerError):
        ledger.spends()


def test_an_old_ledger_is_chained_only_when_a_person_asks(tmp_path):
    from fedgan.site import work_dir

    work = tmp_path / "site"
    work.mkdir()
    old = {"type": "spend", "run": "r", "round": 1, "steps": 40, "noise": 1.1}
    old |= {"sample_rate": 0.05, "delta": 1e-5, "accountant": "prv", "epsilon_after": 1.0}
    (work / "privacy-ledger.jsonl").write_text(json.dumps(old | {"time": 1.0}) + "\n")
    with pytest.raises(LedgerError, match="--upgrade-ledger"):
        work_dir.ensure(work, "site-a")
    done = work_dir.init(work, "site-a", upgrade_ledger=True)
    assert any("chained" in line for line in done)
    assert [s.round for s in PrivacyLedger.in_work_dir(work).spends()] == [1]
    assert work_dir.ensure(work, "site-a") == []
