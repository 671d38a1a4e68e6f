"""Test mode's dumps (``dump-updates``): named lists of arrays in one .npz,
written atomically, so a test can recompute the aggregate from what each
site sent and what the aggregator read. numpy only: the exporter and the
secure-aggregation stages import nothing heavier."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fedgan.atomic import write_atomic


def dump_arrays(path: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    flat = {f"{k}_{i:03d}": a for k, arrs in arrays.items() for i, a in enumerate(arrs)}
    buf = io.BytesIO()
    np.savez(buf, **flat)
    write_atomic(path, buf.getvalue())


def load_dump(path: Path) -> dict[str, list[np.ndarray]]:
    """Inverse of `dump_arrays` (used by tests and audits)."""
    with np.load(path) as data:
        out: dict[str, list[np.ndarray]] = {}
        for key in sorted(data.files):
            name, _, _ = key.rpartition("_")
            out.setdefault(name, []).append(data[key])
    return out
