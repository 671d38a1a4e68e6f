"""ClippedGradient against one-sample-at-a-time autograd (the definition of
per-sample clipping) and against Opacus's per-sample gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedgan.gan.models import GanSpec, build
from fedgan.privacy.clipped_gradient import ClippedGradient, unfold
from fedgan.train import DPConfig, DPDiscriminatorStep
from tests.per_sample import clipped_sum


class _Mixed(nn.Module):
    """Every supported layer kind, and both ways of a convolution's norm:
    conv_a (8×8 positions, 27 inputs, 4 outputs) materialises per-sample
    gradients; conv_b (2×2 positions, 36 inputs, 32 outputs) takes the ghost
    identity. The Linear sees a sequence (3 tokens per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv_b = nn.Conv2d(4, 32, 3, stride=2, dilation=2, bias=False)
        self.embed = nn.Embedding(5, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.conv_b(F.leaky_relu(self.norm(self.conv_a(x)), 0.2))  # [B, 32, 2, 2]
        tokens = h.flatten(2)[:, :, :3].transpose(1, 2)  # [B, 3, 32]
        return self.head(tokens).sum(dim=(1, 2)) + (self.embed(y) * h.sum(dim=(2, 3))).sum(1)


def test_every_layer_kind_matches_per_sample_autograd():
    torch.manual_seed(0)
    model = _Mixed()
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 4, 4, 2, 0, 3])
    clip = 0.5

    def loss_of(i=None):
        if i is None:
            return model(x, y) ** 2
        return model(x[i : i + 1], y[i : i + 1]) ** 2

    expected, expected_norms = clipped_sum(model, loss_of, 7, clip)
    engine = ClippedGradient(model, clip)
    with engine.recording():
        losses = loss_of()
    norms = engine.clip_and_sum(losses)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-6)
    assert int((norms > clip).sum()) >= 2  # clipping really happened
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("classes, attributes", [(0, 0), (3, 0), (3, 2)])
def test_ghost_equals_opacus_on_the_discriminator(classes, attributes):
    """32 px, width 16: D's third convolution takes the ghost identity, the
    others materialise; conditional and attribute heads included."""
    spec = GanSpec(image_size=32, channels=3, width=16, num_classes=classes, attr_dim=attributes)
    _, disc = build(spec, seed=4)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(9, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.randint(0, classes, (9,), generator=g) if classes else None
    attrs = torch.randn(9, attributes, generator=g) if attributes else None
    grads = {}
    for mode in ("hooks", "ghost"):
        step = DPDiscriminatorStep(
            copy.deepcopy(disc), 1e-3, DPConfig(0.0, 0.02, 1.0, grad_sample_mode=mode), 9
        )
        step.private_real_gradient(real, labels, attrs)
        grads[mode] = [p.grad.clone() for p in step.params]
        step.close()
    for a, b in zip(grads["hooks"], grads["ghost"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    norm = torch.sqrt(sum((t**2).sum() for t in grads["ghost"]))
    assert 0 < float(norm) * 9 <= 0.02 * 9 + 1e-5  # a sum of 9 vectors of norm ≤ C


def test_unsupported_layers_are_refused_when_built():
    with pytest.raises(ValueError, match=r"layer 1 \(InstanceNorm2d\).*hooks"):
        ClippedGradient(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True)), 1.0)
    with pytest.raises(ValueError, match="groups=1"):
        ClippedGradient(nn.Conv2d(2, 2, 3, groups=2), 1.0)
    # No parameters, still refused: it mixes the images of a batch.
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\) mixes samples"):
        ClippedGradient(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False)), 1.0)


def test_a_forward_outside_recording_is_refused():
    layer = nn.Linear(3, 1)
    engine = ClippedGradient(layer, 1.0)
    with pytest.raises(RuntimeError, match="inside recording"):
        engine.clip_and_sum(layer(torch.randn(2, 3)).view(-1))


def test_a_layer_run_twice_is_refused():
    layer = nn.Linear(3, 3)
    engine = ClippedGradient(layer, 1.0)
    with pytest.raises(RuntimeError, match="ran twice"), engine.recording():
        layer(layer(torch.randn(2, 3)))
    assert not layer._forward_hooks  # the hooks are gone even so


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        (4, 2, 1, 1),
        (3, 1, 1, 1),
        (4, 1, 0, 1),
        (3, 2, 0, 1),
        ((3, 2), (2, 1), (1, 0), 1),
        (3, 2, 1, 2),
    ],
)
def test_strided_unfold_equals_torch_unfold(kernel, stride, padding, dilation):
    """Our one-copy unfold (the ghost norms' input) against F.unfold, odd sizes
    and rectangular kernels included; dilated kernels fall back to F.unfold."""
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    a = torch.randn(4, 3, 11, 9)
    expected = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    got = unfold(a, conv)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
