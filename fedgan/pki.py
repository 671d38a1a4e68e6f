"""The consortium PKI: one CA, the aggregator's server certificate, and per site a
client certificate, a sidecar certificate and a Flower node key.

Layout under the PKI root (``certs/`` by default)::

    ca/ca.crt ca/ca.key ca/crl.pem
    aggregator/server.crt aggregator/server.key
    sites/<site-id>/client.crt client.key sidecar.crt sidecar.key node_key node_key.pub

Every key is ECDSA on P-384 and every signature SHA-384: no RSA, no SHA-1, no
choices for a caller to get wrong. Private keys are written 0600 and never
replaced unless the caller passes ``force=True``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedgan.atomic import write_atomic, write_text_atomic
from fedgan.errors import FedGanError
from fedgan.secagg import membership as membership_list
from fedgan.secagg.identity import SIGNING_EKU
from fedgan.secagg.params import DEFAULT_MIN_SITES

CA_PASSPHRASE_ENV = "FEDGAN_CA_PASSPHRASE"
MIN_PASSPHRASE = 12
_CURVE = ec.SECP384R1()
_HASH = hashes.SHA384()
SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_SITE_SIDECAR_SANS = ("localhost", "127.0.0.1", "sidecar")
ALWAYS_AGGREGATOR_SANS = ("localhost", "127.0.0.1")


class PkiError(FedGanError):
    """A PKI operation was refused; the message names the file and the fix."""


class CertificateRejected(PkiError):
    """A certificate failed verification against the consortium CA."""


@dataclass(frozen=True)
class SitePaths:
    dir: Path

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    @property
    def sidecar_cert(self) -> Path:
        return self.dir / "sidecar.crt"

    @property
    def sidecar_key(self) -> Path:
        return self.dir / "sidecar.key"

    @property
    def node_key(self) -> Path:
        return self.dir / "node_key"

    @property
    def signing_key(self) -> Path:
        """Ed25519 key that signs the site's secure-aggregation keys."""
        return self.dir / "signing.key"

    @property
    def signing_cert(self) -> Path:
        return self.dir / "signing.crt"

    @property
    def node_pub(self) -> Path:
        return self.dir / "node_key.pub"

    @property
    def files(self) -> list[Path]:
        """Every file `issue_site` writes."""
        return [
            self.client_key,
            self.client_cert,
            self.sidecar_key,
            self.sidecar_cert,
            self.node_key,
            self.node_pub,
            self.signing_key,
            self.signing_cert,
        ]


