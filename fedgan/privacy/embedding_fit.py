"""Fitting G to a mean embedding: the aggregator's half of the mean-embedding
mechanism (`fedgan.privacy.mean_embedding`). It reads only the sum of the sites'
noisy releases, so everything here is post-processing and costs no privacy;
no discriminator is involved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedgan.gan.models import Generator
from fedgan.privacy.mean_embedding import FeatureMap, Target


@dataclass(frozen=True)
class FitResult:
    loss: float  # the last step's weighted squared MMD
    first_loss: float
    steps: int
    seconds: float
    resumed_at: int = 0  # the step a saved `FitState` had reached; 0 for a fresh fit


@dataclass(frozen=True)
class FitState:
    """Everything the fit carries from one step to the next: G's weights and
    buffers, Adam's moments, the random stream the latent batches come from.
    Resumed on the CPU, a stopped fit ends bit for bit where an uninterrupted
    one would (tested); on a GPU, as closely as its kernels are deterministic."""

    step: int
    gen: dict[str, Any]
    opt: dict[str, Any]
    rng: torch.Tensor
    device: str  # "cpu" or "cuda": a generator's state only loads on its kind
    first_loss: float
    loss: float  # at ``step``


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
    resume: FitState | None = None,
    save: Callable[[FitState], None] | None = None,
    save_every: int = 0,
) -> FitResult:
    """Adam on Σ_c prior_c·‖mean φ(G(z, c)) − target_c‖², ``per_class`` fakes
    of every class per step. In place; G is left in train mode (its BatchNorm
    statistics are the caller's to recompute).

    ``save`` receives the fit's state every ``save_every`` steps, before
    ``progress`` hears of the step; ``resume`` continues from such a state
    (up to ``steps``, which may differ from the stopped fit's)."""
    if steps < 1 or per_class < 1 or not lr > 0:
        raise ValueError("steps, per_class and lr must be > 0")
    if save is not None and save_every < 1:
        raise ValueError("save_every must be >= 1 when a save callback is given")
    rows = target.means.shape[0]
    conditional = gen.spec.num_classes > 0
    if rows != max(gen.spec.num_classes, 1):
        raise ValueError(f"the target has {rows} class rows, G {gen.spec.num_classes} classes")
    if gen.spec.attr_dim:
        raise ValueError("the mean-embedding fit does not condition on attributes")
    kind = torch.device(device).type
    done, first, last = 0, float("nan"), float("nan")
    if resume is not None:
        gen.load_state_dict(resume.gen)
        done, first, last = resume.step, resume.first_loss, resume.loss
    gen.to(device).train()
    opt = torch.optim.Adam(gen.parameters(), lr, betas=(0.5, 0.999))
    labels = torch.arange(per_class * rows, device=device) % rows
    rng = torch.Generator(device=device).manual_seed(seed)
    if resume is not None:
        opt.load_state_dict(resume.opt)
        for group in opt.param_groups:
            group["lr"] = lr  # the resumed run's own rate
        if resume.device == kind:
            rng.set_state(resume.rng)
        else:  # another kind of device: a fresh stream, still tied to the step
            rng.manual_seed(seed + done)
    start = time.perf_counter()
    for step in range(done + 1, steps + 1):
        z = torch.randn(len(labels), gen.spec.latent_dim, generator=rng, device=device)
        loss = target.loss(phi, gen(z, labels if conditional else None), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        if step == 1:
            first = last
        if save is not None and (step % save_every == 0 and step < steps):
            save(
                FitState(
                    step,
                    {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()},
                    _to_cpu(opt.state_dict()),
                    rng.get_state(),
                    kind,
                    first,
                    last,
                )
            )
        if progress is not None:
            progress(step, steps, last)
    gen.to("cpu")
    return FitResult(last, first, max(steps, done), time.perf_counter() - start, done)


def _to_cpu(state: Any) -> Any:
    """A copy of an optimizer state dict with every tensor on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state
