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
    directory: Path,
    kind: str,
    image_size: int,
    channels: int,
    *,
    options: SiloOptions | None = None,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """All usable images of a silo as float32 N×C×H×W in [-1, 1]."""
    from fedgan.silo.loader import load_silo

    opts = options or SiloOptions(kind=kind, image_size=image_size, channels=channels)
    data = load_silo(Path(directory), opts, cache_dir=cache_dir)
    if data.report.images == 0:
        reasons = sorted({r for _, r in data.report.skipped})[:3]
        why = f" (skipped: {'; '.join(reasons)})" if reasons else ""
        raise SiloError(
            f"{directory} holds no usable {kind} image{why}; run `fedgan silo check {directory}`"
        )
    return data.as_float()