@dataclass(frozen=True)
class PkiPaths:
    """Where each file of the PKI lives; the one place that knows the layout."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def membership(self) -> Path:
        """The CA-signed list of member sites and their signing certificates."""
        return self.root / "ca" / "membership.json"

    @property
    def node_bindings(self) -> Path:
        """nginx map entries: which client certificate may speak for which
        Flower node key (`write_node_bindings`)."""
        return self.root / "ca" / "node-bindings.conf"

    @property
    def server_cert(self) -> Path:
        return self.root / "aggregator" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "aggregator" / "server.key"

    def site(self, site_id: str) -> SitePaths:
        check_site_id(site_id)
        return SitePaths(self.root / "sites" / site_id)

    def site_ids(self) -> list[str]:
        sites = self.root / "sites"
        return sorted(p.name for p in sites.iterdir() if p.is_dir()) if sites.is_dir() else []


def check_site_id(site_id: str) -> str:
    if not SITE_ID_RE.match(site_id):
        raise PkiError(
            f"site id {site_id!r} is invalid: use 1-63 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return site_id


def site_uri(site_id: str) -> str:
    return f"urn:fedgan:site:{site_id}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key_bytes: bytes, force: bool) -> None:
    write_atomic(path, key_bytes, mode=0o600, overwrite=force)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every output first so a refused call writes nothing at all."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise PkiError(f"{path} exists; pass --force to replace it")


def load_cert(path: Path) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path} not found") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise PkiError(f"{path} is not a PEM or DER X.509 certificate") from None


def ca_passphrase() -> bytes | None:
    """The CA key's passphrase, from ``FEDGAN_CA_PASSPHRASE`` (None: unset).
    From the environment, not an argument, so it never shows in a process
    list or a shell history."""
    value = os.environ.get(CA_PASSPHRASE_ENV, "")
    return value.encode() if value else None


def _load_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_cert.exists():
        raise PkiError(f"{paths.ca_cert} not found; run `fedgan pki init --out {paths.root}` first")
    cert = load_cert(paths.ca_cert)
    try:
        data = paths.ca_key.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{paths.ca_key} not found; run `fedgan pki init` first") from None
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    passphrase = ca_passphrase() if encrypted else None
    if encrypted and passphrase is None:
        raise PkiError(
            f"{paths.ca_key} is encrypted; set {CA_PASSPHRASE_ENV} to its passphrase "
            "(read -rs FEDGAN_CA_PASSPHRASE && export FEDGAN_CA_PASSPHRASE)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError):
        raise PkiError(
            f"{paths.ca_key} cannot be read: wrong {CA_PASSPHRASE_ENV}, or not a PEM key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{paths.ca_key} is not an EC private key")
    return cert, key


def _name(common_name: str, consortium: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if consortium:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium))
    return x509.Name(attrs)


def _san(names: list[str], uris: tuple[str, ...] = ()) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def init_ca(
    root: Path,
    consortium: str,
    *,
    days: int = 3650,
    force: bool = False,
    passphrase: bytes | None = None,
) -> PkiPaths:
    """Create the consortium CA and an empty CRL (nginx needs one to exist).
    With a passphrase the key is stored encrypted (PKCS#8, the strongest
    encryption `cryptography` offers); without, it is for staging only."""
    if days < 1:
        raise PkiError("--days must be at least 1")
    if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
        raise PkiError(f"the CA passphrase must be at least {MIN_PASSPHRASE} characters")
    paths = PkiPaths(Path(root))
    _refuse_existing([paths.ca_key, paths.ca_cert], force)
    key = ec.generate_private_key(_CURVE)
    now = _now()
    name = _name(f"{consortium} FedGAN CA", consortium)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, _HASH)
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase is not None
        else serialization.NoEncryption()
    )
    _write_key(
        paths.ca_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ),
        force,
    )
    _write_cert(paths.ca_cert, cert)
    _write_crl(paths, cert, key, revoked=[])
    return paths


def _leaf(
    paths: PkiPaths,
    common_name: str,
    sans: list[str],
    usage: x509.ObjectIdentifier,
    days: int,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    uris: tuple[str, ...] = (),
) -> x509.Certificate:
    if days < 1:
        raise PkiError("--days must be at least 1")
    ca_cert, ca_key = _load_ca(paths)
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if sans or uris:
        builder = builder.add_extension(_san(sans, uris), critical=False)
    return builder.sign(ca_key, _HASH)


def issue_aggregator(
    root: Path, sans: list[str] | None = None, *, days: int = 825, force: bool = False
) -> PkiPaths:
    """Issue the server certificate used by the edge and the SuperLink.

    ``localhost`` and ``127.0.0.1`` are always included: the SuperLink's own
    subprocesses (ServerApp, SuperExec) connect back to it on loopback.
    """
    paths = PkiPaths(Path(root))
    _refuse_existing([paths.server_key, paths.server_cert], force)
    names = [*(sans or []), *ALWAYS_AGGREGATOR_SANS]
    key = ec.generate_private_key(_CURVE)
    cert = _leaf(paths, names[0], names, ExtendedKeyUsageOID.SERVER_AUTH, days, key.public_key())
    _write_key(paths.server_key, _key_pem(key), force)
    _write_cert(paths.server_cert, cert)
    return paths


def issue_site(
    root: Path,
    site_id: str,
    *,
    days: int = 365,
    sidecar_sans: list[str] | None = None,
    force: bool = False,
) -> SitePaths:
    """Issue what one hospital needs: its mTLS client certificate (CN = site id),
    the TLS certificate of its local sidecar, its Flower node key, and the
    Ed25519 key and certificate with which it signs its secure-aggregation
    keys (so the aggregator cannot substitute them)."""
    paths = PkiPaths(Path(root))
    site = paths.site(site_id)
    _refuse_existing(site.files, force)
    credentials = _issue_site_credentials(paths, site_id, days, sidecar_sans)
    _write_site(site, site_id, credentials, force)
    write_node_bindings(root)
    return site


@dataclass(frozen=True)
class _SiteCredentials:
    """A site's keys and certificates, all issued before any is written, so
    that a refusal (``--days``, the CA) leaves no half-issued site."""

    client_key: ec.EllipticCurvePrivateKey
    client: x509.Certificate
    sidecar_key: ec.EllipticCurvePrivateKey
    sidecar: x509.Certificate
    node_key: ec.EllipticCurvePrivateKey
    signing_key: ed25519.Ed25519PrivateKey
    signing: x509.Certificate


def _site_certificates(
    paths: PkiPaths,
    site_id: str,
    days: int,
    sidecar_sans: list[str] | None,
    client_pk: ec.EllipticCurvePublicKey,
    sidecar_pk: ec.EllipticCurvePublicKey,
    signing_pk: ed25519.Ed25519PublicKey,
) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(client, sidecar, signing) certificates for a site's public keys; the
    CA decides every name and usage, whatever a request asked for."""
    # RFC 5280 profiles require a SAN; the URI names the site unambiguously.
    client = _leaf(
        paths,
        site_id,
        [],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
        client_pk,
        uris=(site_uri(site_id),),
    )
    # `<site-id>-sidecar`: the sidecar's service name in the staging compose file.
    sidecar_names = list(sidecar_sans or (*DEFAULT_SITE_SIDECAR_SANS, f"{site_id}-sidecar"))
    sidecar = _leaf(
        paths,
        f"{site_id}-sidecar",
        sidecar_names,
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
        sidecar_pk,
    )
    # Its own extended key usage, not clientAuth: the edge refuses it as a
    # TLS identity, and the secure-aggregation verifier refuses anything else.
    signing = _leaf(
        paths, f"{site_id}-secagg", [], SIGNING_EKU, days, signing_pk, uris=(site_uri(site_id),)
    )
    return client, sidecar, signing


