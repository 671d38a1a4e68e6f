"""Local GAN training at a site, callable without Flower.

Privacy argument (DP-SGD on the discriminator, Abadi et al. 2016):

* Only the discriminator D reads patient images, and only through the "real"
  half of its loss (with the attribute term, which reads real images and
  their own attributes). Each step draws a Poisson sample of the silo (each
  image independently with probability q, from a generator seeded by the OS's
  CSPRNG so nobody, the server included, can predict it), clips the gradient
  of the real half on each image to L2 norm ``max_grad_norm`` = C (by
  `fedgan.privacy.clipped_gradient`, or Opacus's per-sample gradients), sums
  them and adds Gaussian noise N(0, σ²C²) (Opacus's secure mode, robust to
  floating-point attacks). That is the sampled Gaussian mechanism; the
  accountant (`fedgan.privacy`) composes it over every step ever run on the
  silo.
* D's gradient on generated images depends on no patient record (G's output
  is a function of G's weights and random latents, and G's weights so far
  are themselves a DP release), so it is computed without per-sample
  machinery, scaled as a whole to norm at most C (so that it does not
  outweigh the clipped real half) and added to the noised real-half gradient
  before the optimizer step. Adding a data-independent term is
  post-processing.
* G never sees an image; it learns only from D's output (and, with
  mode-seeking, from the spread of its own samples over its own latents), so
  its update is post-processing of D's private release. So is everything computed from the
  weights afterwards: the update Δ, its clipping, quantization and masking.
Hence the site's (ε, δ) bounds what G, D and every update reveal about any
one image in its silo.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fedgan.config.run import ConfigError, device_setting

# A plain type (configuration carries it without the trainer); re-exported.
from fedgan.config.training import TrainConfig as TrainConfig
from fedgan.gan.losses import (
    attribute_loss,
    discriminator_loss,
    generated_loss,
    generator_loss,
    mode_seeking_loss,
    paired,
    per_sample_attribute_loss,
)
from fedgan.gan.models import Discriminator, Generator

# Opacus's full backward hooks fire on D's first layer, whose input (an image)
# needs no gradient; torch warns about that on every step. It is expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


@dataclass(frozen=True)
class DPConfig:
    """The sampled Gaussian mechanism on D's real half."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    # Tests only: a fixed seed for sampling and noise. None (always in
    # production) seeds from the OS's CSPRNG.
    secret_seed: int | None = None
    # How per-sample gradients are clipped: "ghost" (fedgan.privacy.
    # clipped_gradient: per-sample norms without per-sample gradients, the
    # fastest; bench/RESULTS.md) or Opacus's per-sample gradients, "hooks" or
    # "functorch". All three give the same clipped sum.
    grad_sample_mode: str = "ghost"

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0:
            raise ValueError("noise-multiplier must be >= 0 and max-grad-norm > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate {self.sample_rate} must be in (0, 1]")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad-sample mode {self.grad_sample_mode!r}: use one of {GRAD_SAMPLE_MODES}"
            )


@dataclass(frozen=True)
class TrainResult:
    # G's adversarial loss (with the attribute term), without mode-seeking's,
    # so that it reads the same whether that term is on or not.
    g_loss: float
    d_loss: float  # both halves: for the site's own log only
    steps: int
    examples: int
    seconds: float
    # λ times the mode-seeking term, averaged over the steps; 0 when it is off.
    mode_seeking_loss: float = 0.0
    # D's steps taken: local_steps × n_D, or fewer with adaptive n_D.
    d_steps: int = 0
    # D's loss on generated images alone: what a site reports, because the
    # real-image half is computed on patients' images without DP noise.
    d_loss_generated: float = 0.0


