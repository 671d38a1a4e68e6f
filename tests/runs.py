"""Reading a finished run folder in the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from fedgan.gan.models import GanSpec, build
from fedgan.weights import float_keys


def learned_indices(run_dir: Path) -> dict[str, list[int]]:
    """Per network, the positions (in the exchanged arrays) of learned
    weights: G's BatchNorm running statistics are recomputed by the server
    after each aggregation, not averaged."""
    spec = GanSpec(**torch.load(run_dir / "checkpoint.pt", weights_only=True)["spec"])
    gen, disc = build(spec)
    return {
        name: [i for i, key in enumerate(float_keys(model)) if "running_" not in key]
        for name, model in (("gen", gen), ("disc", disc))
    }
