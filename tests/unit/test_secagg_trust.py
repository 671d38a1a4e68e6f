"""A curious aggregator, played with the protocol's own code: the split view
(issue 32, item 2), thresholds the sites enforce, and signing certificates
that are current, unrevoked and nothing but signing certificates."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedgan.secagg import SecAggError, SecAggParams, shamir
from fedgan.secagg.client import SiteSession, apply_mask, mask_seed, pair_sign
from fedgan.secagg.identity import SIGNING_EKU, ca_verifier
from fedgan.secagg.messages import consistency_bytes
from fedgan.secagg.params import ThresholdRule, required_threshold
from fedgan.secagg.quantize import dequantize_mean
from tests.secagg_sim import NOW, Consortium, advertise, site_ids

CONSORTIUM = Consortium()
COLLUDER, VICTIM = "site-00", "site-04"


def _split_view(threshold: int, rule: ThresholdRule) -> tuple[np.ndarray | None, np.ndarray]:
    """The aggregator, with site-00 colluding, tells the victim and site-01
    that every site survived (to collect the victim's self-mask seed) and
    sites 02 and 03 that the victim dropped (to collect its mask key), and
    hands each group the signatures it gathered. Returns (the victim's update
    as the attacker recovers it, or None; the victim's true update)."""
    ids = site_ids(5)
    params = SecAggParams.for_round(
        "run-split", 1, 5, bits=8, value_range=1.0, length=6, threshold=threshold
    )
    server, sessions, roster = advertise(params, CONSORTIUM, ids, rule)
    routed = server.shared({s: sessions[s].share_keys(roster, CONSORTIUM.verifier()) for s in ids})
    rng = np.random.default_rng(7)
    updates = {s: rng.uniform(-0.9, 0.9, params.length) for s in ids}
    envelopes = {s: sessions[s].masked_input(updates[s], routed[s], server.u2)[0] for s in ids}
    server.received_masked(envelopes)
    masked = server.masked[VICTIM].copy()

    view_a = ids  # the victim survived: reveal its seed b
    view_b = [s for s in ids if s != VICTIM]  # the victim dropped: reveal its key s
    groups = {VICTIM: view_a, "site-01": view_a, "site-02": view_b, "site-03": view_b}
    signed = {view: {} for view in ("a", "b")}
    for s, view in groups.items():
        signed["a" if view is view_a else "b"][s] = sessions[s].confirm(view, CONSORTIUM.signer(s))
    for view, survivors in (("a", view_a), ("b", view_b)):  # the colluder signs both
        signed[view][COLLUDER] = CONSORTIUM.signer(COLLUDER).sign(
            consistency_bytes(params, server.public_key, server.roster_digest(), survivors)
        )
    # The colluder hands over the shares it holds; each honest site is asked
    # with every signature the aggregator has, in case that is enough.
    b_shares = {1: sessions[COLLUDER].held[VICTIM][0]}
    s_shares = {1: sessions[COLLUDER].held[VICTIM][1]}
    bundles = [signed["a"], signed["b"], {**signed["a"], **signed["b"]}]
    for s in groups:
        for bundle in bundles:  # whatever the aggregator holds, in case one works
            try:
                reveals = sessions[s].unmask(bundle)
                break
            except SecAggError:
                continue
        else:
            continue
        for r in reveals:
            if r.owner == VICTIM:
                (b_shares if r.kind == "b" else s_shares)[r.x] = shamir.from_bytes(r.value)
    if min(len(b_shares), len(s_shares)) < params.threshold:
        return None, updates[VICTIM]
    b = shamir.reconstruct(b_shares, params.threshold).to_bytes(32, "big")
    s_sk = X25519PrivateKey.from_private_bytes(
        shamir.reconstruct(s_shares, params.threshold).to_bytes(32, "big")
    )
    apply_mask(masked, b, -1)
    for peer in ids:
        if peer != VICTIM:
            seed = mask_seed(s_sk, server.roster[peer].s_pk, params)
            apply_mask(masked, seed, -pair_sign(VICTIM, peer))
    recovered, _ = dequantize_mean(masked, 1, params)
    return recovered, updates[VICTIM]


def test_split_view_recovers_nothing_under_the_sites_default_rule():
    # Issue 32: at n = 5, t = 3 this attack recovered the victim's update on
    # the old protocol. The sites now refuse t = 3 outright ...
    with pytest.raises(SecAggError, match=r"threshold 3 of 5 sites is below this site's rule"):
        _split_view(3, ThresholdRule())
    # ... and at the t they accept, the signed survivor sets disagree.
    recovered, _ = _split_view(required_threshold(5), ThresholdRule())
    assert recovered is None


def test_split_view_succeeds_where_a_site_says_it_tolerates_no_colluder():
    """The bound is real: a site that states c = 0 accepts t = 3 of 5, and one
    colluding site then splits the view. (This is the attack code working,
    so that the test above is not vacuous.)"""
    recovered, truth = _split_view(3, ThresholdRule(colluding=0))
    assert recovered is not None
    assert np.max(np.abs(recovered - truth)) <= 2 * 1.0 / 255 + 1e-9


@pytest.mark.parametrize(
    ("n", "t", "rule", "match"),
    [
        (2, 2, ThresholdRule(), "this site's rule joins sums of at least 3"),
        (3, 2, ThresholdRule(), "threshold 2 of 3 sites"),
        (10, 6, ThresholdRule(), r"⌊2n/3⌋ \+ 1 = 7"),
        (10, 7, ThresholdRule(colluding=5), r"t > \(n \+ 5\)/2 and t ≥ 7 = 8"),
        (4, 3, ThresholdRule(colluding=2), "= 4"),
    ],
)
def test_a_site_refuses_a_round_below_its_own_rule_before_making_keys(n, t, rule, match):
    params = SecAggParams.for_round("r", 1, n, bits=8, value_range=1.0, length=3, threshold=t)
    with pytest.raises(SecAggError, match=match):
        SiteSession.start(params, b"\0" * 32, CONSORTIUM.signer("site-00"), rule)


def test_rules_accept_what_they_promise():
    for n in range(3, 31):
        assert required_threshold(n) == 2 * n // 3 + 1
        for c in range(0, n - 1):
            t = required_threshold(n, c)
            # Two groups of t signers share more than c sites; a sum keeps
            # at least two honest updates.
            assert 2 * t - n > c and t - c >= 2


def _ad_for(signer, crl=None):
    params = SecAggParams.for_round("r", 1, 3, bits=8, value_range=1.0, length=3)
    _, ad = SiteSession.start(params, b"\0" * 32, signer)
    return ad, ad.signed_bytes(params, b"\0" * 32)


def test_signing_certificates_must_be_current_unrevoked_and_for_signing_only():
    verify = CONSORTIUM.verifier()
    good = CONSORTIUM.signer("site-01")
    ad, message = _ad_for(good)
    assert len(verify("site-01", ad.cert_pem, message, ad.signature)) == 32
    # A TLS client certificate (or one that is both) signs nothing.
    for usages in (
        (ExtendedKeyUsageOID.CLIENT_AUTH,),
        (ExtendedKeyUsageOID.CLIENT_AUTH, SIGNING_EKU),
        (ExtendedKeyUsageOID.SERVER_AUTH, SIGNING_EKU),
    ):
        tls = CONSORTIUM.signer("site-01", usages=usages)
        bad, msg = _ad_for(tls)
        with pytest.raises(SecAggError, match="signing certificate rejected"):
            verify("site-01", bad.cert_pem, msg, bad.signature)
    # Revoked.
    serial = x509.load_pem_x509_certificate(good.cert_pem).serial_number
    with pytest.raises(SecAggError, match="is revoked"):
        CONSORTIUM.verifier(CONSORTIUM.crl(revoked=(serial,)))(
            "site-01", ad.cert_pem, message, ad.signature
        )


def test_revocation_fails_closed():
    with pytest.raises(SecAggError, match="no CRL"):
        ca_verifier(CONSORTIUM.ca, None, membership=None)
    expired = CONSORTIUM.crl(next_update=NOW - dt.timedelta(days=365))
    with pytest.raises(SecAggError, match="the CRL expired at"):
        ca_verifier(CONSORTIUM.ca, expired, membership=None)
    with pytest.raises(SecAggError, match="not signed by the consortium CA"):
        ca_verifier(CONSORTIUM.ca, Consortium().crl(), membership=None)
    # A CRL current when the verifier was built, expired when it is used.
    clock = [NOW]
    verify = ca_verifier(CONSORTIUM.ca, CONSORTIUM.crl(), membership=None, now=lambda: clock[0])
    ad, message = _ad_for(CONSORTIUM.signer("site-01"))
    verify("site-01", ad.cert_pem, message, ad.signature)
    clock[0] = NOW + dt.timedelta(days=8)
    with pytest.raises(SecAggError, match="the CRL expired"):
        verify("site-01", ad.cert_pem, message, ad.signature)


def test_a_roster_outside_the_membership_list_is_refused_before_any_share_leaves():
    """The server fills a round with a party the CA certified but the
    consortium never listed (or lists a site with another certificate)."""
    ids = site_ids(4)
    params = SecAggParams.for_round("r", 1, 4, bits=8, value_range=1.0, length=3)
    _, sessions, roster = advertise(params, CONSORTIUM, ids, ThresholdRule())
    listed = CONSORTIUM.membership(ids[:3])
    with pytest.raises(SecAggError, match="site-03 is not in the consortium's membership list"):
        sessions[ids[0]].share_keys(roster, CONSORTIUM.verifier(members=listed))
    assert sessions[ids[0]].stage == "advertised"  # nothing shared
    sessions[ids[0]].share_keys(roster, CONSORTIUM.verifier(members=CONSORTIUM.membership(ids)))
    expired = CONSORTIUM.membership(ids, expires=NOW - dt.timedelta(days=1))
    with pytest.raises(SecAggError, match=r"membership list \(version 1\) expired"):
        CONSORTIUM.verifier(members=expired)
