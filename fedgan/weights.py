"""A model's weights as a flat, ordered list of numpy arrays: the form that
travels in Flower's ArrayRecord and that the update path transforms.

Only floating-point state is exchanged; BatchNorm's integer batch counter is
local bookkeeping with no meaning when averaged.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgan.atomic import write_atomic


def float_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if torch.is_floating_point(v)]


def get_arrays(model: nn.Module) -> list[np.ndarray]:
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in float_keys(model)]


def set_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
    keys = float_keys(model)
    if len(keys) != len(arrays):
        raise ValueError(
            f"expected {len(keys)} arrays for {type(model).__name__}, got {len(arrays)}; "
            "are the sites and server on the same image-size/width?"
        )
    state = model.state_dict()
    for key, array in zip(keys, arrays, strict=True):
        if tuple(state[key].shape) != tuple(array.shape):
            raise ValueError(
                f"{type(model).__name__}.{key}: shape {tuple(array.shape)} does not match "
                f"{tuple(state[key].shape)}; are the sites and server on the same image-size/width?"
            )
        state[key] = torch.as_tensor(array, dtype=state[key].dtype)
    model.load_state_dict(state)


def dump_arrays(path: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    """Named lists of arrays in one .npz, written atomically (test mode's
    dumps, at the aggregator and at a site)."""
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
