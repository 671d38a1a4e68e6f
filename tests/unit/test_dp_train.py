"""The private discriminator step against a per-sample reference computed by
hand, and against the plain step when privacy is switched off."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedgan.gan.models import GanSpec, build
from fedgan.train import (
    GRAD_SAMPLE_MODES,
    PAD_MULTIPLE,
    DPConfig,
    DPDiscriminatorStep,
    PlainDiscriminatorStep,
    TrainConfig,
    padded_rows,
    train_local,
)
from fedgan.update import SiteUpdate, clip_update, update_norm
from tests.per_sample import clipped_sum

SPEC = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def _per_sample_clipped_mean(disc, real, clip):
    """Σ clip(∇ℓ_i) / N and the clipped norms, one sample at a time, no Opacus."""

    def loss_of(i):
        logit = disc(real[i : i + 1])
        return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))

    total, norms = clipped_sum(disc, loss_of, real.shape[0], clip)
    clipped = [float(n) * min(1.0, clip / (float(n) + 1e-6)) for n in norms]
    return [t / real.shape[0] for t in total], clipped


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_real_half_is_per_sample_clipped_mean(mode):
    _, disc = build(SPEC, seed=1)
    reference_disc = copy.deepcopy(disc)
    real = _data()
    clip = 0.05
    dp = DPConfig(0.0, clip, 1.0, grad_sample_mode=mode)
    step = DPDiscriminatorStep(disc, 1e-3, dp, expected_batch=real.shape[0])
    step.private_real_gradient(real)
    expected, clipped_norms = _per_sample_clipped_mean(reference_disc, real, clip)
    assert max(clipped_norms) <= clip + 1e-6
    assert sum(n >= clip - 1e-6 for n in clipped_norms) >= 2  # clipping really happened
    for p, e in zip(step.params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)
    step.close()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_without_noise_and_clipping_dp_step_equals_plain_step(mode):
    _, disc = build(SPEC, seed=2)
    twin = copy.deepcopy(disc)
    real, fake = _data(10, 1), _data(10, 2)
    config = DPConfig(0.0, 1e6, 1.0, grad_sample_mode=mode)
    dp = DPDiscriminatorStep(disc, 1e-3, config, expected_batch=10)
    plain = PlainDiscriminatorStep(twin, 1e-3)
    dp(real, None, fake, None)
    plain(real, None, fake, None)
    dp.close()
    for a, b in zip(disc.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [0.01, 1e6])
def test_fake_half_is_scaled_as_a_whole_to_the_clip_norm(clip):
    _, disc = build(SPEC, seed=4)
    reference = copy.deepcopy(disc)
    fake = _data(10, 5)
    step = DPDiscriminatorStep(disc, 1e-3, DPConfig(0.0, clip, 1.0), expected_batch=10)
    loss, grads = step.fake_gradient(fake, None)
    logit = reference(fake)
    expected_loss = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
    expected = torch.autograd.grad(expected_loss, list(reference.parameters()))
    raw = float(torch.sqrt(sum((g**2).sum() for g in expected)))
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-5)
    scale = min(1.0, clip / (raw + 1e-6))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e * scale, rtol=1e-4, atol=1e-8)
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    # A small C really clips (the raw norm is far above it); a large one leaves it.
    assert norm == pytest.approx(min(raw, clip), rel=1e-4)
    assert raw > 10 * 0.01
    step.close()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_noise_has_the_calibrated_scale(mode):
    _, disc = build(SPEC, seed=3)
    real = _data(8)
    clean = DPDiscriminatorStep(copy.deepcopy(disc), 1e-3, DPConfig(0.0, 0.1, 1.0, 5, mode), 8)
    noisy = DPDiscriminatorStep(disc, 1e-3, DPConfig(2.0, 0.1, 1.0, 5, mode), 8)
    clean.private_real_gradient(real)
    noisy.private_real_gradient(real)
    diff = torch.cat(
        [(a.grad - b.grad).flatten() for a, b in zip(noisy.params, clean.params, strict=True)]
    )
    # p.grad = (Σ clipped + N(0, σ²C²)) / B  =>  std of the difference is σC/B.
    assert diff.numel() > 2000  # the sample std is then within 5 % with room to spare
    assert float(diff.std()) == pytest.approx(2.0 * 0.1 / 8, rel=0.05)
    assert abs(float(diff.mean())) < 4 * 2.0 * 0.1 / 8 / diff.numel() ** 0.5
    clean.close()
    noisy.close()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_noise_and_sampling_come_from_the_os_csprng(mode):
    """Issue 33: one 63-bit seed keyed a Mersenne Twister for both the
    Poisson sample and the noise. Now each is its own AES-256-CTR stream
    under a key from os.urandom: two steps built alike draw different
    samples and different noise, and no torch generator is involved."""
    from fedgan.privacy.secret_random import SecretRandom

    _, disc = build(SPEC, seed=3)
    steps = [
        DPDiscriminatorStep(copy.deepcopy(disc), 1e-3, DPConfig(2.0, 0.1, 0.5, None, mode), 8)
        for _ in range(2)
    ]
    assert all(isinstance(s.sampling, SecretRandom) for s in steps)
    assert all(isinstance(s.opt.noise_source, SecretRandom) for s in steps)
    assert all(s.opt.generator is None for s in steps)
    samples = [s.sample(400, 8, torch.Generator()) for s in steps]
    assert not torch.equal(*samples)
    real = _data(8)
    grads = []
    for s in steps:
        s.private_real_gradient(real)
        grads.append(torch.cat([p.grad.flatten() for p in s.params]))
        s.close()
    assert not torch.equal(*grads)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_runs_and_leaves_no_hooks(mode):
    gen, disc = build(SPEC, seed=0)
    before = [p.detach().clone() for p in disc.parameters()]
    dp = DPConfig(1.0, 1.0, 0.25, grad_sample_mode=mode)
    result = train_local(gen, disc, _data(16), TrainConfig(local_steps=3, batch_size=4), dp=dp)
    assert result.steps == 3 and np.isfinite(result.d_loss)
    # What a site reports is D's loss on generated images: the real half (on
    # patients' images, not noised) is strictly positive and left out.
    assert 0 < result.d_loss_generated < result.d_loss
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in disc.parameters()
    )
    assert not disc._forward_hooks and not any(m._forward_hooks for m in disc.modules())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_sample_still_steps_with_noise(mode):
    gen, disc = build(SPEC, seed=0)
    before = [p.detach().clone() for p in disc.parameters()]
    train_local(
        gen,
        disc,
        _data(2),
        TrainConfig(local_steps=2, batch_size=1),
        dp=DPConfig(1.0, 1.0, 1e-9, secret_seed=1, grad_sample_mode=mode),
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def test_update_clip_bounds_the_norm():
    rng = np.random.default_rng(0)
    upd = SiteUpdate(
        [rng.standard_normal((20, 5)).astype(np.float32)],
        [rng.standard_normal(30).astype(np.float32)],
        3,
    )
    clipped, was, norm = clip_update(upd, 1.5)
    assert was and norm > 1.5
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    same, was, _ = clip_update(upd, 1e9)
    assert not was and same is upd
    assert clip_update(upd, 0)[0] is upd  # 0 disables


def test_channels_last_and_cpu_bf16_request_change_nothing():
    """bf16 is ignored off CUDA: same seeds, bit-identical weights. channels_last
    is a memory layout only: convolutions sum in another order, so D's first
    loss agrees to float tolerance."""

    def trained(steps=3, **options):
        gen, disc = build(SPEC, seed=0)
        cfg = TrainConfig(local_steps=steps, batch_size=4, **options)
        result = train_local(gen, disc, _data(16), cfg, dp=DPConfig(1.0, 1.0, 0.5, secret_seed=3))
        return result, [p.detach().clone() for p in [*gen.parameters(), *disc.parameters()]]

    reference, weights = trained()
    bf16, bf16_weights = trained(precision="bf16")
    assert all(torch.equal(a, b) for a, b in zip(weights, bf16_weights, strict=True))
    assert (bf16.g_loss, bf16.d_loss) == (reference.g_loss, reference.d_loss)
    reference, _ = trained(steps=1)
    nhwc, _ = trained(steps=1, channels_last=True)
    assert nhwc.d_loss == pytest.approx(reference.d_loss, rel=1e-5)
    # G's loss comes after D's first Adam step, which moves every weight by
    # ±lr whatever its gradient's size: near-zero gradients can flip.
    assert nhwc.g_loss == pytest.approx(reference.g_loss, rel=1e-2)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_poisson_batches_are_padded_to_a_few_shapes_with_every_image_kept():
    for size in (1, 9, PAD_MULTIPLE, PAD_MULTIPLE + 1, 250):
        rows = padded_rows(size, torch.device("cpu"))
        assert len(rows) % PAD_MULTIPLE == 0 and len(rows) - size < PAD_MULTIPLE
        assert torch.equal(rows[:size], torch.arange(size))  # the batch itself, in order
        assert int(rows.max()) < size  # padding repeats its own rows


def test_several_d_steps_per_g_step_each_read_a_fresh_private_batch(monkeypatch):
    """n_D = 3: three private D steps (each sampling its own batch) before each
    of G's steps, so a round takes local_steps × 3 of them."""
    import fedgan.train as train

    calls: list[int] = []
    original = train.DPDiscriminatorStep.__call__

    def counted(self, real, *args):
        calls.append(real.shape[0])
        return original(self, real, *args)

    monkeypatch.setattr(train.DPDiscriminatorStep, "__call__", counted)
    dp = DPConfig(1.0, 1.0, 0.5, secret_seed=1)
    gen, disc = build(SPEC, seed=0)
    cfg = TrainConfig(local_steps=2, batch_size=4, d_steps_per_g=3)
    result = train_local(gen, disc, _data(16), cfg, dp=dp)
    assert len(calls) == 6 and result.steps == 2 and cfg.d_steps == 6
    with pytest.raises(ValueError, match="d-steps-per-g"):
        TrainConfig(d_steps_per_g=0)