def _issue_site_credentials(
    paths: PkiPaths, site_id: str, days: int, sidecar_sans: list[str] | None
) -> _SiteCredentials:
    client_key = ec.generate_private_key(_CURVE)
    sidecar_key = ec.generate_private_key(_CURVE)
    node_key = ec.generate_private_key(_CURVE)
    signing_key = ed25519.Ed25519PrivateKey.generate()
    client, sidecar, signing = _site_certificates(
        paths,
        site_id,
        days,
        sidecar_sans,
        client_key.public_key(),
        sidecar_key.public_key(),
        signing_key.public_key(),
    )
    return _SiteCredentials(
        client_key, client, sidecar_key, sidecar, node_key, signing_key, signing
    )


REQUESTS_DIR = "requests"


@dataclass(frozen=True)
class RequestPaths:
    """What a site sends the CA: certificate requests and its node's public key."""

    dir: Path

    @property
    def client_csr(self) -> Path:
        return self.dir / "client.csr"

    @property
    def sidecar_csr(self) -> Path:
        return self.dir / "sidecar.csr"

    @property
    def signing_csr(self) -> Path:
        return self.dir / "signing.csr"

    @property
    def node_pub(self) -> Path:
        return self.dir / "node_key.pub"


def _csr(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, common_name: str, sans: list[str]
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else _HASH
    return builder.sign(key, algorithm)


def site_keys(out: Path, site_id: str, *, force: bool = False) -> RequestPaths:
    """At the site, on the site's own machine: every private key the site
    needs (client, sidecar, node, signing), written 0600 into ``out`` under
    the names the site kit uses, and the requests the CA signs in
    ``out/requests/``. No private key ever leaves ``out``."""
    check_site_id(site_id)
    site = SitePaths(Path(out))
    _refuse_existing([site.client_key, site.sidecar_key, site.node_key, site.signing_key], force)
    client_key = ec.generate_private_key(_CURVE)
    sidecar_key = ec.generate_private_key(_CURVE)
    node_key = ec.generate_private_key(_CURVE)
    signing_key = ed25519.Ed25519PrivateKey.generate()
    requests = RequestPaths(Path(out) / REQUESTS_DIR)
    pem = serialization.Encoding.PEM
    csrs = {
        requests.client_csr: _csr(client_key, site_id, []),
        # Names are the CA's to decide (`fedgan pki sign --sidecar-san`).
        requests.sidecar_csr: _csr(sidecar_key, f"{site_id}-sidecar", []),
        requests.signing_csr: _csr(signing_key, f"{site_id}-secagg", []),
    }
    _write_key(site.client_key, _key_pem(client_key), force)
    _write_key(site.sidecar_key, _key_pem(sidecar_key), force)
    _write_key(
        site.signing_key,
        signing_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        force,
    )
    _write_key(
        site.node_key,
        node_key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        force,
    )
    public = (
        node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {site_id}\n".encode()
    )
    write_atomic(site.node_pub, public, mode=0o644)
    write_atomic(requests.node_pub, public, mode=0o644)
    for path, csr in csrs.items():
        write_atomic(path, csr.public_bytes(pem), mode=0o644)
    return requests


def request_sha256(requests: RequestPaths) -> dict[str, str]:
    """Each request file's SHA-256, to read aloud at the key ceremony: the CA
    signs only requests whose hashes the site's officer confirms."""
    files = (requests.client_csr, requests.sidecar_csr, requests.signing_csr, requests.node_pub)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"{path} not found: the site makes its requests with `fedgan site keys`"
        ) from None
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise PkiError(f"{path}: its signature does not verify (damaged or altered in transit)")
    return csr


