"""What a site chooses about how its silo is read; hashed into the cache key,
so changing any of it rebuilds the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedgan.errors import FedGanError

KINDS = ("fundus", "dicom")
# Bump when preprocessing changes meaning, so old caches are never reused.
PREPROCESS_VERSION = 1


class SiloError(FedGanError):
    """A silo cannot be used; the message names the path and the fix."""


def _tuple(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split(",") if v.strip())
    return tuple(str(v).strip().upper() for v in value)


@dataclass(frozen=True)
class SiloOptions:
    kind: str
    image_size: int
    channels: int
    # DICOM: keep only these values (empty: keep all), compared upper-case.
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    view_position: tuple[str, ...] = ()
    # DICOM: take the label from this tag keyword when there is no labels.csv.
    label_tag: str | None = None
    # DICOM: (center, width) in modality units, overriding the files' window.
    window: tuple[float, float] | None = None
    # DICOM colour images: "convert" to luminance, or "refuse" (skip them).
    color: str = "convert"
    # Fundus: local-contrast normalisation (subtract a Gaussian blur).
    fundus_contrast: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiloError(f"unknown silo kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.color not in ("convert", "refuse"):
            raise SiloError(f"color={self.color!r} is invalid; use convert or refuse")
        if self.window is not None and self.window[1] <= 0:
            raise SiloError(f"window width {self.window[1]} must be > 0")
        if self.channels not in (1, 3):
            raise SiloError(f"channels={self.channels} is invalid; use 1 or 3")

    @classmethod
    def from_mapping(cls, kind: str, image_size: int, channels: int, cfg: Mapping[str, Any]):
        """From a SuperNode's node config (``modality="CR,DX" window="-600,1500"`` …)."""
        window = cfg.get("window")
        parsed_window = None
        if window not in (None, ""):
            try:
                center, width = (float(x) for x in str(window).split(","))
            except ValueError:
                raise SiloError(
                    f'node config window={window!r} is invalid; use "center,width"'
                ) from None
            parsed_window = (center, width)
        return cls(
            kind=kind,
            image_size=image_size,
            channels=channels,
            modality=_tuple(cfg.get("modality")),
            body_part=_tuple(cfg.get("body-part")),
            view_position=_tuple(cfg.get("view-position")),
            label_tag=str(cfg["label-tag"]) if cfg.get("label-tag") else None,
            window=parsed_window,
            color=str(cfg.get("color", "convert")),
            fundus_contrast=str(cfg.get("fundus-contrast", "false")).lower() == "true",
        )

    def digest(self) -> str:
        doc = {"v": PREPROCESS_VERSION, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