def train_local(
    gen: Generator,
    disc: Discriminator,
    images: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    dp: DPConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    labels: torch.Tensor | None = None,
    attributes: torch.Tensor | None = None,
    sample_attributes: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` G steps, each after ``cfg.d_steps_per_g`` D steps, on ``images``
    (N×C×H×W in [-1, 1]); D's real half is private when ``dp`` is given.
    A conditional model needs ``labels`` (N class indices); generated images
    get uniformly drawn classes, which depend on no patient data. An
    attribute-conditioned one needs ``attributes`` (N×A) and
    ``sample_attributes`` for the generated images (data-independent too).
    Losses are averaged over the steps."""
    _check_inputs(gen, images, labels, attributes, sample_attributes)
    start = time.perf_counter()
    device = torch.device(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gen.to(device).train()
    disc.to(device, memory_format=fmt).train()
    silo = _Silo.on_device(gen, images, labels, attributes, device)
    autocast = functools.partial(
        torch.autocast,
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=cfg.precision == "bf16" and device.type == "cuda",
    )
    rng = torch.Generator().manual_seed(cfg.seed)
    g_step = GeneratorStep(gen, disc, cfg, autocast, device)
    batch = min(cfg.batch_for(silo.size), silo.size)
    d_step = _discriminator_step(disc, cfg, dp, batch, autocast)
    loop = _Loop(gen, g_step, d_step, autocast, fmt, device, rng, batch, sample_attributes)
    try:
        g_total, d_total, ms_total, d_taken = _run_steps(loop, silo, cfg, progress)
    finally:
        d_step.close()
    g_step.finish()
    return TrainResult(
        g_loss=float(g_total) / cfg.local_steps,
        d_loss=float(d_total[0]) / d_taken,  # over every D step
        steps=cfg.local_steps,
        examples=silo.size,
        seconds=time.perf_counter() - start,
        mode_seeking_loss=float(ms_total) / cfg.local_steps,
        d_steps=d_taken,
        d_loss_generated=float(d_total[1]) / d_taken,
    )


def _check_inputs(
    gen: Generator,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    attributes: torch.Tensor | None,
    sample_attributes: Callable[[int, torch.Generator], torch.Tensor] | None,
) -> None:
    """Refuse before anything moves to the device or any step runs."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty N×C×H×W image tensor, got {tuple(images.shape)}")
    if gen.spec.num_classes and (labels is None or labels.shape != (images.shape[0],)):
        raise ValueError("a conditional model needs one class index per image")
    attr_dim = gen.spec.attr_dim
    if attr_dim and (
        attributes is None
        or attributes.shape != (images.shape[0], attr_dim)
        or sample_attributes is None
    ):
        raise ValueError(
            f"an attribute-conditioned model needs N×{attr_dim} attributes and a sampler"
        )


@dataclass(frozen=True)
class _Silo:
    """The site's images with their labels and attributes (None where the
    model is not conditioned on them)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    attributes: torch.Tensor | None

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def on_device(
        cls,
        gen: Generator,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        attributes: torch.Tensor | None,
        device: torch.device,
    ) -> _Silo:
        """The silo moves to the accelerator once (a 64 px silo of 10,000 RGB
        images is 0.5 GB) instead of one host-to-device copy per step."""
        images = images.to(device)
        labels = labels.to(device) if gen.spec.num_classes and labels is not None else None
        attributes = attributes.to(device) if gen.spec.attr_dim and attributes is not None else None
        return cls(images, labels, attributes)


def _discriminator_step(
    disc: Discriminator,
    cfg: TrainConfig,
    dp: DPConfig | None,
    batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> PlainDiscriminatorStep | DPDiscriminatorStep:
    prox = Proximal(disc, cfg.prox_mu)
    step: PlainDiscriminatorStep | DPDiscriminatorStep
    if dp is None:
        step = PlainDiscriminatorStep(disc, cfg.lr_d, prox, autocast, cfg.cond_lambda)
    else:
        step = DPDiscriminatorStep(disc, cfg.lr_d, dp, batch, prox, autocast, cfg.cond_lambda)
    step.track_fakes = cfg.adaptive_d > 0
    return step


@dataclass(frozen=True)
class _Loop:
    """What every step of the local loop uses, set up once before it."""

    gen: Generator
    g_step: GeneratorStep
    d_step: PlainDiscriminatorStep | DPDiscriminatorStep
    autocast: Callable[[], contextlib.AbstractContextManager]
    fmt: torch.memory_format
    device: torch.device
    rng: torch.Generator
    batch: int
    sample_attributes: Callable[[int, torch.Generator], torch.Tensor] | None


def _run_steps(
    loop: _Loop,
    silo: _Silo,
    cfg: TrainConfig,
    progress: Callable[[int, int], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The hot loop; returns the summed G, D and mode-seeking losses and
    D's steps taken. The
    draws from ``rng`` come in a fixed order (D's batch where it is not
    private, then z, classes, attributes), so a seed gives the same weights.
    Losses are summed on the device: reading one back every step would
    stall the GPU's queue."""
    gen, g_step, d_step, autocast = loop.gen, loop.g_step, loop.d_step, loop.autocast
    fmt, device, rng, batch = loop.fmt, loop.device, loop.rng, loop.batch
    images, labels, attributes, n = silo.images, silo.labels, silo.attributes, silo.size
    classes, attr_dim, latent_dim = gen.spec.num_classes, gen.spec.attr_dim, gen.spec.latent_dim
    g_total = torch.zeros((), device=device)
    d_total = torch.zeros(2, device=device)  # D's loss, and its generated-image half
    ms_total = torch.zeros((), device=device)
    d_taken = 0
    for step in range(cfg.local_steps):
        for _ in range(cfg.d_steps_per_g - 1):  # n_D > 1: D's extra steps first
            if cfg.adaptive_d and d_step.fake_accuracy >= cfg.adaptive_d:
                break  # D tells G's images apart well enough: G's turn
            d_total += _d_only_step(loop, silo)
            d_taken += 1
        index = d_step.sample(n, batch, rng).to(device)
        real = images[index].contiguous(memory_format=fmt)
        real_y = labels[index] if classes else None
        real_a = attributes[index] if attr_dim else None
        z = torch.randn(batch, latent_dim, generator=rng).to(device)
        fake_y = torch.randint(0, classes, (batch,), generator=rng).to(device) if classes else None
        fake_a = loop.sample_attributes(batch, rng).to(device) if attr_dim else None
        if cfg.mode_seeking > 0:
            # Pairs (i, i + B/2) share their condition and differ in z.
            fake_y, fake_a = paired(fake_y), paired(fake_a)
        with autocast():
            fake = gen(z, fake_y, fake_a).contiguous(memory_format=fmt)
        d_total += d_step(real, real_y, fake.detach(), fake_y, real_a)
        d_taken += 1
        d_step.hooks(False)
        g_loss, ms_loss = g_step(fake, fake_y, fake_a, z)
        d_step.hooks(True)
        g_total += g_loss.detach().float()
        ms_total += ms_loss.detach().float()
        if progress:
            progress(step + 1, cfg.local_steps)
    return g_total, d_total, ms_total, d_taken


def _d_only_step(loop: _Loop, silo: _Silo) -> torch.Tensor:
    """One of D's extra steps: a fresh real batch (private like every D step)
    against fresh fakes that G does not learn from; the draws come in the
    order of a full step's, so n_D = 1 leaves the loop as it was."""
    gen, device, rng, batch = loop.gen, loop.device, loop.rng, loop.batch
    classes, attr_dim = gen.spec.num_classes, gen.spec.attr_dim
    index = loop.d_step.sample(silo.size, batch, rng).to(device)
    real = silo.images[index].contiguous(memory_format=loop.fmt)
    real_y = silo.labels[index] if classes else None
    real_a = silo.attributes[index] if attr_dim else None
    z = torch.randn(batch, gen.spec.latent_dim, generator=rng).to(device)
    fake_y = torch.randint(0, classes, (batch,), generator=rng).to(device) if classes else None
    fake_a = loop.sample_attributes(batch, rng).to(device) if attr_dim else None
    with torch.no_grad(), loop.autocast():
        fake = gen(z, fake_y, fake_a).contiguous(memory_format=loop.fmt)
    return loop.d_step(real, real_y, fake, fake_y, real_a)


def _fake_accuracy(logits: torch.Tensor) -> float | torch.Tensor:
    """The share of generated images D calls fake: computed from generated
    images only, so reading it costs no privacy."""
    return (logits.detach() < 0).float().mean()


# Poisson batches are padded up to a multiple of this (ghost mode).
PAD_MULTIPLE = 16


def padded_rows(size: int, device: torch.device) -> torch.Tensor:
    """Indices that repeat a batch of ``size`` cyclically up to the next
    multiple of PAD_MULTIPLE. A Poisson batch has a new size almost every
    step, and every new shape costs cuDNN a new plan on the CPU, several times
    the convolution's own cost (bench/RESULTS.md). Padding leaves a handful of
    shapes. The caller weights the padding rows' losses by zero."""
    padded = -(-size // PAD_MULTIPLE) * PAD_MULTIPLE
    return torch.arange(padded, device=device) % size


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """DCGAN's Adam (β1 = 0.5). On CUDA the fused kernel, one launch per step
    instead of several per parameter: a GPU step is bound by launches
    (bench/RESULTS.md)."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), fused=fused or None)


class Proximal:
    """FedProx's term μ/2·‖w − w₀‖², w₀ the weights the round started from
    (the global model). Its gradient μ(w − w₀) uses no data, so adding it to a
    private gradient costs no privacy."""

    def __init__(self, module: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params] if mu > 0 else []

    def add_gradient(self) -> None:
        if self.mu <= 0:
            return
        with torch.no_grad():
            for p, w0 in zip(self.params, self.anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - w0, alpha=self.mu)


class GeneratorStep:
    """G's step. Its loss is D's verdict on generated images (with the
    attribute term and, optionally, mode-seeking's spread over its own
    latents): it reads no image, so it is post-processing of D's private
    release. D's per-sample hooks must be off around it."""

    def __init__(
        self,
        gen: Generator,
        disc: Discriminator,
        cfg: TrainConfig,
        autocast: Callable[[], contextlib.AbstractContextManager],
        device: torch.device,
    ) -> None:
        self.gen = gen
        self.disc = disc
        self.opt = adam(gen.parameters(), cfg.lr_g)
        self.prox = Proximal(gen, cfg.prox_mu)
        self.autocast = autocast
        self.cond_lambda = cfg.cond_lambda
        self.mode_seeking = cfg.mode_seeking
        self.attributes = bool(gen.spec.attr_dim)
        self.no_term = torch.zeros((), device=device)
        self.params = [p for p in gen.parameters() if p.requires_grad]
        self.ema_decay = cfg.g_ema
        # Started at G's weights after its first step, not at the global model
        # the round began from, which would otherwise hold most of the weight
        # of a short round's average (0.99^25 = 0.78).
        self.ema: list[torch.Tensor] = []

    def __call__(
        self,
        fake: torch.Tensor,
        fake_y: torch.Tensor | None,
        fake_a: torch.Tensor | None,
        z: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns G's adversarial loss and λ times the mode-seeking term
        apart, so that the first reads the same whether that term is on."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            if self.attributes:
                logits, predicted = self.disc(fake, fake_y, with_attributes=True)
                g_loss = generator_loss(logits) + self.cond_lambda * attribute_loss(
                    predicted, fake_a
                )
            else:
                g_loss = generator_loss(self.disc(fake, fake_y))
            ms_loss = (
                self.mode_seeking * mode_seeking_loss(fake, z)
                if self.mode_seeking > 0
                else self.no_term
            )
        (g_loss + ms_loss).backward(inputs=list(self.gen.parameters()))
        self.prox.add_gradient()
        self.opt.step()
        if self.ema_decay > 0:
            with torch.no_grad():
                if self.ema:
                    torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
                else:
                    self.ema = [p.detach().clone() for p in self.params]
        return g_loss, ms_loss

    def finish(self) -> None:
        """With EMA, G leaves the round with its averaged weights (BatchNorm
        statistics are recomputed from G's outputs by the aggregator)."""
        if self.ema:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.ema)


class PlainDiscriminatorStep:
    """Non-private D step: a batch drawn with replacement, one Adam step."""

    def __init__(
        self,
        disc: Discriminator,
        lr: float,
        prox: Proximal | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        cond_lambda: float = 1.0,
    ) -> None:
        self.disc = disc
        self.prox = prox or Proximal(disc, 0.0)
        self.autocast = autocast
        self.cond_lambda = cond_lambda
        self.opt = adam(disc.parameters(), lr)
        # D's accuracy on the last step's generated images (adaptive n_D
        # only: reading it back would stall a GPU's queue every step).
        self.track_fakes = False
        self.fake_accuracy: float | torch.Tensor = 0.0

    def sample(self, n: int, batch: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (batch,), generator=rng)

    def __call__(
        self,
        real: torch.Tensor,
        real_y: torch.Tensor | None,
        fake: torch.Tensor,
        fake_y: torch.Tensor | None,
        real_a: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step; returns [D's loss, its generated-image half]."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            fake_logits = self.disc(fake, fake_y)
            if real_a is None:
                loss = discriminator_loss(self.disc(real, real_y), fake_logits)
            else:
                logits, predicted = self.disc(real, real_y, with_attributes=True)
                loss = discriminator_loss(logits, fake_logits)
                loss = loss + self.cond_lambda * attribute_loss(predicted, real_a)
        if self.track_fakes:
            self.fake_accuracy = _fake_accuracy(fake_logits)
        loss.backward()
        self.prox.add_gradient()
        self.opt.step()
        return torch.stack([loss.detach().float(), generated_loss(fake_logits.detach()).float()])

    def hooks(self, enabled: bool) -> None:
        """No per-sample hooks to switch."""

    def close(self) -> None:
        """Nothing to release."""


class DPDiscriminatorStep:
    """Private D step: Poisson-sampled real batch, each sample's gradient
    clipped, the sum noised (Opacus), plus the non-private gradient on
    generated images (clipped as a whole to the same C), then one Adam step.
    Per-sample clipping by Opacus's GradSampleModule ("hooks", "functorch")
    or by our ClippedGradient ("ghost"); both give the same clipped sum
    (tests/unit/test_dp_train.py)."""

    def __init__(
        self,
        disc: Discriminator,
        lr: float,
        dp: DPConfig,
        expected_batch: int,
        prox: Proximal | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        cond_lambda: float = 1.0,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from fedgan.privacy.clipped_gradient import ClippedGradient
        from fedgan.privacy.one_draw_noise import OneDrawNoiseOptimizer, SecretNoiseDPOptimizer
        from fedgan.privacy.secret_random import SecretRandom

        self.disc = disc
        self.prox = prox or Proximal(disc, 0.0)
        self.autocast = autocast
        self.cond_lambda = cond_lambda
        self.dp = dp
        # Two CSPRNG streams under independent keys: which images a step
        # reads, and the noise it adds (fedgan.privacy.secret_random).
        self.sampling = SecretRandom("sampling", dp.secret_seed)
        noise = SecretRandom("noise", dp.secret_seed)
        self.params = [p for p in disc.parameters() if p.requires_grad]
        self.track_fakes = False  # adaptive n_D: keep D's accuracy on generated images
        self.fake_accuracy: float | torch.Tensor = 0.0
        self.engine: ClippedGradient | None = None
        self.module: GradSampleModule | None = None
        if dp.grad_sample_mode == "ghost":
            self.engine = ClippedGradient(disc, dp.max_grad_norm)
            # Takes p.grad as the clipped sum; adds the noise and divides.
            optimizer: type[DPOptimizer] = OneDrawNoiseOptimizer
        else:
            self.module = GradSampleModule(
                disc, loss_reduction="mean", force_functorch=dp.grad_sample_mode == "functorch"
            )
            optimizer = SecretNoiseDPOptimizer
        self.opt = optimizer(
            adam(self.params, lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected_batch,
            loss_reduction="mean",
        )
        self.opt.noise_source = noise  # type: ignore[attr-defined]

    def sample(self, n: int, batch: int, rng: torch.Generator) -> torch.Tensor:
        """Poisson sampling: each image independently with probability q, from
        the secret generator (the amplification by subsampling needs it)."""
        del batch, rng  # the batch size is random; its mean is q·N
        return self.sampling.poisson_sample(n, self.dp.sample_rate)

    def _real_losses(
        self,
        disc: torch.nn.Module,
        real: torch.Tensor,
        real_y: torch.Tensor | None,
        real_a: torch.Tensor | None,
    ) -> torch.Tensor:
        """The private loss of each real image, shape [B]. The attribute term
        reads the real images and their attributes: it is part of it."""
        if real_a is None:
            logits = disc(real, real_y)
        else:
            logits, predicted = disc(real, real_y, True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.ones_like(logits), reduction="none"
        )
        if real_a is not None:
            loss = loss + self.cond_lambda * per_sample_attribute_loss(predicted, real_a)
        return loss

    def private_real_gradient(
        self,
        real: torch.Tensor,
        real_y: torch.Tensor | None = None,
        real_a: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sets ``p.grad`` to the clipped, noised real-half gradient (divided
        by the expected batch size); returns the real-half loss."""
        self.opt.zero_grad(set_to_none=True)
        if real.shape[0] == 0:
            # An empty Poisson sample still costs a step and still gets noise.
            for p in self.params:
                if self.engine is not None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            loss_value = torch.zeros((), device=self.params[0].device)
        elif self.engine is not None:
            size = real.shape[0]
            rows = padded_rows(size, real.device)
            real, real_y, real_a = (None if t is None else t[rows] for t in (real, real_y, real_a))
            with self.autocast(), self.engine.recording():
                losses = self._real_losses(self.disc, real, real_y, real_a)
            # The padding rows' losses are multiplied by zero: their gradients,
            # norms and share of the clipped sum are exactly zero.
            losses = losses * (torch.arange(len(rows), device=losses.device) < size)
            self.engine.clip_and_sum(losses)
            loss_value = losses.detach().float().sum() / size
        else:
            assert self.module is not None
            with self.autocast():
                loss = self._real_losses(self.module, real, real_y, real_a).mean()
            loss.backward()
            loss_value = loss.detach().float()
        self.opt.pre_step()
        return loss_value

    def __call__(
        self,
        real: torch.Tensor,
        real_y: torch.Tensor | None,
        fake: torch.Tensor,
        fake_y: torch.Tensor | None,
        real_a: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One private step; returns [D's loss, its generated-image half]."""
        real_loss = self.private_real_gradient(real, real_y, real_a)
        self.hooks(False)
        fake_loss, grads = self.fake_gradient(fake, fake_y)
        used = [(p.grad, g) for p, g in zip(self.params, grads, strict=True) if g is not None]
        # One multi-tensor kernel instead of one add per parameter (launches
        # bound the private step on a GPU).
        if used:
            torch._foreach_add_([a for a, _ in used], [g for _, g in used])
        self.prox.add_gradient()
        self.opt.original_optimizer.step()
        self.hooks(True)
        return torch.stack([real_loss + fake_loss, fake_loss])

    def fake_gradient(
        self, fake: torch.Tensor, fake_y: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The fake half's loss and gradient, its gradient scaled as a whole
        to L2 norm at most C. It needs no privacy (generated images), but
        left at full size it swamps the real half, which is clipped to C per
        image: D's per-image gradients here are hundreds of times C, so D
        learned almost only to push fakes down. On digits without noise
        (σ = 0, C = 1) that gave domain-FID 40.2 and TSTR 0.28 against 20.4
        and 0.70 with this scaling, which matches training without clipping
        (bench/RESULTS.md). Clipping a data-independent term is post-processing."""
        with self.autocast():
            logits = self.disc(fake, fake_y)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.zeros_like(logits)
            )
        if self.track_fakes:
            self.fake_accuracy = _fake_accuracy(logits)
        # The attribute head plays no part in the fake half.
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        present = [g for g in grads if g is not None]
        if present:
            norm = torch.nn.utils.get_total_norm(present)
            # Opacus's per-image factor, for one "image": the whole fake batch.
            scale = (self.dp.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(present, scale)
        return loss.detach().float(), list(grads)

    def hooks(self, enabled: bool) -> None:
        """G's step must not collect per-sample gradients in D (ClippedGradient
        records only inside its own context: nothing to switch)."""
        if self.module is None:
            return
        if enabled:
            self.module.enable_hooks()
        else:
            self.module.disable_hooks()

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample buffers from D."""
        self.opt.zero_grad(set_to_none=True)
        if self.module is not None:
            self.module._close()


def resolve_device(requested: str) -> str:
    """``auto``: the site's GPU when it has one, else the CPU. An explicit
    ``cuda`` on a machine without one is an error, not a silent fallback."""
    requested = device_setting(requested)
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {requested!r} requested (FEDGAN_DEVICE or node config) but no CUDA device "
            "is visible; use auto or cpu"
        )
    return requested
