"""Keys from X25519 agreements (HKDF-SHA256) and AES-256-GCM sealing.

A fresh 96-bit random nonce per ciphertext; keys are per round and per pair,
so nonce reuse under one key is out of reach. A failed open raises
`SecAggError` naming what failed, never returns garbage."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgan.secagg.encoding import PROTOCOL, fields
from fedgan.secagg.errors import SecAggError

NONCE_BYTES = 12
KEY_BYTES = 32


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, context: bytes) -> bytes:
    """A 256-bit key for ``purpose`` from X25519(private, peer) and the round's
    context (run id and round), via HKDF-SHA256."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"bad X25519 public key for {purpose}: {exc}") from None
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=fields(PROTOCOL, purpose) + context,
    ).derive(shared)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes, what: str) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise SecAggError(f"{what}: ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise SecAggError(
            f"{what}: authentication failed (tampered, replayed or misrouted)"
        ) from None
