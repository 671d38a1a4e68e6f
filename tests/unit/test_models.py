"""G and D: shapes per image size, Opacus-readiness, seeded builds, and one-line spec errors."""

import pytest
import torch
from torch import nn

from fedgan.gan.models import SUPPORTED_SIZES, GanSpec, build
from fedgan.train import TrainConfig, train_local
from fedgan.weights import get_arrays, set_arrays


@pytest.mark.parametrize("size", SUPPORTED_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size, channels):
    spec = GanSpec(image_size=size, channels=channels, latent_dim=16, width=8)
    gen, disc = build(spec, seed=0)
    z = torch.randn(3, 16)
    images = gen(z)
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert disc(images).shape == (3,)


def test_discriminator_is_opacus_ready():
    _, disc = build(GanSpec(image_size=64))
    for module in disc.modules():
        assert not isinstance(module, nn.BatchNorm2d)
        assert not getattr(module, "inplace", False), module


def test_seeded_build_is_reproducible():
    spec = GanSpec(image_size=16, width=8)
    a, _ = build(spec, seed=3)
    b, _ = build(spec, seed=3)
    c, _ = build(spec, seed=4)
    for x, y in zip(get_arrays(a), get_arrays(b), strict=True):
        assert (x == y).all()
    assert any((x != z).any() for x, z in zip(get_arrays(a), get_arrays(c), strict=True))


def test_unsupported_spec_names_the_key():
    with pytest.raises(ValueError, match="image-size"):
        GanSpec(image_size=48)


def test_arrays_round_trip_and_shape_mismatch():
    gen, _ = build(GanSpec(image_size=16, width=8), seed=0)
    other, _ = build(GanSpec(image_size=16, width=8), seed=1)
    set_arrays(other, get_arrays(gen))
    for x, y in zip(get_arrays(gen), get_arrays(other), strict=True):
        assert (x == y).all()
    wrong, _ = build(GanSpec(image_size=32, width=8), seed=0)
    with pytest.raises(ValueError, match="image-size"):
        set_arrays(wrong, get_arrays(gen))


def test_local_training_moves_both_networks():
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)
    gen, disc = build(spec, seed=0)
    g0, d0 = get_arrays(gen), get_arrays(disc)
    images = torch.rand(20, 1, 16, 16) * 2 - 1
    result = train_local(gen, disc, images, TrainConfig(local_steps=3, batch_size=8))
    assert result.steps == 3 and result.examples == 20
    assert torch.isfinite(torch.tensor([result.g_loss, result.d_loss])).all()
    assert 0 < result.d_loss_generated < result.d_loss  # the real half stays out
    assert any((a != b).any() for a, b in zip(g0, get_arrays(gen), strict=True))
    assert any((a != b).any() for a, b in zip(d0, get_arrays(disc), strict=True))
    with pytest.raises(ValueError, match="non-empty"):
        train_local(gen, disc, torch.zeros(0, 1, 16, 16), TrainConfig())


def test_server_recomputes_generator_batchnorm_statistics():
    """Running statistics damaged (as per-value clipping in secure
    aggregation once did) are rebuilt from G's own outputs: eval-mode
    samples are then as varied as train-mode ones."""
    from fedgan.gan.models import recalibrate_batchnorm

    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)
    gen, _ = build(spec, seed=0)
    norms = [m for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.running_var.fill_(50.0)  # far from the true activation variance
    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    gen.eval()
    with torch.no_grad():
        damaged = gen(z).std().item()
        gen.train()
        wanted = gen(z).std().item()
    gen.eval()
    recalibrate_batchnorm(gen, lambda n, g: (torch.randn(n, 8, generator=g),))
    # It leaves G in the mode it found it in.
    with torch.no_grad():
        repaired = gen(z).std().item()
    assert damaged < 0.5 * wanted
    assert abs(repaired - wanted) < 0.1 * wanted
    assert all(m.momentum == 0.1 for m in norms) and not gen.training
