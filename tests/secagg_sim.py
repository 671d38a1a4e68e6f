"""Drive whole secure-aggregation rounds in memory, for the tests: real keys,
real certificates from a throwaway CA, every stage, chosen dropouts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgan.secagg.client import SiteSession
from fedgan.secagg.identity import Signer, ca_verifier
from fedgan.secagg.params import SecAggParams
from fedgan.secagg.quantize import weight_units
from fedgan.secagg.server import Aggregate, ServerSession

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Consortium:
    """A CA and one Ed25519 signer per site (tests only; the product's CA is `fedgan.pki`)."""

    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    ca: x509.Certificate | None = None
    signers: dict[str, Signer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(_name("test-ca"))
            .issuer_name(_name("test-ca"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )

    def signer(self, site_id: str, uri_site: str | None = None) -> Signer:
        if site_id not in self.signers or uri_site:
            key = ed25519.Ed25519PrivateKey.generate()
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name(site_id))
                .issuer_name(self.ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1))
                .not_valid_after(NOW + dt.timedelta(days=10))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.UniformResourceIdentifier(f"urn:fedgan:site:{uri_site or site_id}")]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                    critical=False,
                )
                .sign(self.ca_key, hashes.SHA256())
            )
            signer = Signer(site_id, key, cert.public_bytes(Encoding.PEM))
            if uri_site:
                return signer
            self.signers[site_id] = signer
        return self.signers[site_id]

    def verifier(self):
        return ca_verifier(self.ca)


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def run_round(
    params: SecAggParams,
    updates: dict[str, np.ndarray],
    examples: dict[str, int],
    consortium: Consortium,
    drop: dict[str, set[str]] | None = None,
) -> Aggregate:
    """One round; ``drop[stage]`` are the sites that vanish before replying at
    that stage ("advertise", "share", "mask", "unmask")."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    server = ServerSession(params)
    sessions, ads = {}, []
    for site in sorted(updates):
        if site in drop.get("advertise", ()):
            continue
        sessions[site], ad = SiteSession.start(
            params, server.public_key, consortium.signer(site), examples[site]
        )
        ads.append(ad)
    roster = server.advertised(ads)
    verify = consortium.verifier()
    shares = {}
    for site, session in sessions.items():
        out = session.share_keys(roster, verify)
        if site not in drop.get("share", ()):
            shares[site] = out
    routed = server.shared(shares)
    envelopes = {}
    for site, inbox in routed.items():
        envelope, _ = sessions[site].masked_input(updates[site], inbox, server.u2)
        if site not in drop.get("mask", ()):
            envelopes[site] = envelope
    survivors, dropped = server.received_masked(envelopes)
    reveals = {}
    for site in survivors:
        out = sessions[site].unmask(survivors, dropped)
        if site not in drop.get("unmask", ()):
            reveals[site] = out
    return server.unmasked(reveals)


def plain_weighted_mean(
    params: SecAggParams,
    updates: dict[str, np.ndarray],
    examples: dict[str, int],
    survivors: list[str],
    roster: list[str],
) -> np.ndarray:
    """What secure aggregation approximates: Σ α_i clip(v_i) / Σ α_i over the
    survivors, α from the largest site of the roster, as the sites derive it."""
    largest = max(examples[s] for s in roster)
    r = params.value_range
    num = np.zeros(params.length)
    den = 0.0
    for site in survivors:
        alpha = weight_units(examples[site], largest, params) / params.levels
        num += alpha * np.clip(updates[site], -r, r)
        den += alpha
    return num / den
