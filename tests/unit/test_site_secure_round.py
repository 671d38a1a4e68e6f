"""The site's secure-aggregation stages over Flower's node state, with real
files: the durable record of the survivor set a site signed, and the checks
a site makes before it trains."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedgan import round_numbers, wire
from fedgan.errors import FedGanError
from fedgan.secagg import SecAggError, SecAggParams
from fedgan.secagg.messages import EncryptedShare, RevealedShare, pack
from fedgan.secagg.server import ServerSession
from fedgan.site import secure_round
from fedgan.site.approval import Limits
from fedgan.update import SiteUpdate
from tests.memory_federation import consortium

SITES = ("site-a", "site-b", "site-c")
STATS = round_numbers.DCGAN
# Each site's numbers about its round: under secure aggregation only their
# means may reach the aggregator.
NUMBERS = {
    "site-a": {"g-loss": 1.0, "d-loss": 0.5, "update-norm": 1.0, "update-clipped": 0.0},
    "site-b": {"g-loss": 2.0, "d-loss": 0.7, "update-norm": 10.0, "update-clipped": 1.0},
    "site-c": {"g-loss": 4.0, "d-loss": 0.9, "update-norm": 100.0, "update-clipped": 1.0},
}
FLOOR = Limits(min_sites=2, colluding_sites=0)  # t = 2 of 3: the server has a choice


def _params() -> SecAggParams:
    return SecAggParams.for_round(
        "run-r", 1, 3, bits=16, value_range=1.0, length=4 + len(STATS), threshold=2
    )


def _shared_round(tmp_path, settings=None, server_key=None):
    """Keys advertised and shares routed; ``server_key``: an aggregator that
    reuses its key from another attempt."""
    settings = settings or consortium(tmp_path, SITES)
    params = _params()
    server = ServerSession(params) if server_key is None else ServerSession(params, _key=server_key)
    states = {s: RecordDict() for s in SITES}
    update = SiteUpdate(
        gen=[np.full(2, 0.1, np.float32)], disc=[np.full(2, -0.1, np.float32)], weight=5
    )
    ads = [
        secure_round.advertise(states[s], settings[s], params, server.public_key, FLOOR)
        for s in SITES
    ]
    roster = pack([a.as_dict() for a in server.advertised(ads)])
    shares = {
        s: wire.secagg_list(
            secure_round.share_keys(states[s], settings[s], wire.secagg_message(roster=roster)),
            "shares",
            EncryptedShare,
        )
        for s in SITES
    }
    return settings, server, states, server.shared(shares), update


def _masked_round(tmp_path):
    settings, server, states, routed, update = _shared_round(tmp_path)
    envelopes = {}
    for s in SITES:
        secure_round.accept_shares(states[s], settings[s], routed[s], server.u2)
        envelopes[s] = secure_round.masked_input(states[s], settings[s], update, NUMBERS[s], STATS)
    server.received_masked(envelopes)
    return settings, server, states


def test_shares_are_checked_before_training_and_a_round_is_trained_once(tmp_path):
    """A garbage share fails before the site trains (nothing spent); a
    replayed train request, even with the state from before training, is
    refused before it spends again or masks a second update with the same
    masks."""
    settings, server, states, routed, update = _shared_round(tmp_path)
    site = "site-a"
    bad = [
        EncryptedShare(x.sender, x.receiver, x.ciphertext[:-1] + bytes([x.ciphertext[-1] ^ 1]))
        for x in routed[site]
    ]
    with pytest.raises(SecAggError, match="authentication"):
        secure_round.accept_shares(states[site], settings[site], bad, server.u2)
    before = states[site].config_records[secure_round.SESSION]["state"]
    secure_round.accept_shares(states[site], settings[site], routed[site], server.u2)
    secure_round.masked_input(states[site], settings[site], update, NUMBERS[site], STATS)
    states[site][secure_round.SESSION] = ConfigRecord({"state": before})  # state rolled back
    with pytest.raises(SecAggError, match="already trained in this attempt at round 1"):
        secure_round.accept_shares(states[site], settings[site], routed[site], server.u2)


def test_a_round_retried_after_a_crash_is_a_new_attempt_the_site_answers(tmp_path):
    """Issue 33: the aggregator died mid-round 1 after the sites had trained
    and signed; the resumed run retries round 1 (same run name, same round).
    It comes with fresh keys, so nothing done in the lost attempt bears on
    it: the sites train and sign again (their ledgers count both) instead of
    refusing the round forever, as they did when the record was per round."""
    settings, _, states = _masked_round(tmp_path)
    for s in SITES:
        secure_round.confirm(states[s], settings[s], wire.secagg_message(survivors=list(SITES)))
    _, server, states, routed, update = _shared_round(tmp_path, settings)
    for s in SITES:
        secure_round.accept_shares(states[s], settings[s], routed[s], server.u2)
        secure_round.masked_input(states[s], settings[s], update, NUMBERS[s], STATS)
    # It may even settle on another survivor set than the lost attempt did.
    reply = secure_round.confirm(
        states["site-a"], settings["site-a"], wire.secagg_message(survivors=["site-a", "site-b"])
    )
    assert wire.secagg_bytes(reply, "signature")


def test_a_site_that_lost_its_state_after_signing_refuses_a_second_survivor_set(tmp_path):
    """Issue 32, item 5: the site signs "everyone survived" (so it will hand
    out site-c's seed), then loses the state Flower would have saved (a
    crash after its reply, a restart). Asked again with "site-c dropped" (so
    that it would hand out site-c's mask key too), it refuses."""
    settings, _, states = _masked_round(tmp_path)
    site = "site-a"
    before = states[site].config_records[secure_round.SESSION]["state"]
    secure_round.confirm(states[site], settings[site], wire.secagg_message(survivors=list(SITES)))
    states[site][secure_round.SESSION] = ConfigRecord({"state": before})  # the state is lost
    with pytest.raises(SecAggError, match="already signed another survivor set for round 1"):
        secure_round.confirm(
            states[site], settings[site], wire.secagg_message(survivors=["site-a", "site-b"])
        )
    # The same set again is no new information: it is answered.
    reply = secure_round.confirm(
        states[site], settings[site], wire.secagg_message(survivors=list(SITES))
    )
    assert wire.secagg_bytes(reply, "signature")


def test_a_round_reveals_only_the_sum_through_the_site_stages(tmp_path):
    settings, server, states = _masked_round(tmp_path)
    signatures = {
        s: wire.secagg_bytes(
            secure_round.confirm(
                states[s], settings[s], wire.secagg_message(survivors=list(SITES))
            ),
            "signature",
        )
        for s in SITES
    }
    confirmed = server.confirmed(signatures)
    request = wire.secagg_message(signatures=wire.pack_signatures(confirmed))
    reveals = {
        s: wire.secagg_list(
            secure_round.unmask(states[s], settings[s], request), "reveals", RevealedShare
        )
        for s in SITES
    }
    total = server.unmasked(reveals)
    assert np.allclose(total.mean[:4], [0.1, 0.1, -0.1, -0.1], atol=total.error_bound)
    # The sites' numbers come out as their means only (norms: geometric).
    means = round_numbers.decode(STATS, total.mean[4:], 1.0)
    assert means["g-loss"] == pytest.approx(7 / 3, abs=32 * total.error_bound)
    assert means["d-loss"] == pytest.approx(0.7, abs=32 * total.error_bound)
    assert means["update-norm"] == pytest.approx(10.0, rel=1e-2)
    assert means["update-clipped"] == pytest.approx(2 / 3, abs=total.error_bound)
    assert means["secagg-clipped"] == pytest.approx(0.0, abs=total.error_bound)
    assert all(secure_round.SESSION not in states[s].config_records for s in SITES)


@pytest.mark.parametrize(
    ("limits", "n", "t", "match"),
    [
        (Limits(), 3, 2, "threshold 2 of 3 sites is below this site's rule"),
        (Limits(min_sites=4), 3, 3, "rule joins sums of at least 4"),
    ],
)
def test_a_site_checks_the_setup_before_it_trains(tmp_path, limits, n, t, match):
    settings = consortium(tmp_path, SITES)["site-a"]
    params = SecAggParams.for_round("r", 1, n, bits=8, value_range=1.0, length=4, threshold=t)
    with pytest.raises(FedGanError, match=match):
        secure_round.check_setup(settings, limits, params, b"", b"")


def test_a_masked_reply_carries_only_the_ledgers_figures_in_the_clear():
    """Issue 32, item 7: no count, no loss, no norm, no clip flag of one
    site in the clear; those travel inside the mask."""
    ledger = {"epsilon": 1.5, "epsilon-budget": 8.0, "delta": 1e-5, "noise-multiplier": 1.1}
    metrics = {
        **ledger,
        "sample-rate": 0.25,
        "train-seconds": 12.0,
        "num-examples": 48.0,
        "g-loss": 0.9,
        "d-loss": 1.3,
        "mode-seeking-loss": 0.2,
        "update-norm": 3.2,
        "update-clipped": 1.0,
        "noise-figure": 41.0,
    }
    reply = wire.masked_reply("site-a", metrics, b"sealed")
    assert dict(reply[wire.METRICS]) == ledger
    # A release's noisy count is part of its DP release: it is sent.
    release = wire.masked_reply("site-a", metrics, b"sealed", weight=47.3)
    assert dict(release[wire.METRICS]) == {**ledger, "num-examples": 47.3}


def test_a_plain_reply_drops_the_numbers_that_tell_a_sites_image_count():
    update = SiteUpdate(gen=[np.zeros(2, np.float32)], disc=[np.zeros(2, np.float32)], weight=1)
    metrics = {"sample-rate": 0.25, "train-seconds": 12.0, "epsilon": 1.5, "g-loss": 0.9}
    reply = wire.train_reply(update, "site-a", metrics)
    assert dict(reply[wire.METRICS]) == {"num-examples": 1.0, "epsilon": 1.5, "g-loss": 0.9}


@pytest.mark.parametrize("stat", round_numbers.DCGAN)
def test_a_number_survives_its_encoding_and_saturates_beyond_its_bound(stat):
    value = 0.37 if not stat.log else 123.0
    r = 0.05  # the quantization range: the encoding does not depend on it
    encoded = round_numbers.encode((stat,), {stat.name: value}, r)
    assert abs(encoded[0]) <= r
    assert round_numbers.decode((stat,), encoded, r)[stat.name] == pytest.approx(value)
    huge = round_numbers.encode((stat,), {stat.name: 1e300}, r)
    assert huge[0] == pytest.approx(r)  # cut to the range, never past it
    missing = round_numbers.encode((stat,), {}, r)
    assert round_numbers.decode((stat,), missing, r)[stat.name] == 0.0  # sent as 0


def test_a_signature_from_an_earlier_attempt_does_not_count_in_a_retry(tmp_path):
    """Review of issue 33's per-attempt records: an aggregator that retries a
    round with its old key could hand a site another site's signature from
    the earlier attempt (on a set that site never signed in this one), to
    make up the t signatures that let it reveal. The signed bytes name the
    attempt's roster, so the old signature does not verify."""
    settings = consortium(tmp_path, SITES)
    key = ServerSession(_params())._key

    def attempt():
        _, server, states, routed, update = _shared_round(tmp_path, settings, server_key=key)
        for s in SITES:
            secure_round.accept_shares(states[s], settings[s], routed[s], server.u2)
            secure_round.masked_input(states[s], settings[s], update, NUMBERS[s], STATS)
        return states

    def sign(states, site, survivors):
        reply = secure_round.confirm(
            states[site], settings[site], wire.secagg_message(survivors=survivors)
        )
        return wire.secagg_bytes(reply, "signature")

    earlier = attempt()
    old_b = sign(earlier, "site-b", ["site-a", "site-b"])  # then the aggregator "crashed"
    retry = attempt()
    sig_a = sign(retry, "site-a", ["site-a", "site-b"])  # site-a is told site-c dropped
    sign(retry, "site-b", ["site-a", "site-b", "site-c"])  # site-b is told it did not
    request = wire.secagg_message(
        signatures=wire.pack_signatures({"site-a": sig_a, "site-b": old_b})
    )
    with pytest.raises(SecAggError, match="site-b did not sign the survivor set"):
        secure_round.unmask(retry["site-a"], settings["site-a"], request)


def test_keys_sent_ahead_wait_beside_the_round_and_become_the_next_session(tmp_path):
    """Issue 34: the next round's keys, made during this round's confirm
    stage, leave this round's session alone; after this round's reveals the
    roster for the next round turns them into its session; a round that
    advertises on its own replaces them; a roster with no keys sent ahead
    is refused."""
    settings, server, states, routed, _update = _shared_round(tmp_path)
    s = "site-a"
    current = states[s].config_records[secure_round.SESSION]["state"]
    following = SecAggParams.for_round(
        "run-r", 2, 3, bits=16, value_range=1.0, length=4 + len(STATS), threshold=2
    )
    next_server = ServerSession(following)
    ads = {
        site: secure_round.advertise(
            states[site], settings[site], following, next_server.public_key, FLOOR, ahead=True
        )
        for site in SITES
    }
    assert states[s].config_records[secure_round.SESSION]["state"] == current
    # This round goes on unharmed with its own session.
    secure_round.accept_shares(states[s], settings[s], routed[s], server.u2)
    del states[s][secure_round.SESSION]  # as unmask leaves it
    roster = pack([a.as_dict() for a in next_server.advertised(list(ads.values()))])
    packed = secure_round.share_ahead(states[s], settings[s], roster)
    assert secure_round.NEXT not in states[s].config_records
    assert secure_round.SESSION in states[s].config_records
    assert wire.secagg_list(wire.secagg_message(shares=packed), "shares", EncryptedShare)
    # A second roster for the same keys has nothing sent ahead to use.
    with pytest.raises(SecAggError, match="no keys sent ahead"):
        secure_round.share_ahead(states[s], settings[s], roster)
    # Keys sent ahead, then a round that advertises on its own: they go.
    secure_round.advertise(
        states["site-b"], settings["site-b"], following, next_server.public_key, FLOOR
    )
    assert secure_round.NEXT not in states["site-b"].config_records
