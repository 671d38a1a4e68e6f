"""Who a site is: its Ed25519 signing key, certified by the consortium CA.

A site signs the public keys it advertises for a round; every other site
checks the signature against the signer's certificate, the certificate
against the CA (and CRL), and that the certificate names the site it claims
to be. A server that swapped in its own keys would need a certificate the CA
never issued."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedgan.secagg.encoding import PROTOCOL, fields
from fedgan.secagg.errors import SecAggError

SITE_URI_PREFIX = "urn:fedgan:site:"


@dataclass(frozen=True)
class Signer:
    """A site's identity for signing: its id, key and certificate (PEM)."""

    site_id: str
    key: Ed25519PrivateKey
    cert_pem: bytes

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(fields(PROTOCOL, "signature", message))


Verifier = Callable[[str, bytes, bytes, bytes], None]
"""verify(site_id, cert_pem, message, signature) -> None or raise SecAggError."""


def ca_verifier(
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Verifier:
    """A verifier that trusts exactly the consortium CA."""
    if crl is not None and not crl.is_signature_valid(ca_cert.public_key()):
        raise SecAggError("the CRL is not signed by the consortium CA")
    store = Store([ca_cert])

    def verify(site_id: str, cert_pem: bytes, message: bytes, signature: bytes) -> None:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise SecAggError(f"site {site_id}: its signing certificate is not PEM") from None
        verifier = PolicyBuilder().store(store).time(now()).build_client_verifier()
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
        if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
            raise SecAggError(
                f"site {site_id}: signing certificate {cert.serial_number:x} is revoked"
            )
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise SecAggError(f"site {site_id}: signing certificate does not hold an Ed25519 key")
        try:
            key.verify(signature, fields(PROTOCOL, "signature", message))
        except InvalidSignature:
            raise SecAggError(f"site {site_id}: bad signature on its advertised keys") from None

    return verify