@pytest.mark.parametrize("private", [False, True])
def test_adaptive_n_d_stops_when_d_tells_fakes_apart_and_never_exceeds_n_d(private, monkeypatch):
    """adaptive-d: n_D is a ceiling. While D calls every generated image fake,
    G steps after one D step (after the first, when D has not yet been
    asked); while it calls none fake, every G step waits for n_D D steps.
    The accountant's count, local_steps × n_D, bounds what was taken."""
    import fedgan.train as train

    dp = DPConfig(1.0, 1.0, 0.5, secret_seed=1) if private else None
    taken = {}
    for accuracy in (1.0, 0.0):
        monkeypatch.setattr(train, "_fake_accuracy", lambda logits, a=accuracy: a)
        gen, disc = build(SPEC, seed=0)
        cfg = TrainConfig(local_steps=4, batch_size=4, d_steps_per_g=3, adaptive_d=0.6)
        taken[accuracy] = train_local(gen, disc, _data(16), cfg, dp=dp).d_steps
    assert taken == {1.0: 5, 0.0: 12} and cfg.d_steps == 12
    with pytest.raises(ValueError, match="adaptive-d"):
        TrainConfig(adaptive_d=1.0)


def test_ema_of_g_changes_only_what_g_sends():
    """g-ema: D trains exactly as without it (G's training is the same); G
    leaves with the average of its weights, closer to where it started."""
    from fedgan.weights import get_arrays

    runs = {}
    for decay in (0.0, 0.9):
        gen, disc = build(SPEC, seed=0)
        start = [p.detach().clone() for p in gen.parameters()]
        cfg = TrainConfig(local_steps=6, batch_size=4, g_ema=decay, seed=3)
        train_local(gen, disc, _data(16), cfg)
        moved = sum(
            float((p.detach() - s).norm()) for p, s in zip(gen.parameters(), start, strict=True)
        )
        runs[decay] = (get_arrays(disc), moved)
    for a, b in zip(runs[0.0][0], runs[0.9][0], strict=True):
        assert np.array_equal(a, b)
    assert 0 < runs[0.9][1] < runs[0.0][1]
    with pytest.raises(ValueError, match="g-ema"):
        TrainConfig(g_ema=1.0)
