"""What the aggregator does with the sum it receives, one object per privacy
mechanism, with the same few steps, so the round itself never asks which
mechanism it runs:

- `FedAvgOfDeltas` (``dp-sgd``): the sites send Δ of G and D; the new global
  model is the old one plus their weighted mean.
- `MeanEmbeddingFit` (``mean-embedding``): the sites send one noisy release
  of class-wise random-feature means; G is fitted to their sum. The fit is
  post-processing of DP releases and spends no budget; the sum is kept before
  the fit, so an aggregator stopped during it resumes without asking the
  sites again (a second release would be a second spend)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from fedgan.aggregator.record import RoundRecord
from fedgan.aggregator.run_store import KeptRelease, Received, RunOutputs
from fedgan.audit_log import AuditLog
from fedgan.config.run import RunSettings
from fedgan.gan.models import Discriminator, Generator
from fedgan.privacy.mean_embedding import FeatureMap, Target, class_noise_figures
from fedgan.progress import FIT_MARKER
from fedgan.round_numbers import DCGAN, RELEASE, Stat
from fedgan.update import (
    Arrays,
    Contribution,
    Release,
    SiteUpdate,
    apply_delta,
    release_mean,
    split_like,
    weighted_mean,
)
from fedgan.weights import get_arrays, set_arrays

if TYPE_CHECKING:
    from fedgan.aggregator.round import Collected

log = logging.getLogger("fedgan.server")

Model = tuple[Arrays, Arrays]  # G's and D's arrays


class Mechanism(Protocol):
    # The hash of the random features the sites must draw ("" if none).
    digest: str
    # The numbers sites append inside the masked vector (secure rounds).
    stats: tuple[Stat, ...]

    def kept(self, server_round: int) -> KeptRelease | None:
        """The round's sum, kept before a stop; None: ask the sites."""
        ...

    def outgoing(self, before: Model) -> Model:
        """The arrays sent to the sites with the train request."""
        ...

    def length(self, before: Model) -> int:
        """Values per site's update, for secure aggregation."""
        ...

    def misfit(self, sent: Contribution, before: Model) -> str:
        """Why what a site sent in the clear cannot be summed, or ""."""
        ...

    def mean(self, sent: list[Contribution]) -> Model:
        """The weighted mean of what the sites sent in the clear."""
        ...

    def from_vector(self, vector: np.ndarray, before: Model) -> Model:
        """The securely aggregated mean, in the update's shape."""
        ...

    def apply(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        """Update G (and D) from the round's mean; fill the record's fields."""
        ...

    def dump(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        """Test mode (``dump-updates``): what the round read and wrote."""
        ...


@dataclass
class FedAvgOfDeltas:
    store: RunOutputs
    digest: str = ""
    stats: ClassVar[tuple[Stat, ...]] = DCGAN

    def kept(self, server_round: int) -> KeptRelease | None:
        return None

    def outgoing(self, before: Model) -> Model:
        return before

    def length(self, before: Model) -> int:
        return sum(a.size for a in (*before[0], *before[1]))

    def misfit(self, sent: Contribution, before: Model) -> str:
        if not isinstance(sent, SiteUpdate):
            return "it sent a release, not an update"
        shapes = [[a.shape for a in arrays] for arrays in (sent.gen, sent.disc)]
        if shapes != [[a.shape for a in arrays] for arrays in before]:
            return "its update does not have the global model's shapes"
        return ""

    def mean(self, sent: list[Contribution]) -> Model:
        return weighted_mean([u for u in sent if isinstance(u, SiteUpdate)])

    def from_vector(self, vector: np.ndarray, before: Model) -> Model:
        return split_like(vector, *before)

    def apply(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        assert collected.mean is not None
        (before_gen, before_disc), (mean_gen, mean_disc) = collected.before, collected.mean
        set_arrays(gen, apply_delta(before_gen, mean_gen))
        set_arrays(disc, apply_delta(before_disc, mean_disc))
        summed = collected.summed
        collected.record.updates_clipped = (
            round(summed["update-clipped"] * len(collected.record.sites))
            if summed is not None
            else sum(bool(m["update-clipped"]) for _, _, m in collected.received)
        )

    def dump(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        r = collected.record.round
        before_gen, before_disc = collected.before
        self.store.dump_arrays(r, "global_before", {"gen": before_gen, "disc": before_disc})
        self.store.dump_arrays(
            r, "global_after", {"gen": get_arrays(gen), "disc": get_arrays(disc)}
        )


@dataclass
class MeanEmbeddingFit:
    settings: RunSettings
    store: RunOutputs
    audit: AuditLog
    stats: ClassVar[tuple[Stat, ...]] = RELEASE

    def __post_init__(self) -> None:
        spec, privacy = self.settings.spec, self.settings.privacy
        self.phi = FeatureMap(
            pixels=spec.channels * spec.image_size**2,
            features=privacy.embedding_features,
            length_scale=privacy.embedding_length_scale,
            seed=self.settings.train.seed,
        )
        # Hashed once: the features are up to hundreds of MB.
        self.digest = self.phi.digest()
        self.shape = (max(spec.num_classes, 1), self.phi.width + 1)

    def kept(self, server_round: int) -> KeptRelease | None:
        kept = self.store.kept_release(server_round, self.digest, self.shape)
        if kept is not None:
            log.info(
                "round %d: the sites' releases were summed before the aggregator stopped; "
                "fitting G to that kept sum (%s), without asking the sites again",
                server_round,
                self.store.release_path(server_round).name,
            )
            self.audit.append("release_reused", run=self.store.dir.name, round=server_round)
        return kept

    def all_kept(self, first_round: int) -> bool:
        """Every round left has its sum kept: no site need be asked anything."""
        rounds = set(range(first_round, self.settings.rounds + 1))
        return rounds <= set(self.store.kept_rounds())

    def outgoing(self, before: Model) -> Model:
        return [], []

    def length(self, before: Model) -> int:
        return self.shape[0] * self.shape[1]

    def misfit(self, sent: Contribution, before: Model) -> str:
        if not isinstance(sent, Release) or sent.values.shape != self.shape:
            return f"its release is not {self.shape} values"
        return ""

    def mean(self, sent: list[Contribution]) -> Model:
        return [release_mean([r for r in sent if isinstance(r, Release)])], []

    def from_vector(self, vector: np.ndarray, before: Model) -> Model:
        return [vector.reshape(self.shape)], []

    def apply(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        assert collected.mean is not None
        record, mean = collected.record, collected.mean[0][0]
        total = sum(w for _, w, _ in collected.received)
        if not collected.kept:
            # Before the fit, which takes minutes: the sites' spend is safe now.
            path = self.store.keep_release(
                KeptRelease(record.round, mean, record.as_dict(), collected.received, self.digest)
            )
            self.audit.append(
                "release_kept", run=self.store.dir.name, round=record.round, file=path.name
            )
        self._fit(gen, mean, total, record)
        counts = mean[:, -1] * total
        names = self.settings.classes or ("all",)
        figures = class_noise_figures(counts, _sigmas(collected.received), self.phi.width)
        record.class_counts = {c: round(float(n), 1) for c, n in zip(names, counts, strict=True)}
        record.class_noise_figure = {c: float(f) for c, f in zip(names, figures, strict=True)}

    def _fit(self, gen: Generator, mean: np.ndarray, examples: float, record: RoundRecord) -> None:
        """Fit G to the releases' sum over their noisy image counts. Its state
        is saved at every tenth of the fit, so a resumed run goes on from there."""
        from fedgan.privacy.embedding_fit import fit_generator

        server_round, privacy = record.round, self.settings.privacy
        resume, unusable = self.store.load_fit_state(server_round, self.digest)
        if unusable:
            log.warning(
                "round %d: %s; the fit starts again from its first step", server_round, unusable
            )
        elif resume is not None:
            log.info("round %d: the fit goes on from step %d", server_round, resume.step)
        fit = fit_generator(
            gen,
            self.phi,
            Target.from_sum(mean, min_count=1.0 / max(examples, 1.0)),
            steps=privacy.embedding_fit_steps,
            lr=privacy.embedding_fit_lr,
            seed=self.settings.train.seed,
            device="cuda" if torch.cuda.is_available() else "cpu",
            progress=_fit_progress,
            resume=resume,
            save=lambda state: self.store.save_fit_state(server_round, state, self.digest),
            save_every=max(1, privacy.embedding_fit_steps // 10),
        )
        record.mechanism = "mean-embedding"
        record.g_loss = fit.loss
        record.fit_loss_first = fit.first_loss
        record.fit_steps = fit.steps
        record.fit_seconds = round(fit.seconds, 3)
        record.fit_resumed_at = fit.resumed_at or None

    def dump(self, collected: Collected, gen: Generator, disc: Discriminator) -> None:
        assert collected.mean is not None
        self.store.dump_arrays(
            collected.record.round, "release_mean", {"release": collected.mean[0]}
        )


def _fit_progress(step: int, total: int, loss: float) -> None:
    if step == total or step % max(1, total // 10) == 0:
        log.info("%s: step %d/%d, loss %.5f", FIT_MARKER, step, total, loss)


def _sigmas(received: Received) -> list[float]:
    return [m["noise-multiplier"] for _, _, m in received if "noise-multiplier" in m]


def mechanism_for(settings: RunSettings, store: RunOutputs, audit: AuditLog) -> Mechanism:
    if settings.privacy.mean_embedding:
        return MeanEmbeddingFit(settings, store, audit)
    return FedAvgOfDeltas(store)