def _common_name(csr: x509.CertificateSigningRequest, path: Path) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError(f"{path}: the request must name exactly one common name")
    return str(names[0].value)


def sign_requests(
    root: Path,
    requests_dir: Path,
    *,
    days: int = 365,
    sidecar_sans: list[str] | None = None,
    force: bool = False,
) -> SitePaths:
    """At the CA: certificates for the public keys a site sent (client,
    sidecar, signing) and its node key registered as public material. The
    CA sets every name and usage itself, the sidecar's names included (from
    ``sidecar_sans`` or the defaults, never from the request: a site must
    not get a server certificate for the aggregator's names). It never sees
    a private key of the site. Writes ``sites/<id>/`` (certificates and
    node_key.pub only)."""
    requests = RequestPaths(Path(requests_dir))
    paths = PkiPaths(Path(root))
    client = _load_csr(requests.client_csr)
    site_id = check_site_id(_common_name(client, requests.client_csr))
    sidecar = _load_csr(requests.sidecar_csr)
    signing = _load_csr(requests.signing_csr)
    for csr, path, want in (
        (sidecar, requests.sidecar_csr, f"{site_id}-sidecar"),
        (signing, requests.signing_csr, f"{site_id}-secagg"),
    ):
        if _common_name(csr, path) != want:
            raise PkiError(f"{path}: the request names {_common_name(csr, path)!r}, not {want!r}")
    client_pk, sidecar_pk, signing_pk = (
        client.public_key(),
        sidecar.public_key(),
        signing.public_key(),
    )
    for pk, path in ((client_pk, requests.client_csr), (sidecar_pk, requests.sidecar_csr)):
        if not (isinstance(pk, ec.EllipticCurvePublicKey) and pk.curve.name == _CURVE.name):
            raise PkiError(f"{path}: the key must be EC P-384 (`fedgan site keys` makes one)")
    if not isinstance(signing_pk, ed25519.Ed25519PublicKey):
        raise PkiError(f"{requests.signing_csr}: the signing key must be Ed25519")
    assert isinstance(client_pk, ec.EllipticCurvePublicKey)
    assert isinstance(sidecar_pk, ec.EllipticCurvePublicKey)
    try:
        node_text = requests.node_pub.read_bytes()
        node_pk = serialization.load_ssh_public_key(b" ".join(node_text.split()[:2]))
    except FileNotFoundError:
        raise PkiError(f"{requests.node_pub} not found: send the site's node_key.pub too") from None
    except (ValueError, IndexError):
        raise PkiError(f"{requests.node_pub} is not an OpenSSH public key") from None
    if not (isinstance(node_pk, ec.EllipticCurvePublicKey) and node_pk.curve.name == _CURVE.name):
        raise PkiError(f"{requests.node_pub}: the node key must be EC P-384")
    site = paths.site(site_id)
    _refuse_existing([site.client_cert, site.sidecar_cert, site.signing_cert], force)
    held = (site.client_key, site.sidecar_key, site.node_key, site.signing_key)
    if any(p.exists() for p in held):
        raise PkiError(
            f"{site.dir} holds private keys the CA made for this site (staging); delete them "
            "before certifying the site's own keys, so that no kit carries them"
        )
    certificates = _site_certificates(
        paths, site_id, days, sidecar_sans, client_pk, sidecar_pk, signing_pk
    )
    for path, cert in zip(
        (site.client_cert, site.sidecar_cert, site.signing_cert), certificates, strict=True
    ):
        _write_cert(path, cert)
    write_atomic(
        site.node_pub,
        node_pk.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {site_id}\n".encode(),
        mode=0o644,
    )
    write_node_bindings(root)
    return site


