"""The one-draw noise step: the CSPRNG's secure-mode draw on the flattened
clipped sums (the same draw, position by position, as the noise source gives
for the flat vector), then divided by the batch; and the same refusal as
Opacus's to noise a clipped sum twice."""

from __future__ import annotations

import pytest
import torch

from fedgan.privacy.one_draw_noise import OneDrawNoiseOptimizer
from fedgan.privacy.secret_random import SecretRandom


def _optimizer(params, seed, sigma=1.5, clip=0.5, batch=4):
    opt = OneDrawNoiseOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        loss_reduction="mean",
    )
    opt.noise_source = SecretRandom("noise", seed)
    return opt


def test_noise_is_the_secure_draw_on_the_flat_sum_then_divided_by_the_batch():
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]
    sums = [torch.randn(3, 2), torch.randn(5)]
    opt = _optimizer(params, seed=7)
    for p, s in zip(params, sums, strict=True):
        p.grad = s.clone()
    assert opt.pre_step()
    flat = torch.cat([s.reshape(-1) for s in sums])
    noise = SecretRandom("noise", 7).gaussian_noise(1.5 * 0.5, flat)
    expected = ((flat + noise) / 4).split([6, 5])
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e.view_as(p), rtol=0, atol=0)
    assert float(noise.abs().max()) > 0  # noise was really added


def test_noise_has_the_calibrated_scale_across_parameters():
    params = [torch.nn.Parameter(torch.zeros(20_000)), torch.nn.Parameter(torch.zeros(100, 50))]
    opt = _optimizer(params, seed=1, sigma=2.0, clip=0.1, batch=1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.pre_step()
    for p in params:  # each parameter's share has std σC, not just the whole
        assert float(p.grad.std()) == pytest.approx(2.0 * 0.1, rel=0.05)


def test_a_clipped_sum_is_never_noised_twice():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = _optimizer([param], seed=3)
    param.grad = torch.ones(4)
    opt.pre_step()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.add_noise()
