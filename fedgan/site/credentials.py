"""The site's secure-aggregation credentials from its files: its Ed25519
signer, and the verifier of its peers' signing certificates against the
consortium CA (and CRL). Here, at the site that uses them, so that the PKI
(`fedgan.pki`, which issues certificates) knows nothing of the protocol."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedgan.errors import FedGanError
from fedgan.pki import PkiError, load_cert
from fedgan.secagg.identity import Signer, Verifier, ca_verifier


def load_signer(key_path: Path, cert_path: Path, site_id: str) -> Signer:
    """The site's secure-aggregation signer from its files; a key that does
    not match its certificate is refused here, not at the peers."""
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(
            f"{key_path} not found: issue the site's signing key with `fedgan pki issue-site "
            f"{site_id}` (sites issued before secure aggregation need --force)"
        ) from None
    except ValueError:
        raise PkiError(f"{key_path} is not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{key_path} is not an Ed25519 key")
    cert = load_cert(Path(cert_path))
    if cert.public_key() != key.public_key():
        raise PkiError(f"{cert_path} does not certify the key in {key_path}")
    return Signer(site_id, key, cert.public_bytes(serialization.Encoding.PEM))


def load_verifier(ca_path: Path, crl_path: Path | None = None) -> Verifier:
    """Checks peers' signing certificates against the consortium CA (and CRL)."""
    ca = load_cert(Path(ca_path))
    crl = None
    if crl_path is not None:
        try:
            crl = x509.load_pem_x509_crl(Path(crl_path).read_bytes())
        except FileNotFoundError:
            raise PkiError(f"{crl_path} not found; run `fedgan pki crl`") from None
        except ValueError:
            raise PkiError(f"{crl_path} is not a PEM CRL") from None
    try:
        return ca_verifier(ca, crl)
    except FedGanError as exc:
        raise PkiError(f"{crl_path}: {exc}") from None