def _write_site(site: SitePaths, site_id: str, c: _SiteCredentials, force: bool) -> None:
    """Keys 0600, certificates 0644. The node key is in OpenSSH form, as
    Flower reads it; its public half, named by the site id in its comment, is
    what the aggregator's operator registers."""
    _write_key(
        site.signing_key,
        c.signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        force,
    )
    _write_cert(site.signing_cert, c.signing)
    _write_key(site.client_key, _key_pem(c.client_key), force)
    _write_cert(site.client_cert, c.client)
    _write_key(site.sidecar_key, _key_pem(c.sidecar_key), force)
    _write_cert(site.sidecar_cert, c.sidecar)
    _write_key(
        site.node_key,
        c.node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        force,
    )
    write_atomic(
        site.node_pub,
        c.node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {site_id}\n".encode(),
        mode=0o644,
        overwrite=True,
    )


def load_crl(paths: PkiPaths) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(paths.crl.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{paths.crl} not found; run `fedgan pki init` first") from None
    except ValueError:
        raise PkiError(
            f"{paths.crl} is not a PEM CRL; re-create it with `fedgan pki crl`"
        ) from None


def _write_crl(
    paths: PkiPaths,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: list[x509.RevokedCertificate],
    days: int = 30,
) -> None:
    now = _now()
    # Sites keep the newest CRL they have seen (kit or round setup); the CRL
    # number and lastUpdate tell them which one is newer.
    number = 1
    if paths.crl.exists():
        try:
            previous = x509.load_pem_x509_crl(paths.crl.read_bytes())
            number = crl_number(previous) + 1
        except ValueError:
            pass
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, _HASH)
    write_atomic(paths.crl, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's sequence number (0 for a CRL issued without one)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def refresh_crl(root: Path, *, days: int = 30) -> x509.CertificateRevocationList:
    """Re-sign the CRL with the same entries and a new expiry.

    nginx refuses every client once the CRL's nextUpdate has passed (fail
    closed), so operators re-sign it on a schedule shorter than ``days``.
    """
    paths = PkiPaths(Path(root))
    ca_cert, ca_key = _load_ca(paths)
    crl = load_crl(paths)
    _write_crl(paths, ca_cert, ca_key, list(crl), days)
    return load_crl(paths)


def revoke_site(root: Path, site_id: str, *, days: int = 30) -> list[int]:
    """Revoke the site's client, sidecar and signing certificates (and drop
    it from the membership list, if there is one); returns the serials."""
    paths = PkiPaths(Path(root))
    site = paths.site(site_id)
    if not site.client_cert.exists():
        raise PkiError(f"{site.client_cert} not found: no site {site_id!r} was issued here")
    ca_cert, ca_key = _load_ca(paths)
    crl = load_crl(paths)
    entries = list(crl)
    known = {entry.serial_number for entry in entries}
    serials = []
    for cert_path in (site.client_cert, site.sidecar_cert, site.signing_cert):
        if not cert_path.exists():
            continue
        serial = load_cert(cert_path).serial_number
        serials.append(serial)
        if serial in known:
            continue
        entries.append(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_now())
            .add_extension(x509.CRLReason(x509.ReasonFlags.cessation_of_operation), critical=False)
            .build()
        )
    _write_crl(paths, ca_cert, ca_key, entries, days)
    write_node_bindings(root)  # the edge refuses its node key from now on
    if paths.membership.exists():
        # The revoked site leaves the list too; the rule stays.
        old = membership_list.read(paths.membership.read_bytes(), ca_cert)
        write_membership(root, colluding=old.colluding, min_sites=old.min_sites)
    return serials


def write_membership(
    root: Path,
    *,
    days: int = 90,
    colluding: int | None = None,
    min_sites: int = DEFAULT_MIN_SITES,
) -> membership_list.Membership:
    """Sign the consortium's membership list: every issued site whose signing
    certificate is not revoked, with the threshold rule and an expiry. Its
    version is one more than the list it replaces, so sites that hold the old
    one take the new one from the next round's setup."""
    if days < 1:
        raise PkiError("--days must be at least 1")
    if min_sites < 2 or (colluding is not None and colluding < 0):
        raise PkiError("--min-sites must be at least 2 and --colluding-sites at least 0")
    paths = PkiPaths(Path(root))
    ca_cert, ca_key = _load_ca(paths)
    crl = load_crl(paths)
    version = 1
    if paths.membership.exists():
        try:
            version = membership_list.read(paths.membership.read_bytes(), ca_cert).version + 1
        except FedGanError:
            raise PkiError(
                f"{paths.membership} is not a membership list this CA signed; move it aside "
                "to start again at version 1"
            ) from None
    sites = {}
    for site_id in paths.site_ids():
        cert_path = paths.site(site_id).signing_cert
        if not cert_path.exists():
            continue
        cert = load_cert(cert_path)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None:
            sites[site_id] = membership_list.certificate_sha256(cert)
    listed = membership_list.Membership(
        consortium=ca_cert.subject.rfc4514_string(),
        version=version,
        expires=min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc),
        sites=sites,
        min_sites=min_sites,
        colluding=colluding,
    )
    write_atomic(paths.membership, membership_list.sign(listed, ca_key), mode=0o644)
    return listed


