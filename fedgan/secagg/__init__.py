"""Secure aggregation (Bonawitz et al., CCS 2017) of quantized updates.

Pure protocol: bytes and numpy arrays in, bytes and numpy arrays out; no
Flower, no torch, no I/O. `client` holds a site's side, `server` the
aggregator's; `fedgan.site.secure_round` and `fedgan.aggregator.secure_round` drive them over
Flower messages.

Primitives, all from `cryptography`: X25519 key agreement, HKDF-SHA256,
AES-256-GCM for every ciphertext, AES-256-CTR as the mask PRG, Ed25519
signatures certified by the consortium PKI, Shamir sharing over GF(2^521 - 1).
"""

from fedgan.secagg.errors import RoundAborted, SecAggError
from fedgan.secagg.params import SecAggParams

__all__ = ["RoundAborted", "SecAggError", "SecAggParams"]
