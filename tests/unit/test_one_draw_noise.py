"""The one-draw noise step against Opacus's own noise function: the same
secure-mode draw, on the flattened clipped sums, and the same refusal to noise
a clipped sum twice."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

from fedgan.privacy.one_draw_noise import OneDrawNoiseOptimizer


def _optimizer(params, seed, sigma=1.5, clip=0.5, batch=4):
    return OneDrawNoiseOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
        secure_mode=True,
    )


def test_noise_is_opacus_secure_noise_on_the_flat_sum_then_divided_by_the_batch():
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]
    sums = [torch.randn(3, 2), torch.randn(5)]
    opt = _optimizer(params, seed=7)
    for p, s in zip(params, sums, strict=True):
        p.grad = s.clone()
    assert opt.pre_step()
    flat = torch.cat([s.reshape(-1) for s in sums])
    noise = _generate_noise(
        std=1.5 * 0.5,
        reference=flat,
        generator=torch.Generator().manual_seed(7),
        secure_mode=True,
    )
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
