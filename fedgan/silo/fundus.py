"""Minimal fundus reader: the JPEG/PNG/TIFF images of a directory, RGB.

The full loader (field-of-view crop, contrast normalisation, label layouts)
belongs to the silo issue; this one is enough to train on synthetic silos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedgan.silo import SiloError
from fedgan.silo.resize import fit_square, to_unit_range

EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def fundus_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise SiloError(f"{directory} is not a directory; set the site's data dir to its silo")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in EXTENSIONS)


def load_fundus(directory: Path, image_size: int) -> np.ndarray:
    images = []
    for path in fundus_files(directory):
        try:
            with Image.open(path) as img:
                rgb = fit_square(img.convert("RGB"), image_size)
        except (UnidentifiedImageError, OSError):
            continue
        images.append(to_unit_range(np.asarray(rgb)))
    if not images:
        raise SiloError(f"{directory} holds no readable JPEG/PNG/TIFF fundus image")
    return np.stack(images)
