"""A federation's starting point: G and D pretrained on public images.

The file is what `fedgan pretrain` writes and `model.init` in
federation.yaml names. Two hashes identify it:

- the file's SHA-256, what an auditor checks with ``sha256sum``;
- its weights' SHA-256 (`weights_sha256`, over G's then D's floating-point
  arrays in the order they travel), what a site pins in its policy. A site
  never sees the file, only the global model the aggregator sends in round
  1, so the weights are the identity it can verify itself: a site whose
  policy pins an init checks round 1's model against the declared hash.

A generator checkpoint with ``spec`` and ``state_dict`` (like
``generator.pt``), so `fedgan sample` and `fedgan evaluate` read it as any
generator, plus D's weights and a description of the data it saw."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedgan.atomic import write_atomic
from fedgan.config.model import GanSpec
from fedgan.config.run import ConfigError

if TYPE_CHECKING:
    from fedgan.gan.models import Discriminator, Generator

FORMAT = "fedgan-init/1"


def weights_sha256(gen: Sequence[np.ndarray], disc: Sequence[np.ndarray]) -> str:
    """SHA-256 over both networks' arrays: shape, dtype and bytes of each, so
    that two models hash alike only when every weight is the same."""
    digest = hashlib.sha256(FORMAT.encode())
    for name, arrays in (("G", gen), ("D", disc)):
        digest.update(f"{name}{len(arrays)}".encode())
        for a in arrays:
            a = np.ascontiguousarray(a)
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInit:
    spec: GanSpec
    gen_state: dict[str, Any]
    disc_state: dict[str, Any]
    data: dict[str, Any]  # what it was trained on: description, kind, images, stand_in
    steps: int
    file_sha256: str
    weights_sha256: str

    def record(self) -> dict[str, Any]:
        """For run-config.json, the audit log and the report (no weights)."""
        return {
            "file_sha256": self.file_sha256,
            "weights_sha256": self.weights_sha256,
            "data": self.data,
            "steps": self.steps,
        }

    def load_into(self, gen: Generator, disc: Discriminator) -> None:
        gen.load_state_dict(self.gen_state)
        disc.load_state_dict(self.disc_state)


def _arrays_sha256(gen: Generator, disc: Discriminator) -> str:
    from fedgan.weights import get_arrays

    return weights_sha256(get_arrays(gen), get_arrays(disc))


def save_init(
    path: Path, gen: Generator, disc: Discriminator, *, data: dict[str, Any], steps: int
) -> ModelInit:
    """Write the init file atomically; returns it as `load_init` would."""
    import torch

    gen_state = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
    disc_state = {k: v.detach().cpu() for k, v in disc.state_dict().items()}
    weights = _arrays_sha256(gen, disc)
    buf = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "spec": dataclasses.asdict(gen.spec),
            "state_dict": gen_state,
            "disc_state_dict": disc_state,
            "data": data,
            "steps": steps,
            "weights_sha256": weights,
            "round": 0,
        },
        buf,
    )
    blob = buf.getvalue()
    write_atomic(Path(path), blob)
    return ModelInit(
        gen.spec, gen_state, disc_state, data, steps, hashlib.sha256(blob).hexdigest(), weights
    )


def load_init(
    path: Path,
    spec: GanSpec | None = None,
    key: str = "model.init",
    classes: tuple[str, ...] | None = None,
) -> ModelInit:
    """The init file at ``path``, checked: readable, of our format, with the
    run's model shape (``spec``) and class names in the same order
    (``classes``), and weights that match their recorded hash. Errors are
    one line naming ``key`` and the file."""
    import torch

    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: {path} not found; write it with `fedgan pretrain --out {path}`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror})") from None
    try:
        doc = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if doc.get("format") != FORMAT:
            raise ValueError
        file_spec = GanSpec(**doc["spec"])
    except Exception:  # any unreadable file gets the same one line
        raise ConfigError(
            f"{key}: {path} is not a FedGAN init file ({FORMAT}); write one with `fedgan pretrain`"
        ) from None
    if spec is not None and file_spec != spec:
        raise ConfigError(
            f"{key}: {path} was pretrained for {_shape(file_spec)}; the run asks for "
            f"{_shape(spec)}; pretrain again with the run's model settings"
        )
    recorded = doc.get("data", {}).get("classes")
    if classes is not None and recorded is not None and tuple(recorded) != tuple(classes):
        raise ConfigError(
            f"{key}: {path} was pretrained with classes {', '.join(recorded)}; the run names "
            f"{', '.join(classes)}: name them in that order, or pretrain with the run's classes"
        )
    from fedgan.gan.models import build

    gen, disc = build(file_spec)
    try:
        gen.load_state_dict(doc["state_dict"])
        disc.load_state_dict(doc["disc_state_dict"])
    except (KeyError, RuntimeError):
        raise ConfigError(f"{key}: {path} holds weights that do not fit its model") from None
    weights = _arrays_sha256(gen, disc)
    if weights != doc.get("weights_sha256"):
        raise ConfigError(f"{key}: {path} is damaged (its weights do not match their hash)")
    return ModelInit(
        file_spec,
        gen.state_dict(),
        disc.state_dict(),
        dict(doc.get("data", {})),
        int(doc.get("steps", 0)),
        hashlib.sha256(blob).hexdigest(),
        weights,
    )


def _shape(spec: GanSpec) -> str:
    classes = f", {spec.num_classes} classes" if spec.num_classes else ""
    attrs = f", {spec.attr_dim} attribute values" if spec.attr_dim else ""
    return (
        f"{spec.image_size} px × {spec.channels} channels, latent {spec.latent_dim}, "
        f"width {spec.width}{classes}{attrs}"
    )
