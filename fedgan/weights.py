"""A model's weights as a flat, ordered list of numpy arrays: the form that
travels in Flower's ArrayRecord and that the update path transforms.

Only floating-point state is exchanged; BatchNorm's integer batch counter is
local bookkeeping with no meaning when averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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
