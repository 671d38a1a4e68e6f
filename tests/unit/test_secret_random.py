"""The CSPRNG streams DP's sampling and noise come from
(`fedgan.privacy.secret_random`): the right distributions, fresh keys."""

from __future__ import annotations

import math

import pytest
import torch

from fedgan.privacy.secret_random import SecretRandom


def test_uniforms_are_in_the_open_unit_interval_and_uniform():
    u = SecretRandom("t").uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) <= 1
    # Mean 1/2 and variance 1/12, each within 5 standard errors.
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert float(u.var()) == pytest.approx(1 / 12, rel=0.02)


def test_noise_is_gaussian_with_the_asked_scale():
    ref = torch.zeros(100_000, dtype=torch.float32)
    drawn = SecretRandom("t").gaussian_noise(0.3, ref)
    assert drawn.dtype == torch.float32 and drawn.shape == ref.shape  # like the reference
    x = drawn.double()
    assert float(x.std()) == pytest.approx(0.3, rel=0.02)
    assert abs(float(x.mean())) < 5 * 0.3 / math.sqrt(x.numel())
    z = x / 0.3
    assert float((z**4).mean()) == pytest.approx(3.0, rel=0.05)  # a normal's kurtosis
    assert float((z.abs() < 1).double().mean()) == pytest.approx(0.6827, abs=0.01)
    assert torch.equal(SecretRandom("t").gaussian_noise(0.0, ref), torch.zeros_like(ref))


def test_a_poisson_sample_takes_each_item_at_the_rate():
    rng = SecretRandom("t")
    sizes = [rng.poisson_sample(1000, 0.05).numel() for _ in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    picked = rng.poisson_sample(1000, 0.5)
    assert picked.unique().numel() == picked.numel() and int(picked.max()) < 1000


def test_every_stream_has_its_own_key_and_a_test_seed_repeats():
    a, b = SecretRandom("noise"), SecretRandom("noise")
    assert not torch.equal(a.uniform(64), b.uniform(64))
    seeded = [SecretRandom("noise", test_seed=7).uniform(64) for _ in range(2)]
    assert torch.equal(*seeded)
    # Two purposes under one test seed are still two streams.
    assert not torch.equal(SecretRandom("sampling", 7).uniform(64), seeded[0])
