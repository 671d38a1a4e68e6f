"""Tabular conditioning: a vector of patient attributes (age, sex, …) per
image, as the personalised design in the seeds asks, with the loss
L = L_GAN + λ·(1 − cos(h(x), a)) where h is an attribute head on D.

The consortium declares the attributes once, in the run config:
``attributes = "age=0:100,sex=F|M"``: a numeric attribute with its range
(scaled to [-1, 1], clamped) or a categorical one with its values (one-hot).
Each site supplies them for its images in ``attributes.csv`` at its silo's
root, keyed like its labels (``path`` for DICOM, ``id_code`` or ``image``
for fundus). Generated images get attributes drawn uniformly from the
declared ranges: data-independent, so they cost no privacy."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedgan.errors import FedGanError

if TYPE_CHECKING:
    import torch

KEY_COLUMNS = {"dicom": ("path",), "fundus": ("id_code", "image")}


class AttributesError(FedGanError, ValueError):
    """The attributes declaration or a site's attributes.csv is unusable."""


@dataclass(frozen=True)
class Attribute:
    name: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[str, ...] = ()  # categorical when non-empty

    @property
    def width(self) -> int:
        return len(self.values) if self.values else 1

    def encode(self, raw: str) -> list[float] | None:
        """Its slice of the vector, or None when the value is unusable."""
        raw = raw.strip()
        if self.values:
            if raw not in self.values:
                return None
            return [1.0 if v == raw else 0.0 for v in self.values]
        try:
            value = float(raw.rstrip("YyMmWwDd") if raw[:-1].isdigit() else raw)  # "045Y"
        except (ValueError, IndexError):
            return None
        if not math.isfinite(value):
            return None
        scaled = 2 * (value - self.low) / (self.high - self.low) - 1
        return [min(1.0, max(-1.0, scaled))]


def parse(text: str) -> tuple[Attribute, ...]:
    """``"age=0:100,sex=F|M"`` → attributes; "" → none."""
    out: list[Attribute] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, spec = item.partition("=")
        name = name.strip().lower()
        if not sep or not name or not spec.strip():
            raise AttributesError(
                f"run config 'attributes': {item!r} must be name=low:high or name=a|b|…"
            )
        if "|" in spec:
            values = tuple(v.strip() for v in spec.split("|") if v.strip())
            if len(values) < 2 or len(set(values)) != len(values):
                raise AttributesError(
                    f"run config 'attributes': {name} needs two or more distinct values"
                )
            out.append(Attribute(name, values=values))
            continue
        try:
            low, high = (float(v) for v in spec.split(":"))
        except ValueError:
            raise AttributesError(
                f"run config 'attributes': {item!r} must be name=low:high or name=a|b|…"
            ) from None
        if not high > low:
            raise AttributesError(f"run config 'attributes': {name} needs high > low")
        out.append(Attribute(name, low=low, high=high))
    if len({a.name for a in out}) != len(out):
        raise AttributesError("run config 'attributes' names an attribute twice")
    return tuple(out)


def width(attributes: tuple[Attribute, ...]) -> int:
    return sum(a.width for a in attributes)


def read_table(path: Path, kind: str) -> tuple[list[str], list[list[str]], int | None]:
    """An ``attributes.csv`` as (its header as written, its data rows, the
    index of its key column or None), the one reader of the file's layout
    (the site's loader and ``silo split`` both use it)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AttributesError(f"{path} cannot be read as CSV ({type(exc).__name__})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    key_col = next((k for k in KEY_COLUMNS[kind] if k in header), None)
    return (rows[0] if rows else []), rows[1:], (header.index(key_col) if key_col else None)


def read_site_attributes(
    silo: Path, kind: str, attributes: tuple[Attribute, ...]
) -> dict[str, np.ndarray]:
    """Key → encoded vector from ``<silo>/attributes.csv``; rows with a
    missing or unusable value are left out (counted by the caller)."""
    path = Path(silo) / "attributes.csv"
    if not path.exists():
        raise AttributesError(
            f"{path} not found: a run conditioned on {', '.join(a.name for a in attributes)} "
            f"needs it, with a header {KEY_COLUMNS[kind][0]},"
            + ",".join(a.name for a in attributes)
        )
    raw_header, rows, k = read_table(path, kind)
    header = [h.strip().lower() for h in raw_header]
    missing = [a.name for a in attributes if a.name not in header]
    if k is None or missing:
        raise AttributesError(
            f"{path}: header needs {' or '.join(KEY_COLUMNS[kind])} and "
            f"{', '.join(a.name for a in attributes)}; "
            f"missing {', '.join(missing) or ' or '.join(KEY_COLUMNS[kind])}"
        )
    cols = [header.index(a.name) for a in attributes]
    out: dict[str, np.ndarray] = {}
    for row in rows:
        if len(row) <= max(k, *cols):
            continue
        parts = [a.encode(row[c]) for a, c in zip(attributes, cols, strict=True)]
        if any(p is None for p in parts):
            continue
        key = row[k].strip()
        key = Path(key).stem if kind == "fundus" else key
        out[key] = np.array([v for p in parts for v in p], dtype=np.float32)  # type: ignore[union-attr]
    return out


def sample(attributes: tuple[Attribute, ...], n: int, generator: torch.Generator) -> torch.Tensor:
    """n attribute vectors drawn uniformly from the declared ranges and values."""
    import torch

    parts = []
    for a in attributes:
        if a.values:
            idx = torch.randint(0, len(a.values), (n,), generator=generator)
            parts.append(torch.nn.functional.one_hot(idx, len(a.values)).float())
        else:
            parts.append(torch.rand(n, 1, generator=generator) * 2 - 1)
    return torch.cat(parts, dim=1)
