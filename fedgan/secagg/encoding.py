"""Unambiguous byte strings for signatures, KDF info and AEAD associated data.

Each field is length-prefixed, so ("ab", "c") and ("a", "bc") never encode
alike: a ciphertext or signature made for one context cannot be replayed in
another."""

from __future__ import annotations

PROTOCOL = b"fedgan-secagg-v2"


def fields(*parts: bytes | str | int) -> bytes:
    out = bytearray()
    for part in parts:
        if isinstance(part, int):
            data = part.to_bytes(8, "big", signed=False)
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = bytes(part)
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def associated_data(
    run_id: str, server_round: int, stage: str, sender: str, receiver: str
) -> bytes:
    """AD of every AES-GCM ciphertext: run id ‖ round ‖ stage ‖ sender ‖ receiver."""
    return fields(PROTOCOL, run_id, server_round, stage, sender, receiver)
