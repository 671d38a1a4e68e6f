"""Hospital image silos: readers for DICOM and fundus directories, a cache,
synthetic silos for demos and tests, and non-IID splits for rehearsals.

No network I/O and nothing of Flower here: a silo is a directory on disk,
opened only for reading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedgan.silo.options import KINDS, SiloError, SiloOptions

__all__ = ["KINDS", "SiloError", "SiloOptions", "load_images"]


def load_images(
    directory: Path, kind: str, image_size: int, channels: int, *, cache_dir: Path | None = None
) -> np.ndarray:
    """All usable images of a silo as float32 N×C×H×W in [-1, 1]."""
    from fedgan.silo.loader import load_silo

    opts = SiloOptions(kind=kind, image_size=image_size, channels=channels)
    return (
        load_silo(Path(directory), opts, cache_dir=cache_dir)
        .require_images(str(directory))
        .as_float()
    )
