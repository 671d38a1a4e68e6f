"""A site's local training settings, as a plain type: the run's settings
carry it, `fedgan.train.train_local` runs it. Here, and not beside the
trainer, so that configuration needs neither torch nor Opacus."""

from __future__ import annotations

from dataclasses import dataclass

# batch-size = 0: each site's batch from its own silo, min(128, N / 2).
# Measured (bench/RESULTS.md, "pretraining"): at 256 images and ε 10 a batch
# of 128 cut each step's noise figure from 17× (batch 32) to 7×; half the
# silo keeps the sampling rate at 1/2 or below, so sampling still amplifies
# privacy; past 256 images the batch stays 128 and q falls with N.
AUTO_BATCH_MAX = 128


def auto_batch(images: int) -> int:
    return max(1, min(AUTO_BATCH_MAX, images // 2))


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 100
    batch_size: int = 32  # 0: auto_batch of the silo
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    seed: int = 0
    # FedProx: μ/2·‖w − w_global‖² on both networks (0: plain local training).
    prox_mu: float = 0.0
    # "bf16": autocast matrix work to bfloat16 on CUDA (weights, optimizer
    # state and the DP noise stay fp32). Ignored on CPU, where it is slower.
    precision: str = "fp32"
    # NHWC activations for the convolutions (tensor-core friendly on CUDA).
    channels_last: bool = False
    # λ of the tabular-conditioning loss L = L_GAN + λ·L_cond.
    cond_lambda: float = 1.0
    # λ of G's mode-seeking term (gan.losses.mode_seeking_loss); 0: off.
    mode_seeking: float = 0.0
    # n_D: D steps before each of G's ``local_steps`` steps; each reads a
    # fresh batch, so a round takes local_steps × n_D private steps.
    d_steps_per_g: int = 1
    # > 0: n_D becomes a ceiling: before each G step D steps until it calls
    # at least this fraction of the step's generated images fake (its
    # accuracy on generated images only: no image is read for it, so it costs
    # no privacy), at most n_D times. The accountant still counts n_D, an
    # upper bound. 0: always n_D.
    adaptive_d: float = 0.0
    # > 0: G's weights at the end of the round are the exponential moving
    # average of its weights over the round's steps, with this decay (e.g.
    # 0.99). Post-processing: no privacy cost. 0: G's last weights.
    g_ema: float = 0.0

    def batch_for(self, images: int) -> int:
        return self.batch_size or auto_batch(images)

    @property
    def d_steps(self) -> int:
        """D's steps in the round: what the accountant counts."""
        return self.local_steps * self.d_steps_per_g

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError("local-steps must be >= 1")
        if self.batch_size < 0:
            raise ValueError("batch-size must be >= 1 (or 0: min(128, half the silo))")
        if not (self.lr_g > 0 and self.lr_d > 0):
            raise ValueError("lr-g and lr-d must be > 0")
        if self.prox_mu < 0:
            raise ValueError("prox-mu must be >= 0")
        if self.cond_lambda < 0:
            raise ValueError("cond-lambda must be >= 0")
        if self.mode_seeking < 0:
            raise ValueError("mode-seeking must be >= 0")
        if self.d_steps_per_g < 1:
            raise ValueError("d-steps-per-g must be >= 1")
        if not 0 <= self.adaptive_d < 1:
            raise ValueError("adaptive-d must be in [0, 1) (0: off)")
        if not 0 <= self.g_ema < 1:
            raise ValueError("g-ema must be in [0, 1) (0: off)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r}: use fp32 or bf16")
