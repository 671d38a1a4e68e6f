"""G's mode-seeking term: pairs share a condition, the loss falls as images
move with z, and a conditional G trained with it spreads its samples within
a class where one trained without it collapses towards a prototype."""

from __future__ import annotations

import pytest
import torch

from fedgan.gan.losses import mode_seeking_loss, paired
from fedgan.gan.models import GanSpec, build
from fedgan.train import TrainConfig, train_local
from tests.unit.test_conditional import _two_classes


def test_pairs_share_the_first_halfs_conditions():
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    out = paired(labels)
    assert out[:3].tolist() == [3, 1, 4] and out[3:6].tolist() == [3, 1, 4]
    assert int(out[6]) == 2  # an odd batch's last row is kept
    assert labels.tolist() == [3, 1, 4, 1, 5, 9, 2]  # the input is not modified
    assert paired(None) is None


def test_loss_is_high_when_images_ignore_z():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    same = torch.zeros(8, 1, 2, 2)
    moving = z.view(8, 1, 2, 2)  # moves exactly as far as z does
    assert mode_seeking_loss(same, z) > 1e4
    assert mode_seeking_loss(moving, z) == pytest.approx(1.0, rel=1e-3)
    assert float(mode_seeking_loss(torch.zeros(1, 1, 2, 2), z[:1])) == 0.0


def _spread_after_training(mode_seeking: float) -> float:
    x, y = _two_classes(256, 0)
    spec = GanSpec(image_size=16, channels=1, latent_dim=16, width=16, num_classes=2)
    gen, disc = build(spec, seed=0)
    cfg = TrainConfig(
        local_steps=150, batch_size=32, lr_g=2e-3, lr_d=2e-3, mode_seeking=mode_seeking
    )
    train_local(gen, disc, x, cfg, labels=y)
    gen.eval()
    wanted = torch.zeros(200, dtype=torch.long)
    with torch.no_grad():
        samples = gen(torch.randn(200, 16, generator=torch.Generator().manual_seed(2)), wanted)
    return float(samples.std(dim=0).mean())


def test_mode_seeking_spreads_samples_within_a_class():
    without, with_term = _spread_after_training(0.0), _spread_after_training(1.0)
    assert with_term > 2 * without


def test_g_loss_is_reported_apart_from_the_mode_seeking_term():
    # Unconditional, so pairing changes nothing: both runs see the same D
    # step and the same G forward; only the term's own report may differ.
    x, _ = _two_classes(64, 0)
    spec = GanSpec(image_size=16, channels=1, latent_dim=16, width=8)
    results = []
    for weight in (0.0, 2.0):
        gen, disc = build(spec, seed=0)
        cfg = TrainConfig(local_steps=1, batch_size=16, mode_seeking=weight)
        results.append(train_local(gen, disc, x, cfg))
    off, on = results
    assert off.mode_seeking_loss == 0.0 and on.mode_seeking_loss > 0.0
    assert on.g_loss == pytest.approx(off.g_loss, rel=1e-5)


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match="mode-seeking"):
        TrainConfig(mode_seeking=-1.0)
