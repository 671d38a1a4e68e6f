"""The consortium's membership list: which sites exist, which signing
certificate each holds, and the consortium's threshold rule, signed by the
CA with a version and an expiry.

A site accepts a round's roster only if every member is on the list with
exactly the certificate the list names, so a server cannot fill a round
with parties it controls, not even with certificates issued in a site's
name after the list was signed. The list reaches sites in their kit and,
when the consortium changes, with a round's setup; a site keeps a delivered
list only if the CA signed it and its version is higher than the one it
holds (`fedgan.site.credentials`). Pure: bytes and certificates in, no I/O."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedgan.secagg.errors import SecAggError
from fedgan.secagg.params import DEFAULT_MIN_SITES, MIN_SITES, ThresholdRule

FORMAT = "fedgan-membership-v1"


def certificate_sha256(cert: x509.Certificate) -> str:
    """How the list names a signing certificate: SHA-256 of its DER, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Membership:
    consortium: str
    version: int
    expires: dt.datetime
    sites: dict[str, str]  # site id -> SHA-256 of its signing certificate
    min_sites: int = DEFAULT_MIN_SITES
    colluding: int | None = None  # None: the default rule t ≥ ⌊2n/3⌋ + 1

    def body(self) -> bytes:
        """The signed bytes: canonical JSON."""
        doc = {
            "format": FORMAT,
            "consortium": self.consortium,
            "version": self.version,
            "expires": self.expires.astimezone(dt.UTC).isoformat(),
            "sites": dict(sorted(self.sites.items())),
            "min_sites": self.min_sites,
            "colluding": self.colluding,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def rule(self) -> ThresholdRule:
        return ThresholdRule(
            min_sites=self.min_sites,
            colluding=self.colluding,
            owner="the consortium's",
            command="fedgan pki membership",
        )

    def check_member(self, site_id: str, cert: x509.Certificate) -> None:
        listed = self.sites.get(site_id)
        if listed is None:
            raise SecAggError(
                f"site {site_id} is not in the consortium's membership list (version "
                f"{self.version}); a roster may hold only listed sites"
            )
        if listed != certificate_sha256(cert):
            raise SecAggError(
                f"site {site_id}: its signing certificate is not the one membership list version "
                f"{self.version} names"
            )

    def check_current(self, now: dt.datetime) -> None:
        if self.expires <= now:
            raise SecAggError(
                f"the membership list (version {self.version}) expired at "
                f"{self.expires.isoformat()}; the consortium must sign a new one "
                "(`fedgan pki membership`)"
            )


def sign(membership: Membership, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The list as its file holds it: the body and the CA's signature."""
    body = membership.body()
    signature = ca_key.sign(body, ec.ECDSA(hashes.SHA384()))
    doc = {"membership": json.loads(body), "signature": base64.b64encode(signature).decode()}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SecAggError(f"membership list: {key!r} missing or not {kind.__name__}")
    return value


def read(data: bytes, ca_cert: x509.Certificate) -> Membership:
    """Parse a membership file and check the CA's signature (not its expiry:
    `Membership.check_current`, so that an expired list can still be
    compared with a newer one)."""
    try:
        doc = json.loads(data)
        body_doc = doc["membership"]
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SecAggError(
            "not a membership list (expected the JSON of `fedgan pki membership`)"
        ) from None
    if not isinstance(body_doc, dict) or body_doc.get("format") != FORMAT:
        raise SecAggError(f"membership list: format is not {FORMAT}")
    sites = _field(body_doc, "sites", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
        raise SecAggError("membership list: 'sites' must map site ids to certificate hashes")
    colluding = body_doc.get("colluding")
    if colluding is not None and (not isinstance(colluding, int) or colluding < 0):
        raise SecAggError("membership list: 'colluding' must be a whole number ≥ 0 or null")
    try:
        expires = dt.datetime.fromisoformat(_field(body_doc, "expires", str))
    except ValueError:
        raise SecAggError("membership list: 'expires' is not an ISO date") from None
    membership = Membership(
        consortium=_field(body_doc, "consortium", str),
        version=_field(body_doc, "version", int),
        expires=expires,
        sites=dict(sites),
        min_sites=_field(body_doc, "min_sites", int),
        colluding=colluding,
    )
    if membership.min_sites < MIN_SITES or expires.tzinfo is None:
        raise SecAggError("membership list: 'min_sites' below 2 or 'expires' without a zone")
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggError("the consortium CA does not hold an EC key")
    try:
        key.verify(signature, membership.body(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SecAggError("the membership list is not signed by the consortium CA") from None
    return membership
