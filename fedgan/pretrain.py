"""Central, non-private training of G and D on public images, at the
aggregator, before a federation: the starting point `model.init` names.

Every current record in DP image synthesis starts from a model pretrained on
public data and fine-tunes it privately: the private rounds then spend their
budget on what is particular to the sites, not on learning what an image is.
No site's data is involved here, so nothing is accounted; the data that was
used is described in the init file, and from there in the run's record."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedgan.atomic import write_atomic
from fedgan.config.model import GanSpec
from fedgan.config.training import TrainConfig
from fedgan.gan.models import Discriminator, Generator, build
from fedgan.model_init import ModelInit, save_init
from fedgan.progress import step_progress
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.silo.synth import STAND_IN_MARKER
from fedgan.train import resolve_device, train_local


def public_images(
    data_dir: Path, kind: str, spec: GanSpec, classes: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The public set at the model's size, its class indices for a
    conditional model (images without one of ``classes`` left out), and the
    description the init file keeps: counts and names, never a pixel."""
    if spec.attr_dim:
        raise SiloError(
            "pretraining an attribute-conditioned model is not supported; pretrain without "
            "model.attributes, or start that federation from random weights"
        )
    opts = SiloOptions.from_mapping(kind, spec.image_size, spec.channels, {})
    data = load_silo(Path(data_dir), opts).require_images(f"the public set {data_dir}")
    keep = list(range(len(data.labels)))
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i in keep if data.labels[i] in index]
        if not keep:
            raise SiloError(
                f"{data_dir}: no image carries one of the classes {', '.join(classes)}; "
                "check its labels.csv"
            )
        labels = torch.tensor([index[data.labels[i]] for i in keep], dtype=torch.long)
    images = torch.from_numpy(data.as_float()[keep])
    stand_in = (Path(data_dir) / STAND_IN_MARKER).exists()
    described = {
        "folder": Path(data_dir).resolve().name,
        # Class i of the init is this name: a run must name its classes alike.
        "classes": list(classes),
        "kind": kind,
        "images": len(keep),
        "stand_in": stand_in,
        "description": (
            "a stand-in public set drawn by `fedgan silo synth --profile public` (not real data)"
            if stand_in
            else f"{len(keep)} public {kind} images from {Path(data_dir).resolve().name}"
        ),
    }
    return images, labels, described


def pretrain(
    images: torch.Tensor,
    spec: GanSpec,
    cfg: TrainConfig,
    *,
    labels: torch.Tensor | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Generator, Discriminator, float]:
    """G and D after ``cfg.local_steps`` non-private steps from the seed's
    initialisation; also the seconds it took."""
    gen, disc = build(spec, seed=cfg.seed)
    result = train_local(
        gen, disc, images, cfg, device=resolve_device(device), progress=progress, labels=labels
    )
    return gen.cpu(), disc.cpu(), result.seconds


def sample_grid(gen: Generator, seed: int = 1234) -> bytes:
    """An 8×8 grid of G's samples (one class per row for a conditional G),
    from fixed latents so that two inits can be compared tile by tile."""
    from fedgan.samples import grid_png

    spec = gen.spec
    z = torch.randn(64, spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(64) // 8 % spec.num_classes if spec.num_classes else None
    gen.eval()
    with torch.no_grad():
        return grid_png(gen(z, y))


def pretrain_to_file(
    data_dir: Path,
    kind: str,
    spec: GanSpec,
    classes: str | tuple[str, ...],
    out: Path,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> ModelInit:
    """`fedgan pretrain`: the public set, the training with a progress bar,
    the init file and its sample grid beside it (``out`` with ``.png``)."""
    if isinstance(classes, str):
        classes = tuple(c for c in classes.split(",") if c)
    images, labels, described = public_images(data_dir, kind, spec, classes)
    cfg = TrainConfig(local_steps=steps, batch_size=batch_size, lr_g=lr, lr_d=lr, seed=seed)
    say(
        f"pretraining on {described['description']}: {described['images']} images at "
        f"{spec.image_size} px, {steps} steps of {min(batch_size, described['images'])}, no DP "
        "(public data only)"
    )
    gen, disc, seconds = pretrain(
        images, spec, cfg, labels=labels, device=device, progress=step_progress(say, "pretrain")
    )
    init = save_init(out, gen, disc, data=described, steps=steps)
    write_atomic(Path(out).with_suffix(".png"), sample_grid(gen))
    say(f"wrote {out} after {seconds:.0f} s; samples: {Path(out).with_suffix('.png')}")
    return init