def list_members(root: Path, sites: list[str]) -> None:
    """Staging: (re)sign the membership list only when one of ``sites`` is
    missing from it, so that launching twice changes nothing."""
    paths = PkiPaths(Path(root))
    if paths.membership.exists():
        listed = membership_list.read(paths.membership.read_bytes(), load_cert(paths.ca_cert))
        if set(sites) <= set(listed.sites):
            return
    write_membership(root, min_sites=max(2, min(len(sites), DEFAULT_MIN_SITES)))


def node_key_header(node_pub: bytes) -> str:
    """A node key (OpenSSH form, as in node_key.pub) as Flower's SuperNode
    sends it in its ``flwr-public-key`` header: base64 of the PEM key."""
    key = serialization.load_ssh_public_key(b" ".join(node_pub.split()[:2]))
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(pem).decode()


def node_binding(client_cert: x509.Certificate, node_pub: bytes) -> str:
    """The edge's key for one site: its client certificate's SHA-1 (nginx's
    ``$ssl_client_fingerprint``; an identifier here, the CA's signature is
    what vouches for the certificate) and its node key's header value."""
    return f"{client_cert.fingerprint(hashes.SHA1()).hex()} {node_key_header(node_pub)}"


def write_node_bindings(root: Path) -> Path:
    """Write the edge's map of client certificate to node key, for every
    site with both and not revoked: the edge refuses a node key presented
    with another site's certificate, and a revoked site's key with any.
    Rewritten whenever a site is issued, signed or revoked."""
    paths = PkiPaths(Path(root))
    revoked = {entry.serial_number for entry in load_crl(paths)} if paths.crl.exists() else set()
    lines = ["# Written by fedgan pki: client certificate SHA-1, node key; do not edit.\n"]
    for site_id in paths.site_ids():
        site = paths.site(site_id)
        if not (site.client_cert.exists() and site.node_pub.exists()):
            continue
        cert = load_cert(site.client_cert)
        if cert.serial_number in revoked:
            continue
        lines.append(f'"{node_binding(cert, site.node_pub.read_bytes())}" 1;  # {site_id}\n')
    write_text_atomic(paths.node_bindings, "".join(lines))
    return paths.node_bindings


def is_revoked(root: Path, cert: x509.Certificate) -> bool:
    paths = PkiPaths(Path(root))
    crl = load_crl(paths)
    ca_cert = load_cert(paths.ca_cert)
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise CertificateRejected(f"{paths.crl} is not signed by {paths.ca_cert}")
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def verify_client_cert(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    crl: x509.CertificateRevocationList | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Verify a site's client certificate the way the edge does: chain to the
    consortium CA, validity period, extended key usage, and revocation."""
    store = Store([ca_cert])
    verifier = PolicyBuilder().store(store).time(at or _now()).build_client_verifier()
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise CertificateRejected(f"certificate rejected: {exc}") from None
    if crl is not None:
        if not crl.is_signature_valid(ca_cert.public_key()):
            raise CertificateRejected("the CRL is not signed by the consortium CA")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateRejected(f"certificate serial {cert.serial_number:x} is revoked")


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bit)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bit"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def inspect_cert(path: Path) -> dict[str, object]:
    """The fields an operator or auditor checks, as plain data."""
    cert = load_cert(Path(path))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [
            *(str(v) for v in san.get_values_for_type(x509.DNSName)),
            *(str(v) for v in san.get_values_for_type(x509.IPAddress)),
            *(str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)),
        ]
    except x509.ExtensionNotFound:
        sans = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    algo = cert.signature_hash_algorithm
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "sans": sans,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key": describe_key(cert.public_key()),
        "signature_hash": algo.name if algo else "none",
        "is_ca": is_ca,
        "sha256_fingerprint": fingerprint_sha256(cert),
    }
