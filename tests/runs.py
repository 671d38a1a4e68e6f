"""Reading a finished run folder in the tests."""

from __future__ import annotations

import subprocess
import sys
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


FEDGAN = str(Path(sys.executable).parent / "fedgan")


def evaluate_as_site_1(run_dir: Path, held: Path, n: int) -> subprocess.CompletedProcess:
    """`fedgan evaluate` of a demo run at site-1: its silo as members,
    ``held`` as non-members, ``n`` synthetic images, one TSTR classifier (the
    default three would triple the minutes; tests/unit/test_evaluate.py
    checks the three)."""
    return subprocess.run(
        [
            FEDGAN,
            "evaluate",
            str(run_dir),
            "--real",
            str(run_dir / "silos" / "site-1"),
            "--holdout",
            str(held),
            "--kind",
            "fundus",
            "--site",
            "site-1",
            "--n",
            str(n),
            "--classifier-seeds",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
