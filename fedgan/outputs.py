"""What a run leaves in ``runs/<run-id>/``, written atomically.

samples_round_NNN.png   8×8 grid from a fixed latent batch
metrics.jsonl           one JSON line per round
generator.pt            the latest global generator (spec + state_dict)
checkpoint.pt           the latest global G and D and their round (for resume)
status.json             running / completed / failed, with the reason
dumps/round_NNN/        global weights before/after (test mode only)
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgan.atomic import append_line_durable, write_atomic, write_text_atomic
from fedgan.gan.models import GanSpec, Generator


class RunOutputs:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def generator_path(self) -> Path:
        return self.dir / "generator.pt"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def save_checkpoint(self, gen: Generator, disc: torch.nn.Module, server_round: int) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "spec": dataclasses.asdict(gen.spec),
                "gen": gen.state_dict(),
                "disc": disc.state_dict(),
                "round": server_round,
            },
            buf,
        )
        write_atomic(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(
                f"{self.checkpoint_path} not found: nothing to resume in {self.dir}"
            )
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    def samples_path(self, server_round: int) -> Path:
        return self.dir / f"samples_round_{server_round:03d}.png"

    def write_samples(self, server_round: int, png: bytes) -> Path:
        path = self.samples_path(server_round)
        write_atomic(path, png)
        return path

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line_durable(self.metrics_path, json.dumps(record, sort_keys=True))

    def save_generator(self, gen: Generator, server_round: int) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "spec": dataclasses.asdict(gen.spec),
                "state_dict": gen.state_dict(),
                "round": server_round,
            },
            buf,
        )
        write_atomic(self.generator_path, buf.getvalue())

    def write_status(self, status: str, **details: Any) -> None:
        record = {"status": status, "time": time.time(), **details}
        write_text_atomic(self.status_path, json.dumps(record, sort_keys=True, indent=1))

    def dump_arrays(
        self, server_round: int, name: str, arrays: dict[str, list[np.ndarray]]
    ) -> None:
        flat = {f"{k}_{i:03d}": a for k, arrs in arrays.items() for i, a in enumerate(arrs)}
        buf = io.BytesIO()
        np.savez(buf, **flat)
        write_atomic(
            self.dir / "dumps" / f"round_{server_round:03d}" / f"{name}.npz", buf.getvalue()
        )


def load_dump(path: Path) -> dict[str, list[np.ndarray]]:
    """Inverse of `RunOutputs.dump_arrays` (used by tests and audits)."""
    with np.load(path) as data:
        out: dict[str, list[np.ndarray]] = {}
        for key in sorted(data.files):
            name, _, _ = key.rpartition("_")
            out.setdefault(name, []).append(data[key])
    return out


def load_generator(path: Path, map_location: str = "cpu") -> Generator:
    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    gen = Generator(GanSpec(**ckpt["spec"]))
    gen.load_state_dict(ckpt["state_dict"])
    return gen
