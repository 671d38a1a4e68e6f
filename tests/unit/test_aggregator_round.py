"""Whole aggregator rounds in memory (`fedgan.aggregator.round`): FedAvg of
the sites' deltas in the clear and through secure aggregation, dropouts at
every stage, an abort below the threshold, refusals, and what each round
leaves in the run store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedgan import wire
from fedgan.aggregator.round import run_round
from fedgan.aggregator.run import run_federation
from fedgan.secagg.messages import unpack
from fedgan.weights import get_arrays
from tests.memory_federation import MemorySite, aggregator, consortium, federation

WEIGHTS = {"site-a": 10.0, "site-b": 30.0, "site-c": 60.0}
STEPS = {"site-a": 0.004, "site-b": -0.002, "site-c": 0.001}


def _sites(tmp_path, **overrides: dict) -> list[MemorySite]:
    settings = consortium(tmp_path, list(WEIGHTS))
    return [
        MemorySite(s, WEIGHTS[s], STEPS[s], settings[s], **overrides.get(s, {})) for s in WEIGHTS
    ]


def _mean_step(sites: list[str]) -> float:
    return sum(WEIGHTS[s] * STEPS[s] for s in sites) / sum(WEIGHTS[s] for s in sites)


def _secure_mean(sites: list[str]) -> float:
    """Under secure aggregation every site counts equally: no count leaves a site."""
    return sum(STEPS[s] for s in sites) / len(sites)


def _disc_moved_by(fed, before: list[np.ndarray]) -> np.ndarray:
    """How far each of D's values moved (D has no BatchNorm, so the
    aggregator's recalibration of G leaves it alone)."""
    return np.concatenate(
        [(a - b).ravel() for a, b in zip(get_arrays(fed.disc), before, strict=True)]
    )


def test_a_plain_round_applies_the_weighted_mean_of_the_deltas(tmp_path):
    fed = federation(tmp_path, _sites(tmp_path), secagg=False)
    before = get_arrays(fed.disc)
    record = run_round(fed, 1)
    moved = _disc_moved_by(fed, before)
    assert np.allclose(moved, _mean_step(list(WEIGHTS)), atol=1e-7)
    assert record.sites == sorted(WEIGHTS) and record.sites_failed == 0
    assert record.examples == sum(WEIGHTS.values())
    # Losses weighted by image counts.
    expected_g = sum(WEIGHTS[s] * (1 + STEPS[s]) for s in WEIGHTS) / sum(WEIGHTS.values())
    assert record.g_loss == pytest.approx(expected_g)
    line = json.loads(fed.store.metrics_path.read_text().splitlines()[-1])
    assert line == record.as_dict() and "secagg" not in line and "skipped" not in line
    assert fed.store.load_checkpoint()["round"] == 1
    assert fed.store.samples_path(1).read_bytes().startswith(b"\x89PNG")


def test_a_secure_round_recovers_the_same_mean_within_its_error_bound(tmp_path):
    fed = federation(tmp_path, _sites(tmp_path), secagg=True)
    before = get_arrays(fed.disc)
    record = run_round(fed, 1)
    moved = _disc_moved_by(fed, before)
    assert record.secagg is not None and record.secagg["survivors"] == sorted(WEIGHTS)
    assert record.secagg_error_bound is not None and record.secagg_error_bound > 0
    assert np.abs(moved - _secure_mean(list(WEIGHTS))).max() <= record.secagg_error_bound
    assert record.examples == 3  # sites, not images
    # The sites' losses and clip flags came inside the mask: their means.
    step = 32 * record.secagg_error_bound / record.secagg["value_range"]
    assert record.g_loss == pytest.approx(1 + _secure_mean(list(WEIGHTS)), abs=step)
    assert record.d_loss == pytest.approx(2.0, abs=step)
    assert record.updates_clipped == 0
    assert record.secagg_clipped_fraction == pytest.approx(0.0, abs=step)
    # No plain delta travelled: the train replies carry no arrays.
    assert all(b > 0 for b in record.update_bytes.values())
    stages = [r.kind for r in fed.transport.log]
    # Keys before training; then training and masking in one message.
    assert stages == [
        *["train.secagg_advertise"] * 3,
        *["train.secagg_share"] * 3,
        *["train"] * 3,
        *["train.secagg_confirm"] * 3,
        *["train.secagg_unmask"] * 3,
    ]


