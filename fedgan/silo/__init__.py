"""Hospital image silos: synthetic ones for demos and tests, and readers.

No network I/O and nothing of Flower here: a silo is a directory on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedgan.errors import FedGanError

KINDS = ("fundus", "dicom")


class SiloError(FedGanError):
    """A silo cannot be used; the message names the path and the fix."""


def load_images(directory: Path, kind: str, image_size: int, channels: int) -> np.ndarray:
    """All usable images of a silo as float32 N×C×H×W in [-1, 1]."""
    if kind == "fundus":
        from fedgan.silo.fundus import load_fundus

        images = load_fundus(Path(directory), image_size)
    elif kind == "dicom":
        from fedgan.silo.dicom import load_dicom

        images = load_dicom(Path(directory), image_size)
    else:
        raise SiloError(f"unknown silo kind {kind!r}; use one of {', '.join(KINDS)}")
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if have == 3 and channels == 1:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return (images * weights).sum(axis=1, keepdims=True).astype(np.float32)
    raise SiloError(f"cannot convert {have}-channel images to {channels} channels")
