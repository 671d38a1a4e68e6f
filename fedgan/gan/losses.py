"""The non-saturating GAN loss (Goodfellow et al. 2014), on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    return real + generated_loss(fake_logits)


def generated_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss on generated images alone: the half a site may report, since
    it touches no real image."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def attribute_loss(predicted: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """L_cond = mean(1 − cos(predicted, wanted)): 0 when the attribute head
    reads the wanted attributes off the image, up to 2 when opposite."""
    return per_sample_attribute_loss(predicted, wanted).mean()


def per_sample_attribute_loss(predicted: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """1 − cos(predicted, wanted) for each sample, shape [B] (DP clips each)."""
    return 1 - F.cosine_similarity(predicted.float(), wanted.float(), dim=1, eps=1e-6)


def paired(conditions: torch.Tensor | None) -> torch.Tensor | None:
    """The first half of a batch's conditions repeated in the second half
    (an odd batch's last row kept), so mode_seeking_loss compares two latents
    under one condition."""
    if conditions is None or conditions.shape[0] < 2:
        return conditions
    half = conditions.shape[0] // 2
    out = conditions.clone()
    out[half : 2 * half] = conditions[:half]
    return out


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN's term (Mao et al. 2019), 1 / (mean|G(z₁) − G(z₂)| / mean|z₁ − z₂|),
    over the pairs (i, i + B/2) of a batch made with `paired` conditions.

    Why: a conditional DCGAN here learned each class but ignored z within it
    (on digits, per-pixel std within a class 0.04 where the real images have
    0.26), so a classifier trained on its samples saw one prototype per
    class. Penalising images that do not move when z moves restores the
    spread. It reads only G's own outputs and latents, no patient image, so
    it costs no privacy."""
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros(())
    images = (fake[:half] - fake[half : 2 * half]).abs().float().mean()
    latents = (z[:half] - z[half : 2 * half]).abs().mean()
    return latents / (images + 1e-5 * latents)
