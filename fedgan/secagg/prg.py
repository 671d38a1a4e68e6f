"""The mask generator: AES-256-CTR keyed by a 256-bit seed.

Each seed keys exactly one stream (a fresh self-mask seed per round; a pair
seed derived per round), so a zero IV is safe. The output, read as unsigned
integers and reduced modulo a power of two, is uniform."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32


def expand(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudo-random integers of ``dtype`` from ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    dtype = np.dtype(dtype)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
