"""Local GAN training at a site, callable without Flower.

Non-private for now: the DP issue wraps the discriminator's real-image step
with Opacus here and nowhere else, since D is the only network that touches
patient images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedgan.gan.losses import discriminator_loss, generator_loss
from fedgan.gan.models import Discriminator, Generator


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 100
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError("local-steps must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch-size must be >= 1")
        if not (self.lr_g > 0 and self.lr_d > 0):
            raise ValueError("lr-g and lr-d must be > 0")


@dataclass(frozen=True)
class TrainResult:
    g_loss: float
    d_loss: float
    steps: int
    examples: int
    seconds: float


def train_local(
    gen: Generator,
    disc: Discriminator,
    images: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Run ``cfg.local_steps`` alternating D and G steps on ``images``
    (N×C×H×W in [-1, 1]). Losses are averaged over the steps."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty N×C×H×W image tensor, got {tuple(images.shape)}")
    start = time.perf_counter()
    device = torch.device(device)
    gen.to(device).train()
    disc.to(device).train()
    rng = torch.Generator().manual_seed(cfg.seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
    n = images.shape[0]
    batch = min(cfg.batch_size, n)
    latent = gen.spec.latent_dim
    g_total = d_total = 0.0
    for _ in range(cfg.local_steps):
        idx = torch.randint(0, n, (batch,), generator=rng)
        real = images[idx].to(device)
        z = torch.randn(batch, latent, generator=rng).to(device)

        opt_d.zero_grad(set_to_none=True)
        fake = gen(z)
        d_loss = discriminator_loss(disc(real), disc(fake.detach()))
        d_loss.backward()
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        g_loss = generator_loss(disc(fake))
        g_loss.backward(inputs=list(gen.parameters()))
        opt_g.step()

        g_total += float(g_loss.detach())
        d_total += float(d_loss.detach())
    return TrainResult(
        g_loss=g_total / cfg.local_steps,
        d_loss=d_total / cfg.local_steps,
        steps=cfg.local_steps,
        examples=n,
        seconds=time.perf_counter() - start,
    )
