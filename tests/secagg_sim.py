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
from cryptography.x509.oid import NameOID

from fedgan.secagg import membership
from fedgan.secagg.client import SiteSession
from fedgan.secagg.identity import SIGNING_EKU, Signer, ca_verifier
from fedgan.secagg.membership import Membership, certificate_sha256
from fedgan.secagg.params import SecAggParams, ThresholdRule
from fedgan.secagg.server import Aggregate, ServerSession

NOW = dt.datetime.now(dt.UTC)
# The protocol's floor (t > n/2, n ≥ 2), for tests of the arithmetic at any
# n and t; the sites' default rule is tested on its own.
FLOOR = ThresholdRule(min_sites=2, colluding=0)


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

    def signer(
        self,
        site_id: str,
        uri_site: str | None = None,
        usages: tuple[x509.ObjectIdentifier, ...] = (SIGNING_EKU,),
    ) -> Signer:
        fresh = uri_site or usages != (SIGNING_EKU,)
        if site_id not in self.signers or fresh:
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
                .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
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
            if fresh:
                return signer
            self.signers[site_id] = signer
        return self.signers[site_id]

    def crl(
        self, revoked: tuple[int, ...] = (), next_update: dt.datetime | None = None
    ) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.subject)
            .last_update(min(NOW, next_update or NOW) - dt.timedelta(days=1))
            .next_update(next_update or NOW + dt.timedelta(days=7))
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
            )
        return builder.sign(self.ca_key, hashes.SHA256())

    def membership(
        self,
        sites: list[str],
        version: int = 1,
        expires: dt.datetime | None = None,
        colluding: int | None = None,
    ) -> bytes:
        """A CA-signed membership list naming these sites' signing certificates."""
        listed = {
            site: certificate_sha256(x509.load_pem_x509_certificate(self.signer(site).cert_pem))
            for site in sites
        }
        body = Membership(
            "test", version, expires or NOW + dt.timedelta(days=30), listed, 2, colluding
        )
        return membership.sign(body, self.ca_key)

    def verifier(
        self,
        crl: x509.CertificateRevocationList | None = None,
        members: bytes | None = None,
    ):
        """Checks chain, usage, name and a current CRL; with ``members``, the
        membership list too (None: tests of the protocol's arithmetic)."""
        listed = membership.read(members, self.ca) if members else None
        return ca_verifier(self.ca, crl or self.crl(), membership=listed)


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def advertise(
    params: SecAggParams,
    consortium: Consortium,
    ids: list[str],
    rule: ThresholdRule = FLOOR,
) -> tuple[ServerSession, dict[str, SiteSession], list]:
    """Stage 1 for ``ids``: (the server, each site's session, the roster the
    server broadcasts)."""
    server = ServerSession(params)
    sessions, ads = {}, []
    for site in ids:
        sessions[site], ad = SiteSession.start(
            params, server.public_key, consortium.signer(site), rule
        )
        ads.append(ad)
    return server, sessions, server.advertised(ads)


def run_round(
    params: SecAggParams,
    updates: dict[str, np.ndarray],
    consortium: Consortium,
    drop: dict[str, set[str]] | None = None,
    rule: ThresholdRule = FLOOR,
) -> Aggregate:
    """One round; ``drop[stage]`` are the sites that vanish before replying at
    that stage ("advertise", "share", "mask", "confirm", "unmask")."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    server = ServerSession(params)
    sessions, ads = {}, []
    for site in sorted(updates):
        if site in drop.get("advertise", ()):
            continue
        sessions[site], ad = SiteSession.start(
            params, server.public_key, consortium.signer(site), rule
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
    survivors, _ = server.received_masked(envelopes)
    signatures = {}
    for site in survivors:
        signature = sessions[site].confirm(survivors, consortium.signer(site))
        if site not in drop.get("confirm", ()):
            signatures[site] = signature
    confirmed = server.confirmed(signatures)
    reveals = {}
    for site in confirmed:
        out = sessions[site].unmask(confirmed)
        if site not in drop.get("unmask", ()):
            reveals[site] = out
    return server.unmasked(reveals)


def plain_mean(
    params: SecAggParams, updates: dict[str, np.ndarray], survivors: list[str]
) -> np.ndarray:
    """What secure aggregation approximates: the mean of the survivors'
    clipped updates (every site counts equally)."""
    r = params.value_range
    return np.mean([np.clip(updates[site], -r, r) for site in survivors], axis=0)
