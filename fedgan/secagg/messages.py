"""What travels between the sites and the aggregator, as plain data.

Each has ``as_dict``/``from_dict`` over str, int and bytes only, so the
Flower side can carry them in a ConfigRecord without this package knowing
Flower."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fedgan.secagg.encoding import fields
from fedgan.secagg.errors import SecAggError
from fedgan.secagg.params import SecAggParams


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        raise SecAggError(
            f"malformed secure-aggregation message: {key!r} missing or not {kind.__name__}"
        )
    return value


@dataclass(frozen=True)
class Advertisement:
    """A site's two public keys for the round, signed with its certified key.
    Nothing else: no image count, which would break the sites' DP."""

    site_id: str
    c_pk: bytes  # X25519, for encrypting shares
    s_pk: bytes  # X25519, for pairwise masks
    cert_pem: bytes
    signature: bytes

    def signed_bytes(self, params: SecAggParams, server_pk: bytes) -> bytes:
        return signed_bytes(params, server_pk, self.site_id, self.c_pk, self.s_pk)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Advertisement:
        return cls(
            site_id=_typed(data, "site_id", str),
            c_pk=_typed(data, "c_pk", bytes),
            s_pk=_typed(data, "s_pk", bytes),
            cert_pem=_typed(data, "cert_pem", bytes),
            signature=_typed(data, "signature", bytes),
        )


def signed_bytes(
    params: SecAggParams, server_pk: bytes, site_id: str, c_pk: bytes, s_pk: bytes
) -> bytes:
    return fields("advertise", params.context, server_pk, site_id, c_pk, s_pk)


def roster_digest(roster: Iterable[tuple[str, bytes, bytes]]) -> bytes:
    """The round's roster, (site, c_pk, s_pk) for every site that shared,
    as one digest: it names this attempt at the round, since every site's
    keys are fresh for each attempt."""
    entries = sorted(roster)
    return hashlib.sha256(fields("roster", *(part for entry in entries for part in entry))).digest()


def consistency_bytes(
    params: SecAggParams, server_pk: bytes, roster: bytes, survivors: list[str]
) -> bytes:
    """What a site signs at the consistency check: the round, this attempt's
    roster (`roster_digest`) and the survivor set it was told, in sorted
    order. Without the roster a signature from an earlier attempt at the
    same round (after a crash and a resume) would count in a later one."""
    return fields("consistency", params.context, server_pk, roster, *sorted(survivors))


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of the sender's self-mask seed and mask key, for one receiver."""

    sender: str
    receiver: str
    ciphertext: bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncryptedShare:
        return cls(
            _typed(data, "sender", str),
            _typed(data, "receiver", str),
            _typed(data, "ciphertext", bytes),
        )


@dataclass(frozen=True)
class RevealedShare:
    """One share, revealed at unmasking: of ``owner``'s self-mask seed ("b",
    owner survived) or of its mask key ("s", owner dropped); ``x`` is the
    revealing site's point."""

    owner: str
    kind: str
    x: int
    value: bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RevealedShare:
        share = cls(
            _typed(data, "owner", str),
            _typed(data, "kind", str),
            _typed(data, "x", int),
            _typed(data, "value", bytes),
        )
        if share.kind not in ("b", "s"):
            raise SecAggError(f"revealed share of unknown kind {share.kind!r}")
        return share


def pack(items: list[dict[str, Any]]) -> bytes:
    """A list of message dicts as one byte string (JSON; bytes as base64)."""
    import base64
    import json

    def encode(value: Any) -> Any:
        return {"b64": base64.b64encode(value).decode()} if isinstance(value, bytes) else value

    return json.dumps([{k: encode(v) for k, v in item.items()} for item in items]).encode()


def unpack(data: bytes) -> list[dict[str, Any]]:
    import base64
    import binascii
    import json

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"b64"}:
            return base64.b64decode(value["b64"], validate=True)
        return value

    try:
        items = json.loads(data)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("not a list of objects")
        return [{k: decode(v) for k, v in item.items()} for item in items]
    except (ValueError, binascii.Error) as exc:
        raise SecAggError(f"malformed secure-aggregation message: {exc}") from None
