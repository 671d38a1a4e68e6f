"""The non-saturating GAN loss (Goodfellow et al. 2014), on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def attribute_loss(predicted: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """L_cond = mean(1 − cos(predicted, wanted)): 0 when the attribute head
    reads the wanted attributes off the image, up to 2 when opposite."""
    return per_sample_attribute_loss(predicted, wanted).mean()


def per_sample_attribute_loss(predicted: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """1 − cos(predicted, wanted) for each sample, shape [B] (DP clips each)."""
    return 1 - F.cosine_similarity(predicted.float(), wanted.float(), dim=1, eps=1e-6)
