"""Fitting G to a mean embedding: the aggregator's half of the mean-embedding
mechanism (`fedgan.privacy.mean_embedding`). It reads only the sum of the sites'
noisy releases, so everything here is post-processing and costs no privacy;
no discriminator is involved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedgan.gan.models import Generator
from fedgan.privacy.mean_embedding import FeatureMap, Target


@dataclass(frozen=True)
class FitResult:
    loss: float  # the last step's weighted squared MMD
    first_loss: float
    steps: int
    seconds: float


def fit_generator(
    gen: Generator,
    phi: FeatureMap,
    target: Target,
    *,
    steps: int,
    lr: float,
    per_class: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> FitResult:
    """Adam on Σ_c prior_c·‖mean φ(G(z, c)) − target_c‖², ``per_class`` fakes
    of every class per step. In place; G is left in train mode (its BatchNorm
    statistics are the caller's to recompute)."""
    if steps < 1 or per_class < 1 or not lr > 0:
        raise ValueError("steps, per_class and lr must be > 0")
    rows = target.means.shape[0]
    conditional = gen.spec.num_classes > 0
    if rows != max(gen.spec.num_classes, 1):
        raise ValueError(f"the target has {rows} class rows, G {gen.spec.num_classes} classes")
    if gen.spec.attr_dim:
        raise ValueError("the mean-embedding fit does not condition on attributes")
    gen.to(device).train()
    opt = torch.optim.Adam(gen.parameters(), lr, betas=(0.5, 0.999))
    labels = torch.arange(per_class * rows, device=device) % rows
    rng = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(1, steps + 1):
        z = torch.randn(len(labels), gen.spec.latent_dim, generator=rng, device=device)
        loss = target.loss(phi, gen(z, labels if conditional else None), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        if step == 1:
            first = last
        if progress is not None:
            progress(step, steps, last)
    gen.to("cpu")
    return FitResult(last, first, steps, time.perf_counter() - start)