def _kinds(fed, round_number: int) -> list[str]:
    """The message types of one round, in the order sent."""
    prefix = (str(round_number), f"{round_number}-")
    return [
        r.kind for r in fed.transport.log if r.group == prefix[0] or r.group.startswith(prefix[1])
    ]


def test_a_later_round_starts_with_the_keys_and_shares_sent_during_the_last(tmp_path):
    """Issue 34: each message costs a round about 3.5 s of Flower's polling.
    From round 2 on, the next round's advertisement rides on this round's
    confirm exchange and its shares on the unmask exchange, so a secure
    round is three messages, not five; the last round asks for none. Keys
    are fresh every round, and every round sums exactly."""
    fed = federation(tmp_path, _sites(tmp_path), secagg=True, num_server_rounds=3)
    keys: list[set[bytes]] = []
    for n in (1, 2, 3):
        before = get_arrays(fed.disc)
        record = run_round(fed, n)
        moved = _disc_moved_by(fed, before)
        assert record.secagg["survivors"] == sorted(WEIGHTS) and "skipped" not in record.as_dict()
        assert np.abs(moved - _secure_mean(list(WEIGHTS))).max() <= record.secagg_error_bound
        states = [site.state for site in fed.transport.sites.values()]
        assert all("secagg-next-session" not in s.config_records for s in states)
    assert _kinds(fed, 1)[:6] == ["train.secagg_advertise"] * 3 + ["train.secagg_share"] * 3
    for n in (2, 3):
        assert _kinds(fed, n) == [
            *["train"] * 3,
            *["train.secagg_confirm"] * 3,
            *["train.secagg_unmask"] * 3,
        ]
    confirms = [r for r in fed.transport.log if r.kind == "train.secagg_confirm"]
    ahead = [wire.read_lookahead(r.content) for r in confirms]
    assert [a[1].params.round if a else None for a in ahead] == [2] * 3 + [3] * 3 + [None] * 3
    unmasks = [r for r in fed.transport.log if r.kind == "train.secagg_unmask"]
    rosters = [wire.next_bytes(r.content, "roster") for r in unmasks]
    for raw in rosters[:6]:
        assert raw is not None
        keys.append({a["s_pk"] for a in unpack(raw)} | {a["c_pk"] for a in unpack(raw)})
    assert rosters[6:] == [None] * 3
    # Fresh keys every round, never one round's keys in another.
    assert not (keys[0] & keys[3])
    assert fed.ahead is None


@pytest.mark.parametrize(
    "change",
    [
        "a site sent no keys ahead",
        "a site refused the roster",
        "a site missed the round",
        "the CRL changed",
    ],
)
def test_a_round_that_did_not_go_as_planned_advertises_on_its_own(tmp_path, change):
    """Keys and shares sent ahead are used only if the round is exactly what
    was planned; otherwise the round advertises and shares on its own, so a
    refusal is heard and a new CRL reaches the sites in the setup."""
    sites = _sites(tmp_path)
    crl_path = tmp_path / "certs" / "ca" / "crl.pem"
    fed = federation(
        tmp_path,
        sites,
        secagg=True,
        num_server_rounds=2,
        secagg_crl=str(crl_path),
        secagg_threshold=2,
    )
    if change == "a site sent no keys ahead":
        sites[2].keys_ahead = False
    if change == "a site refused the roster":
        sites[1].tampered_roster_ahead = True
    if change == "a site missed the round":
        sites[2].silent_at = "train"
    first = run_round(fed, 1)
    if change == "a site missed the round":
        sites[2].silent_at = ""  # back for round 2, which had planned it
    if change == "a site refused the roster":
        # Heard at the aggregator, recorded once in the site's own audit log.
        assert any("site-b refused round 2's roster" in f for f in first.failures)
        audit = (tmp_path / "work" / "site-b" / "audit.jsonl").read_text().splitlines()
        refusals = [json.loads(x) for x in audit if '"secagg_refused"' in x]
        assert [r["stage"] for r in refusals] == ["secagg_share"]
        assert "signature" in refusals[0]["reason"]
    if change == "the CRL changed":
        from fedgan import pki

        pki.revoke_site(tmp_path / "certs", "site-c")
        crl = crl_path.read_bytes()
    before = get_arrays(fed.disc)
    record = run_round(fed, 2)
    kinds = _kinds(fed, 2)
    assert kinds[:3] == ["train.secagg_advertise"] * 3
    if change == "the CRL changed":
        setup = wire.read_advertise_request(
            next(
                r
                for r in fed.transport.log
                if r.kind == "train.secagg_advertise" and r.group == "2-secagg_advertise"
            ).content
        )[1]
        assert setup.crl == crl
        # Heard at once: site-c is off the new list, and the round is too big for it.
        assert "abandoned at key advertisement" in record.skipped
        assert "not in the consortium's membership list" in record.refused["site-c"]
    else:
        assert kinds[3:6] == ["train.secagg_share"] * 3
        moved = _disc_moved_by(fed, before)
        assert record.secagg["survivors"] == sorted(WEIGHTS)
        assert np.abs(moved - _secure_mean(list(WEIGHTS))).max() <= record.secagg_error_bound


