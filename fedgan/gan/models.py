"""DCGAN generator and discriminator for square images of 16 to 128 pixels.

The discriminator is the only network that sees patient images, so it is built
for Opacus from the start: no BatchNorm (per-sample gradients need samples to be
independent; GroupNorm is) and no in-place activations (Opacus' backward hooks
fail on views modified in place). The generator may keep BatchNorm: it never
touches real data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# The spec is a plain type (configuration carries it without the model);
# re-exported here, where the models are built from it.
from fedgan.config.model import SUPPORTED_SIZES as SUPPORTED_SIZES
from fedgan.config.model import GanSpec as GanSpec


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, spec: GanSpec) -> None:
        super().__init__()
        self.spec = spec
        ch = spec.width * 2 ** (spec.blocks - 1)
        # Conditional: the class embedding is concatenated to the latent.
        self.embed = nn.Embedding(spec.num_classes, spec.latent_dim) if spec.num_classes else None
        inputs = spec.latent_dim * (2 if self.embed is not None else 1) + spec.attr_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(inputs, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for _ in range(spec.blocks - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, spec.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional generator needs labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        if self.spec.attr_dim:
            if attributes is None or attributes.shape != (z.shape[0], self.spec.attr_dim):
                raise ValueError(
                    f"an attribute-conditioned generator needs B×{self.spec.attr_dim} attributes"
                )
            z = torch.cat([z, attributes.to(z.dtype)], dim=1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class Discriminator(nn.Module):
    def __init__(self, spec: GanSpec) -> None:
        super().__init__()
        self.spec = spec
        ch = spec.width
        layers: list[nn.Module] = [
            nn.Conv2d(spec.channels, ch, 4, 2, 1),
            nn.LeakyReLU(0.2),
        ]
        for _ in range(spec.blocks - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.GroupNorm(_groups(ch * 2), ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        # Projection discriminator (Miyato & Koyama 2018): logit += <e(y), Σ h>.
        self.embed = nn.Embedding(spec.num_classes, ch) if spec.num_classes else None
        # Tabular conditioning: predicts the attribute vector from the features.
        self.attr_head = nn.Linear(ch, spec.attr_dim) if spec.attr_dim else None
        self.apply(_init)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, with_attributes: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One logit per image, shape [B] (a [B, 1] shape breaks Opacus' ghost
        clipping, which then over-scales updates ~30x); with
        ``with_attributes``, also the predicted attributes [B, attr_dim], from
        the same forward pass (Opacus needs one)."""
        if self.embed is None and self.attr_head is None:
            return self.net(x).view(-1)
        features = self.net[:-1](x)
        logit = self.net[-1](features).view(-1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional discriminator needs labels")
            logit = logit + (self.embed(labels) * features.sum(dim=(2, 3))).sum(dim=1)
        if not with_attributes:
            return logit
        if self.attr_head is None:
            raise ValueError("this discriminator has no attribute head")
        return logit, self.attr_head(features.mean(dim=(2, 3)))


@torch.no_grad()
def recalibrate_batchnorm(
    gen: Generator,
    inputs: Callable[[int, torch.Generator], tuple],
    batches: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> None:
    """Recompute G's BatchNorm running statistics from its own outputs
    (``inputs(n, rng)`` gives G's arguments). They are a function of G's
    weights and random inputs only, so the server can recompute them after
    averaging instead of averaging the sites' (secure aggregation clips each
    value to a range sized for weight updates, which running variances
    outgrow)."""
    norms = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    was_training = gen.training
    gen.train()
    rng = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        gen(*inputs(batch_size, rng))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    gen.train(was_training)


def build(spec: GanSpec, seed: int | None = None) -> tuple[Generator, Discriminator]:
    """Both networks, initialised reproducibly when ``seed`` is given (every
    site and the server must start from the same global model)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Generator(spec), Discriminator(spec)
    return Generator(spec), Discriminator(spec)


def trainable_parameters(module: nn.Module) -> int:
    """d in DP-SGD's noise: the Gaussian noise has one coordinate per weight."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
