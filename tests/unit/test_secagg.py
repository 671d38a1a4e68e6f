"""The secure-aggregation protocol, in memory: exactness against the plain
weighted mean, dropouts at every stage, what the server can and cannot see,
and the refusals that protect a site."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedgan.secagg import RoundAborted, SecAggError, SecAggParams, shamir
from fedgan.secagg.client import SiteSession
from fedgan.secagg.messages import (
    Advertisement,
    EncryptedShare,
    consistency_bytes,
    pack,
    unpack,
)
from fedgan.secagg.params import ThresholdRule, default_threshold, min_modulus_bits
from fedgan.secagg.quantize import quantize
from fedgan.secagg.server import ServerSession
from tests.secagg_sim import FLOOR, Consortium, advertise, plain_mean, run_round, site_ids

STAGES = ("advertise", "share", "mask", "confirm", "unmask")
CONSORTIUM = Consortium()


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 20))
    t = draw(st.integers(n // 2 + 1, n))
    length = draw(st.integers(1, 40))
    bits = draw(st.sampled_from((8, 12, 16)))
    ids = site_ids(n)
    drops, alive = {}, list(ids)
    for stage in STAGES:
        gone = draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))
        drops[stage] = {g for g in gone if g in alive}
        alive = [a for a in alive if a not in drops[stage]]
    values = draw(
        st.lists(
            st.lists(st.floats(-2, 2, allow_nan=False), min_size=length, max_size=length),
            min_size=n,
            max_size=n,
        )
    )
    return n, t, bits, ids, drops, values


# Derandomized: the same 300 rounds on every machine, so a failure repeats
# (issue 33: 30 random examples could miss a case and never show it twice).
@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(rounds())
def test_sum_equals_plain_mean_or_aborts_exactly_below_threshold(case):
    n, t, bits, ids, drops, values = case
    params = SecAggParams.for_round(
        "run-a", 3, n, bits=bits, value_range=1.5, length=len(values[0]), threshold=t
    )
    updates = {s: np.array(v) for s, v in zip(ids, values, strict=True)}
    alive, first_short = list(ids), None
    for stage in STAGES:
        alive = [a for a in alive if a not in drops[stage]]
        if len(alive) < t and first_short is None:
            first_short = stage
    if first_short is not None:
        with pytest.raises(RoundAborted, match="abandoned"):
            run_round(params, updates, CONSORTIUM, drops)
        return
    agg = run_round(params, updates, CONSORTIUM, drops)
    expected_survivors = [s for s in ids if not any(s in drops[x] for x in STAGES[:3])]
    assert agg.survivors == expected_survivors
    reference = plain_mean(params, updates, agg.survivors)
    assert np.all(np.abs(agg.mean - reference) <= agg.error_bound + 1e-9)
    # The bound from its formula, not from the code under test (issue 33:
    # four times the bound left every test green). Stochastic rounding moves
    # each site's value by less than one step, 2r / (2^bits − 1); every site
    # counts once, so the mean moves by less than one step too.
    assert agg.error_bound == pytest.approx(2 * 1.5 / (2**bits - 1), rel=1e-12)


def test_quantization_error_is_small_at_12_bits():
    rng = np.random.default_rng(1)
    ids = site_ids(5)
    params = SecAggParams.for_round("r", 1, 5, bits=12, value_range=1.0, length=4000)
    updates = {s: rng.normal(0, 0.3, 4000) for s in ids}
    agg = run_round(params, updates, CONSORTIUM, {"mask": {ids[2]}})
    reference = plain_mean(params, updates, agg.survivors)
    assert agg.dropped == [ids[2]]
    # Unbiased rounding: the typical error is far below the worst-case bound,
    # which is one step, 2r / 4095.
    assert agg.error_bound == pytest.approx(2 / 4095, rel=1e-12)
    assert np.sqrt(np.mean((agg.mean - reference) ** 2)) < agg.error_bound / 4
    # ...and the bound is not loose by a factor: some values err by more than
    # a quarter step (each is the mean of 4 errors, each uniform within a step).
    assert np.abs(agg.mean - reference).max() > agg.error_bound / 4


def test_one_masked_input_is_uniform_to_the_server():
    """The server opens a site's envelope and sees values indistinguishable
    from uniform modulo 2^m, while the unmasked quantized vector is not."""
    ids = site_ids(3)
    length = 50_000
    params = SecAggParams.for_round("r", 1, 3, bits=8, value_range=1.0, length=length)
    server, sessions, roster = advertise(params, CONSORTIUM, ids, ThresholdRule())
    routed = server.shared({s: sessions[s].share_keys(roster, CONSORTIUM.verifier()) for s in ids})
    update = np.full(length, 0.25)  # a maximally non-uniform input
    envelopes = {s: sessions[s].masked_input(update, routed[s], server.u2)[0] for s in ids}
    server.received_masked(envelopes)
    seen = server.masked[ids[0]][:-2].astype(np.int64)
    bins = 64
    observed = np.bincount(seen * bins // params.modulus, minlength=bins)
    assert chisquare(observed).pvalue > 1e-4
    plain, _ = quantize(update, 255, params)
    raw = np.bincount(plain[:-2].astype(np.int64) * bins // params.modulus, minlength=bins)
    assert chisquare(raw).pvalue < 1e-12


def test_fewer_than_t_shares_are_consistent_with_any_secret():
    secret, t = 2**255 + 12345, 4
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], t)
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5, 6)}, t) == secret
    few = {x: shares[x] for x in (1, 3, 6)}
    with pytest.raises(SecAggError, match="cannot recover"):
        shamir.reconstruct(few, t)
    # t−1 shares plus any guessed secret define a valid polynomial: every
    # guess is equally consistent, so the shares alone say nothing.
    for guess in (0, 1, secret, shamir.PRIME - 1):
        points = {**few, 0: guess}
        assert _interpolate(points, 0) == guess
        assert all(_interpolate(points, x) == y for x, y in few.items())


def _interpolate(points: dict[int, int], at: int) -> int:
    p, total = shamir.PRIME, 0
    for xi, yi in points.items():
        num = den = 1
        for xj in points:
            if xj != xi:
                num, den = num * (at - xj) % p, den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


def _setup(n=3, length=8):
    ids = site_ids(n)
    params = SecAggParams.for_round("run-x", 2, n, bits=8, value_range=1.0, length=length)
    server = ServerSession(params)
    sessions, ads = {}, []
    for s in ids:
        sessions[s], ad = SiteSession.start(params, server.public_key, CONSORTIUM.signer(s), FLOOR)
        ads.append(ad)
    return ids, params, server, sessions, ads


def _confirm_all(server, sessions, survivors):
    return server.confirmed(
        {s: sessions[s].confirm(survivors, CONSORTIUM.signer(s)) for s in survivors}
    )


def test_a_site_reveals_once_and_only_for_the_set_it_signed():
    ids, params, server, sessions, ads = _setup()
    roster = server.advertised(ads)
    routed = server.shared({s: sessions[s].share_keys(roster, CONSORTIUM.verifier()) for s in ids})
    server.received_masked(
        {s: sessions[s].masked_input(np.zeros(params.length), routed[s], server.u2)[0] for s in ids}
    )
    with pytest.raises(SecAggError, match="out-of-order"):
        sessions[ids[0]].unmask({})  # no reveal before the consistency check
    confirmed = _confirm_all(server, sessions, ids)
    with pytest.raises(SecAggError, match="2 sites confirmed"):
        sessions[ids[0]].unmask({s: confirmed[s] for s in ids[:2]})
    # A signature over another set (site-02 told that site-01 dropped).
    other = CONSORTIUM.signer(ids[2]).sign(
        consistency_bytes(params, server.public_key, server.roster_digest(), [ids[0], ids[2]])
    )
    with pytest.raises(SecAggError, match="site-02 did not sign the survivor set"):
        sessions[ids[0]].unmask({**confirmed, ids[2]: other})
    reveals = sessions[ids[0]].unmask(confirmed)
    assert {(r.owner, r.kind) for r in reveals} == {(s, "b") for s in ids}
    with pytest.raises(SecAggError, match="out-of-order"):
        sessions[ids[0]].unmask(confirmed)  # a second request is a replay


def test_a_substituted_key_or_foreign_certificate_is_caught_by_the_sites():
    ids, params, server, sessions, ads = _setup()
    evil, _ = SiteSession.start(params, server.public_key, CONSORTIUM.signer("site-99"))
    forged = Advertisement(**{**ads[1].as_dict(), "s_pk": evil.s_sk[:0] + ads[2].s_pk})
    with pytest.raises(SecAggError, match="site-01: bad signature"):
        sessions[ids[0]].share_keys([ads[0], forged, ads[2]], CONSORTIUM.verifier())
    # A valid certificate, but for another site than the one claimed.
    impostor = CONSORTIUM.signer("site-01", uri_site="site-07")
    _, ad = SiteSession.start(params, server.public_key, impostor)
    with pytest.raises(SecAggError, match="not this site"):
        sessions[ids[0]].share_keys([ads[0], ad, ads[2]], CONSORTIUM.verifier())
    # A certificate from another CA.
    _, stranger = SiteSession.start(params, server.public_key, Consortium().signer("site-02"))
    with pytest.raises(SecAggError, match="site-02: signing certificate rejected"):
        sessions[ids[0]].share_keys([ads[0], ads[1], stranger], CONSORTIUM.verifier())


def test_tampered_or_misrouted_share_fails_authentication():
    ids, params, server, sessions, ads = _setup()
    roster = server.advertised(ads)
    routed = server.shared({s: sessions[s].share_keys(roster, CONSORTIUM.verifier()) for s in ids})
    inbox = routed[ids[0]]
    bad = bytearray(inbox[0].ciphertext)
    bad[-1] ^= 1
    tampered = [EncryptedShare(inbox[0].sender, inbox[0].receiver, bytes(bad)), *inbox[1:]]
    with pytest.raises(SecAggError, match=f"share from site {inbox[0].sender}: authentication"):
        SiteSession.from_bytes(sessions[ids[0]].to_bytes()).masked_input(
            np.zeros(params.length), tampered, server.u2
        )
    # The share site-02 made for site-01, relabelled and handed to site-00 in
    # place of the one site-02 made for it, also fails. (Issue 33: this check
    # used the first share of site-01's inbox, which is always site-00's own,
    # so it never ran.)
    theirs = next(x for x in routed[ids[1]] if x.sender == ids[2])
    relabelled = [
        EncryptedShare(theirs.sender, ids[0], theirs.ciphertext) if x.sender == ids[2] else x
        for x in inbox
    ]
    assert [x.sender for x in relabelled] == [x.sender for x in inbox] and relabelled != inbox
    with pytest.raises(SecAggError, match=f"share from site {ids[2]}: authentication"):
        sessions[ids[0]].masked_input(np.zeros(params.length), relabelled, server.u2)


def test_a_tampered_envelope_counts_its_site_as_dropped():
    ids, params, server, sessions, ads = _setup(n=4)
    roster = server.advertised(ads)
    routed = server.shared({s: sessions[s].share_keys(roster, CONSORTIUM.verifier()) for s in ids})
    rng = np.random.default_rng(0)
    updates = {s: rng.uniform(-1, 1, params.length) for s in ids}
    envelopes = {s: sessions[s].masked_input(updates[s], routed[s], server.u2)[0] for s in ids}
    envelopes[ids[3]] = envelopes[ids[3]][:-1] + bytes([envelopes[ids[3]][-1] ^ 1])
    survivors, dropped = server.received_masked(envelopes)
    assert dropped == [ids[3]] and "authentication failed" in server.refused[ids[3]]
    confirmed = _confirm_all(server, sessions, survivors)
    agg = server.unmasked({s: sessions[s].unmask(confirmed) for s in survivors})
    reference = plain_mean(params, updates, survivors)
    assert np.all(np.abs(agg.mean - reference) <= agg.error_bound)


def test_session_state_survives_serialisation_between_stages():
    ids, params, server, sessions, ads = _setup()
    roster = server.advertised(ads)
    shares = {}
    for s in ids:
        restored = SiteSession.from_bytes(sessions[s].to_bytes())
        shares[s] = restored.share_keys(roster, CONSORTIUM.verifier())
        sessions[s] = SiteSession.from_bytes(restored.to_bytes())
    routed = server.shared(shares)
    ones = np.full(params.length, 0.5)
    envelopes = {s: sessions[s].masked_input(ones, routed[s], server.u2)[0] for s in ids}
    survivors, _ = server.received_masked(envelopes)
    signatures = {}
    for s in survivors:
        restored = SiteSession.from_bytes(sessions[s].to_bytes())
        signatures[s] = restored.confirm(survivors, CONSORTIUM.signer(s))
        sessions[s] = restored
    confirmed = server.confirmed(signatures)
    reveals = {s: SiteSession.from_bytes(sessions[s].to_bytes()).unmask(confirmed) for s in ids}
    assert np.allclose(server.unmasked(reveals).mean, 0.5, atol=3 * 2 / 255)


@pytest.mark.parametrize(
    ("n", "kwargs", "match"),
    [
        (1, {}, "at least 2 sites"),
        (4, {"threshold": 2}, "more than half"),
        (4, {"threshold": 5}, "more than half"),
        (4, {"bits": 10}, "use 8, 12 or 16"),
        (20, {"modulus_bits": 12}, "could wrap"),
        (3, {"value_range": 0.0}, "positive"),
    ],
)
def test_unsafe_parameters_are_refused_at_setup(n, kwargs, match):
    args = {"bits": 8, "value_range": 1.0, "length": 10} | kwargs
    with pytest.raises(SecAggError, match=match):
        SecAggParams.for_round("r", 1, n, **args)


def test_modulus_and_packing():
    assert [default_threshold(n) for n in (2, 3, 4, 5, 10, 30)] == [2, 3, 3, 4, 7, 21]
    assert min_modulus_bits(8, 256) == 16
    assert SecAggParams.for_round("r", 1, 256, bits=8, value_range=1, length=1).dtype == np.uint16
    assert SecAggParams.for_round("r", 1, 16, bits=12, value_range=1, length=1).dtype == np.uint16
    assert SecAggParams.for_round("r", 1, 20, bits=16, value_range=1, length=1).dtype == np.uint32
    n, bits = 256, 8
    worst = n * ((1 << bits) - 1)
    assert worst < 1 << min_modulus_bits(bits, n) and math.log2(worst) > 15


def test_messages_round_trip_and_reject_garbage():
    _, _, _, _, ads = _setup()
    assert [Advertisement.from_dict(d) for d in unpack(pack([a.as_dict() for a in ads]))] == ads
    with pytest.raises(SecAggError, match="malformed"):
        unpack(b"{not json")
    with pytest.raises(SecAggError, match="'c_pk'"):
        Advertisement.from_dict({**ads[0].as_dict(), "c_pk": "text"})
