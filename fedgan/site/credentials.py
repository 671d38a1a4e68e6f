"""The site's secure-aggregation credentials from its files: its Ed25519
signer, and the verifier of its peers' signing certificates against the
consortium CA and the newest CRL the site holds. Here, at the site that uses
them, so that the PKI (`fedgan.pki`, which issues certificates) knows
nothing of the protocol.

Revocation fails closed: the kit's CRL is required, and a newer CRL that the
aggregator delivers with a round's setup is kept (``<work-dir>/crl.pem``)
only if the consortium CA signed it and it is newer than what the site
holds. The aggregator can bring news of a revocation but not undo one: an
older or foreign CRL is ignored, a kept one that no longer verifies stops
the site (fail closed), and an expired one refuses the round. What it can
do is withhold a newer CRL until the site's own expires (its nextUpdate):
that window is the CRL's lifetime, 30 days by default (`fedgan pki crl
--days`). The consortium's membership list is handled alike
(``<work-dir>/membership.json``, higher versions only)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedgan.atomic import write_atomic
from fedgan.errors import FedGanError
from fedgan.pki import PkiError, crl_number, load_cert
from fedgan.secagg import membership
from fedgan.secagg.identity import Signer, Verifier, ca_verifier
from fedgan.secagg.membership import Membership

ADOPTED_CRL = "crl.pem"
ADOPTED_MEMBERSHIP = "membership.json"


def load_signer(key_path: Path, cert_path: Path, site_id: str) -> Signer:
    """The site's secure-aggregation signer from its files; a key that does
    not match its certificate is refused here, not at the peers."""
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(
            f"{key_path} not found: make the site's keys with `fedgan site keys {site_id}` and "
            "have the CA sign their requests (staging: `fedgan pki issue-site`)"
        ) from None
    except ValueError:
        raise PkiError(f"{key_path} is not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{key_path} is not an Ed25519 key")
    cert = load_cert(Path(cert_path))
    if cert.public_key() != key.public_key():
        raise PkiError(f"{cert_path} does not certify the key in {key_path}")
    return Signer(site_id, key, cert.public_bytes(serialization.Encoding.PEM))


def _age(crl: x509.CertificateRevocationList) -> tuple[int, float]:
    return crl_number(crl), crl.last_update_utc.timestamp()


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"{path} not found: secure aggregation needs the consortium CRL (node config 'crl', "
            "from the site kit)"
        ) from None
    except ValueError:
        raise PkiError(f"{path} is not a PEM CRL; copy crl.pem from a fresh site kit") from None


def current_crl(
    ca: x509.Certificate, kit_crl: Path, work_dir: Path
) -> x509.CertificateRevocationList:
    """The newest CA-signed CRL of the kit's and the one kept from a setup."""
    best = _read_crl(kit_crl)
    if not best.is_signature_valid(ca.public_key()):
        raise PkiError(f"{kit_crl} is not signed by the consortium CA")
    kept = Path(work_dir) / ADOPTED_CRL
    if kept.exists():
        other = _read_crl(kept)
        if not other.is_signature_valid(ca.public_key()):
            raise PkiError(
                f"{kept} is not signed by the consortium CA (damaged or replaced); delete it "
                "to fall back to the kit's CRL, or copy a current one there"
            )
        if _age(other) > _age(best):
            best = other
    return best


def adopt_crl(ca_path: Path, kit_crl: Path, work_dir: Path, delivered: bytes) -> bool:
    """Keep a CRL delivered with the round setup if the CA signed it and it
    is newer than the site's; returns whether it was kept."""
    if not delivered:
        return False
    try:
        crl = x509.load_pem_x509_crl(delivered)
    except ValueError:
        return False
    ca = load_cert(Path(ca_path))
    if not crl.is_signature_valid(ca.public_key()):
        return False
    if _age(crl) <= _age(current_crl(ca, kit_crl, work_dir)):
        return False
    write_atomic(Path(work_dir) / ADOPTED_CRL, crl.public_bytes(serialization.Encoding.PEM))
    return True


def _read_membership(path: Path, ca: x509.Certificate) -> Membership:
    try:
        return membership.read(Path(path).read_bytes(), ca)
    except FileNotFoundError:
        raise PkiError(
            f"{path} not found: secure aggregation needs the consortium's membership list (node "
            "config 'membership', from the site kit)"
        ) from None
    except FedGanError as exc:
        raise PkiError(f"{path}: {exc}") from None


def current_membership(ca: x509.Certificate, kit_list: Path, work_dir: Path) -> Membership:
    """The highest version of the kit's list and the one kept from a setup."""
    best = _read_membership(kit_list, ca)
    kept = Path(work_dir) / ADOPTED_MEMBERSHIP
    if kept.exists():
        other = _read_membership(kept, ca)  # a damaged kept list stops the site
        if other.version > best.version and other.consortium == best.consortium:
            best = other
    return best


def adopt_membership(ca_path: Path, kit_list: Path, work_dir: Path, delivered: bytes) -> bool:
    """Keep a membership list delivered with the round setup if the CA
    signed it, it names the same consortium and its version is higher."""
    if not delivered:
        return False
    ca = load_cert(Path(ca_path))
    try:
        offered = membership.read(delivered, ca)
    except FedGanError:
        return False
    held = current_membership(ca, kit_list, work_dir)
    if offered.version <= held.version or offered.consortium != held.consortium:
        return False
    write_atomic(Path(work_dir) / ADOPTED_MEMBERSHIP, delivered)
    return True


def load_verifier(ca_path: Path, kit_crl: Path, kit_list: Path, work_dir: Path) -> Verifier:
    """Checks peers' signing certificates against the consortium CA, the
    newest CRL and membership list the site holds; refuses (one line) when
    either expired."""
    ca = load_cert(Path(ca_path))
    crl = current_crl(ca, Path(kit_crl), Path(work_dir))
    members = current_membership(ca, Path(kit_list), Path(work_dir))
    try:
        return ca_verifier(ca, crl, membership=members)
    except FedGanError as exc:
        raise PkiError(str(exc)) from None