@pytest.mark.parametrize("stage", ["secagg_advertise", "secagg_share", "train"])
def test_a_site_silent_before_masking_is_left_out_of_the_sum(tmp_path, stage):
    sites = _sites(tmp_path, **{"site-c": {"silent_at": stage}})
    # t = 2 of 3: below the sites' default rule, within these sites' (the floor).
    fed = federation(tmp_path, sites, secagg=True, secagg_threshold=2)
    before = get_arrays(fed.disc)
    record = run_round(fed, 1)
    moved = _disc_moved_by(fed, before)
    assert record.sites == ["site-a", "site-b"] and "skipped" not in record.as_dict()
    assert np.abs(moved - _secure_mean(["site-a", "site-b"])).max() <= record.secagg_error_bound
    if stage != "secagg_advertise":
        assert record.secagg["failures"]["site-c"].startswith(stage)
    # Only a site that shared its keys is asked to train.
    asked = [r.node for r in fed.transport.log if r.kind == "train"]
    assert (3 in asked) == (stage == "train")


@pytest.mark.parametrize("stage", ["secagg_confirm", "secagg_unmask"])
def test_a_site_silent_after_masking_is_still_in_the_sum(tmp_path, stage):
    # It masked its update; the others' shares remove its masks.
    sites = _sites(tmp_path, **{"site-c": {"silent_at": stage}})
    fed = federation(tmp_path, sites, secagg=True, secagg_threshold=2)
    before = get_arrays(fed.disc)
    record = run_round(fed, 1)
    moved = _disc_moved_by(fed, before)
    assert record.sites == sorted(WEIGHTS)
    assert np.abs(moved - _secure_mean(list(WEIGHTS))).max() <= record.secagg_error_bound


def test_a_round_that_cannot_reach_its_threshold_is_abandoned_before_anyone_trains(tmp_path):
    """Issue 32, item 8: at the sites' default rule (t = 3 of 3), one site
    silent when keys are advertised abandons the round before any training
    request is sent, so no site spends privacy budget for it."""
    sites = _sites(tmp_path, **{"site-c": {"silent_at": "secagg_advertise"}})
    fed = federation(tmp_path, sites, secagg=True)
    record = run_round(fed, 1)
    assert record.skipped and "abandoned at key advertisement" in record.skipped
    assert "train" not in [r.kind for r in fed.transport.log]
    assert all(site.trained == 0 for site in fed.transport.sites.values())


def test_below_the_threshold_the_round_is_abandoned_and_the_model_kept(tmp_path):
    sites = _sites(tmp_path, **{s: {"silent_at": "train"} for s in ("site-b", "site-c")})
    fed = federation(tmp_path, sites, secagg=True)
    before = get_arrays(fed.gen) + get_arrays(fed.disc)
    record = run_round(fed, 1)
    after = get_arrays(fed.gen) + get_arrays(fed.disc)
    assert record.skipped and "secagg" in record.as_dict()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert not fed.store.samples_path(1).exists()
    assert fed.store.load_checkpoint()["round"] == 1  # a resume starts at round 2
    events = [json.loads(line)["event"] for line in fed.audit.path.read_text().splitlines()]
    assert "secagg_aborted" in events


