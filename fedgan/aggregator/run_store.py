"""What a run leaves in ``runs/<run-id>/``, written atomically.

samples_round_NNN.png   8×8 grid from a fixed latent batch
metrics.jsonl           one JSON line per round
generator.pt            the latest global generator (spec + state_dict)
checkpoint.pt           the latest global G and D and their round (for resume)
release_round_NNN.npz   a mean-embedding round's aggregate, kept before G is fitted
fit_round_NNN.pt        that fit's latest state, until the round's checkpoint is written
status.json             running / completed / failed, with the reason
dumps/round_NNN/        global weights before/after (test mode only)

Reading ``metrics.jsonl`` (`read_records`, `latest_by_site`) needs no torch:
the exporter, the report and the audit read it, so torch is imported only
where a model is saved or loaded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedgan.atomic import append_line_durable, write_atomic, write_text_atomic
from fedgan.dumps import dump_arrays
from fedgan.errors import FedGanError

if TYPE_CHECKING:  # torch and the fit (Opacus) only where a model is saved or loaded
    import torch

    from fedgan.gan.models import Generator
    from fedgan.privacy.embedding_fit import FitState

Received = list[tuple[str, float, dict[str, float]]]  # site, weight, metrics


class KeptReleaseError(FedGanError):
    """A kept aggregate cannot be used for the run being resumed."""


@dataclass(frozen=True)
class KeptRelease:
    """The sum of the sites' releases in one mean-embedding round, as the
    aggregator received it, and the round's record so far.

    Why it is kept: the sites spend their budget when they release, and
    fitting G takes minutes to tens of minutes. An aggregator that stops
    during the fit resumes from this, without asking the sites again, so a
    crash never costs them a second spend. It is the sum secure aggregation
    yields, the very input of the fit: keeping it shows the aggregator no
    more than it already saw. Nothing per site is kept."""

    round: int
    mean: np.ndarray  # (classes, 2F + 1): Σ releases / Σ noisy counts
    record: dict[str, Any]  # metrics.jsonl's line up to the fit
    received: Received  # the surviving sites' weights and metrics
    digest: str  # the random features the sites embedded with


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

    def save_checkpoint(
        self,
        gen: Generator,
        disc: torch.nn.Module,
        server_round: int,
        line: dict[str, Any] | None = None,
    ) -> None:
        """``line``: the round's metrics line, kept in the checkpoint so that
        a stop between the checkpoint and the metrics append loses no row
        (`restore_metrics`)."""
        import torch

        buf = io.BytesIO()
        state: dict[str, Any] = {
            "spec": dataclasses.asdict(gen.spec),
            "gen": gen.state_dict(),
            "disc": disc.state_dict(),
            "round": server_round,
        }
        if line is not None:
            state["metrics_line"] = json.dumps(line, sort_keys=True)
        torch.save(state, buf)
        write_atomic(self.checkpoint_path, buf.getvalue())

    def restore_metrics(self, checkpoint: dict[str, Any]) -> str:
        """On resume: metrics.jsonl in step with the checkpoint. Its rows up to
        the checkpoint's round, whole lines only (a torn last line would
        swallow the next append), plus the checkpoint's own row if the stop
        came before it was appended; rewritten atomically only when that
        changes anything. Returns what it did, or ""."""
        last = int(checkpoint["round"])
        rows = [r for r in read_records(self.metrics_path) if r["round"] <= last]
        text = self.metrics_path.read_text("utf-8") if self.metrics_path.exists() else ""
        restored = ""
        if checkpoint.get("metrics_line") and not any(r["round"] == last for r in rows):
            rows.append(json.loads(checkpoint["metrics_line"]))
            restored = f"round {last}'s metrics line restored from the checkpoint"
        fixed = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        if fixed == text:
            return ""
        write_atomic(self.metrics_path, fixed.encode())
        return restored or "metrics.jsonl cut back to the checkpoint's rounds and whole lines"

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(
                f"{self.checkpoint_path} not found: nothing to resume in {self.dir}"
            )
        import torch

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
        import torch

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

    def release_path(self, server_round: int) -> Path:
        return self.dir / f"release_round_{server_round:03d}.npz"

    def kept_rounds(self) -> list[int]:
        return kept_rounds(self.dir)

    def keep_release(self, kept: KeptRelease) -> Path:
        meta = {
            "round": kept.round,
            "record": kept.record,
            "received": kept.received,
            "digest": kept.digest,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=np.asarray(kept.mean, dtype=np.float64),
            meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        )
        path = self.release_path(kept.round)
        write_atomic(path, buf.getvalue())
        return path

    def kept_release(
        self, server_round: int, digest: str, shape: tuple[int, int]
    ) -> KeptRelease | None:
        """The round's kept aggregate, or None when there is none. One made
        with other random features or of another shape is refused: G would
        be fitted to numbers in another feature space."""
        path = self.release_path(server_round)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                mean = data["mean"]
                meta = json.loads(data["meta"].tobytes().decode())
            kept = KeptRelease(
                round=int(meta["round"]),
                mean=mean,
                record=dict(meta["record"]),
                received=[(str(s), float(w), dict(m)) for s, w, m in meta["received"]],
                digest=str(meta["digest"]),
            )
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise KeptReleaseError(
                f"{path} cannot be read ({exc}); it holds the sites' spent release: restore it "
                "from a backup, or move it aside to run the round again (the sites spend again)"
            ) from None
        if kept.round != server_round or kept.digest != digest or kept.mean.shape != shape:
            raise KeptReleaseError(
                f"{path} was aggregated with other model or embedding settings (round "
                f"{kept.round}, shape {kept.mean.shape}, features {kept.digest[:12]}…); resume "
                "with the run's own config (image-size, channels, classes, embedding-*, seed)"
            )
        return kept

    def fit_state_path(self, server_round: int) -> Path:
        return self.dir / f"fit_round_{server_round:03d}.pt"

    def save_fit_state(self, server_round: int, state: FitState, digest: str) -> None:
        import torch

        buf = io.BytesIO()
        torch.save({"digest": digest, **dataclasses.asdict(state)}, buf)
        write_atomic(self.fit_state_path(server_round), buf.getvalue())

    def load_fit_state(self, server_round: int, digest: str) -> tuple[FitState | None, str]:
        """(the round's saved fit state, or None; why it was not usable, or "").
        A state that cannot be used only costs the steps it held: the fit
        starts again from its first step, at no privacy cost."""
        import torch

        from fedgan.privacy.embedding_fit import FitState

        path = self.fit_state_path(server_round)
        if not path.exists():
            return None, ""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.pop("digest") != digest:
                return None, f"{path.name} was fitted with other random features"
            return FitState(**data), ""
        except (
            OSError,
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            pickle.UnpicklingError,
        ) as exc:
            return None, f"{path.name} cannot be read ({type(exc).__name__})"

    def drop_fit_state(self, server_round: int) -> None:
        self.fit_state_path(server_round).unlink(missing_ok=True)

    def write_status(self, status: str, **details: Any) -> None:
        record = {"status": status, "time": time.time(), **details}
        write_text_atomic(self.status_path, json.dumps(record, sort_keys=True, indent=1))

    def dump_arrays(
        self, server_round: int, name: str, arrays: dict[str, list[np.ndarray]]
    ) -> None:
        dump_arrays(self.dir / "dumps" / f"round_{server_round:03d}" / f"{name}.npz", arrays)


def kept_rounds(run_dir: Path) -> list[int]:
    """The rounds whose release sums `RunOutputs.keep_release` kept in ``run_dir``."""
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in Path(run_dir).glob("release_round_*.npz"))


def load_generator(path: Path, map_location: str = "cpu") -> Generator:
    import torch

    from fedgan.gan.models import GanSpec, Generator

    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    gen = Generator(GanSpec(**ckpt["spec"]))
    gen.load_state_dict(ckpt["state_dict"])
    return gen


def read_records(metrics_path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a line being written at scrape time is skipped."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "round" in record:
            out.append(record)
    return out


def latest_by_site(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Each site's last reported value of a per-site field (``epsilon``,
    ``epsilon_budget``, ``noise_figure``) across a run's rounds."""
    out: dict[str, float] = {}
    for r in records:
        out.update(r.get(key, {}))
    return out
