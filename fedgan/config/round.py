"""The round contract: what the aggregator asks of a site in one round.

Built once by the aggregator from its typed run settings, serialized once
into the train message's flat record (`to_record`), parsed once at the site
(`from_record`) with the same one-line errors, naming the key. Neither side
reads the record's keys anywhere else."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedgan.config.model import GanSpec
from fedgan.config.run import PrivacySettings, _get, parse_classes
from fedgan.config.training import auto_batch

WHERE = "round config"
Scalar = int | float | bool | str


@dataclass(frozen=True)
class ModelShape:
    """G and D as both sides build them."""

    image_size: int
    channels: int
    latent_dim: int
    width: int
    classes: tuple[str, ...]
    attributes: str  # the declaration, e.g. "age=0:100,sex=F|M" (fedgan.attributes)

    def spec(self) -> GanSpec:
        return GanSpec.declared(
            self.image_size,
            self.channels,
            self.latent_dim,
            self.width,
            self.classes,
            self.attributes,
        )


@dataclass(frozen=True)
class LocalTraining:
    steps: int
    epochs: float  # > 0: passes over the site's silo instead of ``steps``
    batch_size: int
    lr_g: float
    lr_d: float
    mode_seeking: float
    cond_lambda: float
    prox_mu: float  # 0 unless the run's strategy is FedProx
    seed: int  # this round's, different at every round
    d_steps_per_g: int = 1  # n_D: private D steps before each G step
    adaptive_d: float = 0.0  # > 0: n_D is a ceiling (fedgan.config.training)
    g_ema: float = 0.0  # > 0: G's weights are their moving average over the round

    def batch_for(self, images: int) -> int:
        """The (expected) batch at a silo of ``images`` images: the run's, or
        with batch-size 0 the silo's own (`fedgan.config.training.auto_batch`)."""
        return self.batch_size or auto_batch(images)

    def steps_for(self, images: int) -> int:
        """This round's local steps at a silo of ``images`` images."""
        if self.epochs > 0:
            return max(1, math.ceil(self.epochs * images / self.batch_for(images)))
        return max(1, self.steps)

    def d_steps_for(self, images: int) -> int:
        """D's private steps this round: what the accountant counts."""
        return self.steps_for(images) * self.d_steps_per_g


@dataclass(frozen=True)
class RoundConfig:
    round: int
    rounds: int
    run_name: str  # the ledger's run id: the run folder's name, stable across resumes
    model: ModelShape
    local: LocalTraining
    privacy: PrivacySettings
    embedding_seed: int  # the random features' public seed (mean-embedding runs)
    embedding_digest: str = ""  # their hash, for the site to check it drew the same
    dump_updates: bool = False  # test mode
    # The weights SHA-256 of the pretrained init the run started from ("":
    # random weights); a site may pin or refuse it, and checks round 1's model.
    init_sha256: str = ""

    def to_record(self) -> dict[str, Scalar]:
        m, t = self.model, self.local
        record: dict[str, Scalar] = {
            "round": self.round,
            "rounds": self.rounds,
            "run-name": self.run_name,
            "image-size": m.image_size,
            "channels": m.channels,
            "latent-dim": m.latent_dim,
            "width": m.width,
            "classes": ",".join(m.classes),
            "attributes": m.attributes,
            "local-steps": t.steps,
            "local-epochs": t.epochs,
            "batch-size": t.batch_size,
            "lr-g": t.lr_g,
            "lr-d": t.lr_d,
            "mode-seeking": t.mode_seeking,
            "cond-lambda": t.cond_lambda,
            "prox-mu": t.prox_mu,
            "seed": t.seed,
            "d-steps-per-g": t.d_steps_per_g,
            "adaptive-d": t.adaptive_d,
            "g-ema": t.g_ema,
            "embedding-seed": self.embedding_seed,
            "dump-updates": self.dump_updates,
            **self.privacy.as_config(),
        }
        if self.embedding_digest:
            record["embedding-digest"] = self.embedding_digest
        if self.init_sha256:
            record["model-init-sha256"] = self.init_sha256
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        def get(key: str, kind: type) -> Any:
            return _get(record, key, kind, WHERE)

        return cls(
            round=get("round", int),
            rounds=get("rounds", int),
            run_name=get("run-name", str),
            model=ModelShape(
                image_size=get("image-size", int),
                channels=get("channels", int),
                latent_dim=get("latent-dim", int),
                width=get("width", int),
                classes=parse_classes(get("classes", str)),
                attributes=get("attributes", str),
            ),
            local=LocalTraining(
                steps=get("local-steps", int),
                epochs=get("local-epochs", float),
                batch_size=get("batch-size", int),
                lr_g=get("lr-g", float),
                lr_d=get("lr-d", float),
                mode_seeking=get("mode-seeking", float),
                cond_lambda=get("cond-lambda", float),
                prox_mu=get("prox-mu", float),
                seed=get("seed", int),
                d_steps_per_g=get("d-steps-per-g", int),
                adaptive_d=get("adaptive-d", float),
                g_ema=get("g-ema", float),
            ),
            privacy=PrivacySettings.from_run_config(record, WHERE),
            embedding_seed=get("embedding-seed", int),
            embedding_digest=str(record.get("embedding-digest", "")),
            dump_updates=get("dump-updates", bool),
            init_sha256=str(record.get("model-init-sha256", "")),
        )