def test_refusals_and_budget_are_recorded_and_the_site_left_out(tmp_path):
    refusal = wire.refusal_text("site-c", "secure aggregation is required")
    budget = {"budget-exhausted": 1.0, "epsilon": 9.9, "epsilon-next": 10.5, "epsilon-budget": 10.0}
    sites = _sites(tmp_path, **{"site-c": {"error_at": "train", "error": refusal}})
    fed = federation(tmp_path, sites, secagg=False)
    record = run_round(fed, 1)
    assert record.refused == {"site-c": "secure aggregation is required"}
    assert record.sites_failed == 0 and 3 not in fed.available()
    fed.transport.sites[2].metrics = budget
    record = run_round(fed, 2)
    assert record.budget_exhausted == {
        "site-b": {"epsilon": 9.9, "epsilon_next": 10.5, "budget": 10.0}
    }
    assert record.sites == ["site-a"] and fed.available() == [1]
    assert fed.nobody_left() == ""
    assert fed.summary()["budget_exhausted"] == ["site-b"]


def test_an_unreadable_error_is_a_failure_not_a_refusal(tmp_path):
    sites = _sites(tmp_path, **{"site-a": {"error_at": "train", "error": "boom"}})
    fed = federation(tmp_path, sites, secagg=False)
    record = run_round(fed, 1)
    assert record.sites_failed == 1 and record.failures == ["node 1: boom"]
    assert 1 in fed.available()


ME = {
    "mechanism": "mean-embedding",
    "num_server_rounds": 1,
    "embedding_features": 20,
    "embedding_fit_steps": 4,
}


def test_a_mean_embedding_round_keeps_the_release_sum_then_fits_g_to_it(tmp_path):
    fed = federation(tmp_path, _sites(tmp_path), secagg=False, **ME)
    record = run_round(fed, 1)
    assert record.mechanism == "mean-embedding" and record.fit_steps == 4
    kept = fed.store.kept_release(1, fed.mechanism.digest, (1, 41))
    assert kept is not None and kept.record["examples"] == sum(WEIGHTS.values())
    assert np.allclose(kept.mean, _mean_step(list(WEIGHTS)), atol=1e-7)
    assert record.class_counts == {"all": pytest.approx(100 * _mean_step(list(WEIGHTS)), abs=0.1)}


def test_a_model_update_in_a_mean_embedding_round_is_not_summed(tmp_path):
    sites = _sites(tmp_path)
    sites[0].release_for = lambda record: None  # site-a answers with Δ of G and D
    fed = federation(tmp_path, sites, secagg=False, **ME)
    record = run_round(fed, 1)
    assert record.failures == ["site site-a: its release is not (1, 41) values"]
    kept = fed.store.kept_release(1, fed.mechanism.digest, (1, 41))
    assert np.allclose(kept.mean, _mean_step(["site-b", "site-c"]), atol=1e-7)


def test_a_run_in_which_no_round_produced_a_model_fails(tmp_path):
    # Every round abandoned: nothing to share, and no generator.pt to list.
    sites = _sites(tmp_path, **{s: {"silent_at": "train"} for s in WEIGHTS})
    transport, settings, store, audit = aggregator(tmp_path, sites, num_server_rounds=2)
    summary = run_federation(transport, settings, store, audit)
    assert summary["stopped"].startswith("no round produced a model")
    assert "fewer than" in summary["stopped"] or "threshold" in summary["stopped"]
    assert not store.generator_path.exists()
    assert len(store.metrics_path.read_text().splitlines()) == 2


def test_a_run_with_one_model_producing_round_completes(tmp_path):
    transport, settings, store, audit = aggregator(tmp_path, _sites(tmp_path), secagg=False)
    summary = run_federation(transport, settings, store, audit)
    assert "stopped" not in summary and store.generator_path.exists()


def test_a_misshapen_or_unreadable_reply_is_one_sites_failure_not_the_runs(tmp_path):
    from flwr.app import RecordDict

    from fedgan.update import SiteUpdate

    sites = _sites(tmp_path)
    sites[0].update_for = (
        lambda gen, disc: SiteUpdate(  # one array short
            gen=[np.zeros_like(a) for a in gen[1:]], disc=disc, weight=10.0
        )
    )
    sites[1].answer = lambda request: RecordDict()  # no metrics, no site id
    fed = federation(tmp_path, sites, secagg=False)
    before = get_arrays(fed.disc)
    record = run_round(fed, 1)
    assert record.failures == [
        "site site-a: its update does not have the global model's shapes",
        "node 2: an unreadable reply (KeyError)",
    ]
    assert record.sites == ["site-c"]
    assert np.allclose(_disc_moved_by(fed, before), STEPS["site-c"], atol=1e-7)
