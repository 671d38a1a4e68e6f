"""Who a site is: its Ed25519 signing key, certified by the consortium CA.

A site signs the public keys it advertises for a round, and later the
survivor set it was told; every other site checks the signature against the
signer's certificate, the certificate against the CA and a current CRL, and
that the certificate names the site it claims to be. A server that swapped
in its own keys would need a certificate the CA never issued.

Signing certificates carry their own extended key usage (`SIGNING_EKU`, a
private OID under the UUID arc 2.25) and never clientAuth or serverAuth: a
signing key is not a TLS identity, so a stolen or misused signing
certificate opens no connection at the edge, and a TLS client certificate
signs no keys here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from fedgan.secagg.encoding import PROTOCOL, fields
from fedgan.secagg.errors import SecAggError
from fedgan.secagg.membership import Membership

SITE_URI_PREFIX = "urn:fedgan:site:"
# "FedGAN secure-aggregation signing", a UUID OID (ITU-T X.667): nobody else's.
SIGNING_EKU = x509.ObjectIdentifier("2.25.233109171493825445282285014757203276539")
_TLS_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)


@dataclass(frozen=True)
class Signer:
    """A site's identity for signing: its id, key and certificate (PEM)."""

    site_id: str
    key: Ed25519PrivateKey
    cert_pem: bytes

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(fields(PROTOCOL, "signature", message))


Verifier = Callable[[str, bytes, bytes, bytes], bytes]
"""verify(site_id, cert_pem, message, signature) -> the signer's raw Ed25519
public key, or raise SecAggError."""


def check_signature(site_id: str, public_key: bytes, message: bytes, signature: bytes) -> None:
    """A signature by a key already checked against its certificate."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, fields(PROTOCOL, "signature", message)
        )
    except (InvalidSignature, ValueError):
        raise SecAggError(f"site {site_id}: bad signature") from None


def _signing_usage(policy: object, cert: x509.Certificate, eku: object) -> None:
    usages = list(eku) if isinstance(eku, x509.ExtendedKeyUsage) else []
    if SIGNING_EKU not in usages:
        raise ValueError("not a FedGAN signing certificate (no signing extended key usage)")
    if any(u in usages for u in _TLS_USAGES):
        raise ValueError("a signing certificate must not also be a TLS certificate")


def check_crl(
    ca_cert: x509.Certificate, crl: x509.CertificateRevocationList | None, at: dt.datetime
) -> x509.CertificateRevocationList:
    """Revocation fails closed: no CRL, a CRL the CA did not sign, or one
    past its nextUpdate is refused, so a site never trusts a certificate it
    cannot know to be unrevoked."""
    if crl is None:
        raise SecAggError(
            "no CRL: secure aggregation needs the consortium's current CRL "
            "(node config 'crl', from the site kit)"
        )
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise SecAggError("the CRL is not signed by the consortium CA")
    next_update = crl.next_update_utc
    if next_update is None or next_update <= at:
        when = next_update.isoformat() if next_update else "(no nextUpdate)"
        raise SecAggError(
            f"the CRL expired at {when}; the consortium must re-sign it (`fedgan pki crl`) and "
            "send it with the round setup or in the site kit"
        )
    return crl


def ca_verifier(
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    *,
    membership: Membership | None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Verifier:
    """A verifier that trusts exactly the consortium CA, under a current CRL,
    and (given a membership list) only the signing certificates it names.
    A site always passes its list; None is for tests of the arithmetic."""
    check_crl(ca_cert, crl, now())
    if membership is not None:
        membership.check_current(now())
    assert crl is not None
    store = Store([ca_cert])
    ee_policy = ExtensionPolicy.webpki_defaults_ee().require_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _signing_usage
    )

    def verify(site_id: str, cert_pem: bytes, message: bytes, signature: bytes) -> bytes:
        at = now()
        check_crl(ca_cert, crl, at)
        if membership is not None:
            membership.check_current(at)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise SecAggError(f"site {site_id}: its signing certificate is not PEM") from None
        verifier = (
            PolicyBuilder()
            .store(store)
            .time(at)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(cert, [])
        except VerificationError as exc:
            raise SecAggError(f"site {site_id}: signing certificate rejected: {exc}") from None
        uris = {
            name.value
            for name in verified.subjects or []
            if isinstance(name, x509.UniformResourceIdentifier)
        }
        if f"{SITE_URI_PREFIX}{site_id}" not in uris:
            raise SecAggError(
                f"site {site_id}: its certificate names {sorted(uris)}, not this site"
            )
        if membership is not None:
            membership.check_member(site_id, cert)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number):
            raise SecAggError(
                f"site {site_id}: signing certificate {cert.serial_number:x} is revoked"
            )
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise SecAggError(f"site {site_id}: signing certificate does not hold an Ed25519 key")
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        try:
            check_signature(site_id, raw, message, signature)
        except SecAggError:
            raise SecAggError(f"site {site_id}: bad signature on its advertised keys") from None
        return raw

    return verify
