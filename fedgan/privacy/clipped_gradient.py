"""The sum of per-sample-clipped gradients, Σ_i min(1, C/‖∇ℓ_i‖)·∇ℓ_i, without
materialising every per-sample gradient.

Why not Opacus's hooks: its DP step is bound by per-layer, per-parameter
bookkeeping on the CPU, and the conv layers' per-sample gradients
(B × out × in·k² floats each) are gigabytes per step at our sizes (the
figures are in bench/RESULTS.md). Here one forward and one data-only backward record
each layer's input a and output gradient b; then per layer:

* the per-sample squared norm, for a convolution by whichever is cheaper of
  the ghost identity ‖Σ_l b_l a_lᵀ‖² = Σ_{l,l'} (b_l·b_l')(a_l·a_l') (two L×L
  Gram matrices; "mixed ghost clipping", Bu et al. 2022) or the materialised
  per-sample gradient;
* once every layer's norm is known, the clipped sum directly, as the plain
  weight gradient with b reweighted by each sample's clip factor
  ("book-keeping", Bu et al. 2023): no second backward pass.

The result is exact, not an approximation: tests compare it with Opacus's
per-sample gradients and with one-sample-at-a-time autograd. Noise and
accounting stay Opacus's (`DPOptimizerFastGradientClipping`, the PRV/RDP
accountants).

Supported layers are those the discriminator is built from: Conv2d
(groups = 1, zero padding), GroupNorm, Linear and Embedding (one index per
sample). Anything else with parameters is refused when the engine is built,
so a model change can never silently drop a layer from the norm, and so is
BatchNorm in any form: the per-sample decomposition assumes no layer mixes
the images of a batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Layers that normalise across the batch: refused even without parameters.
_MIXES_SAMPLES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Applies the clip factors [B] to a layer: sets its parameters' .grad.
_Apply = Callable[[torch.Tensor], None]


@dataclass
class _Record:
    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor


class ClippedGradient:
    """Per-sample clipping of one module's gradient, the clipped sum in
    ``p.grad``. Use as::

        engine = ClippedGradient(disc, max_grad_norm=1.0)
        with engine.recording():
            per_sample_loss = loss_fn(disc(x))      # shape [B]
        norms = engine.clip_and_sum(per_sample_loss)
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        if max_grad_norm <= 0:
            raise ValueError("max-grad-norm must be > 0")
        self.max_grad_norm = max_grad_norm
        self.layers: list[nn.Module] = []
        self.params: list[nn.Parameter] = []
        for name, m in module.named_modules():
            if isinstance(m, _MIXES_SAMPLES):
                # Even without parameters it mixes the images of a batch, so
                # one image's loss would reach the others' gradients.
                raise ValueError(f"layer {name} ({type(m).__name__}) mixes samples; use GroupNorm")
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                _check_supported(name or type(m).__name__, m)
                self.layers.append(m)
                self.params += own
        self._records: list[_Record] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record every supported layer's input and output during the
        forward passes inside; hooks are gone on exit, so other forwards (the
        generated half, G's step) run untouched."""
        self._records = []
        seen: set[int] = set()

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if id(module) in seen:
                raise RuntimeError(
                    f"{type(module).__name__} ran twice in one private forward; per-sample "
                    "clipping here supports each layer once"
                )
            seen.add(id(module))
            self._records.append(_Record(module, args[0].detach(), output))

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def clip_and_sum(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Sets each parameter's ``.grad`` to Σ_i c_i ∇ℓ_i with
        c_i = min(1, C/(‖∇ℓ_i‖ + 1e-6)) (Opacus's factor); returns the
        unclipped per-sample norms ‖∇ℓ_i‖."""
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("nothing was recorded: run the forward inside recording()")
        if per_sample_loss.ndim != 1:
            raise ValueError(
                f"expected one loss per sample, got shape {tuple(per_sample_loss.shape)}"
            )
        batch = per_sample_loss.shape[0]
        outputs = [r.output for r in records]
        grads = torch.autograd.grad(per_sample_loss.sum(), outputs, allow_unused=True)
        squared = torch.zeros(batch, device=per_sample_loss.device, dtype=torch.float32)
        apply: list[_Apply] = []
        for record, grad in zip(records, grads, strict=True):
            if grad is None:
                continue  # the layer ran but does not reach this loss
            sq, fn = _LAYERS[type(record.module)](record.module, record.inputs, grad.float())
            squared += sq
            apply.append(fn)
        norms = squared.sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = None
        for fn in apply:
            fn(factor)
        for p in self.params:
            if p.grad is None:  # its layer did not reach this loss
                p.grad = torch.zeros_like(p)
        return norms


def _check_supported(name: str, m: nn.Module) -> None:
    if type(m) not in _LAYERS:
        raise ValueError(
            f"layer {name} ({type(m).__name__}) has parameters but no per-sample rule; "
            "use grad-sample mode hooks for this model"
        )
    if isinstance(m, nn.Conv2d) and (
        m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
    ):
        raise ValueError(f"layer {name}: only groups=1, zero-padded, integer-padding Conv2d")
    if isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.max_norm or m.sparse):
        raise ValueError(f"layer {name}: only plain Embedding (no padding_idx, max_norm, sparse)")


def _set(param: torch.Tensor | None, value: torch.Tensor) -> None:
    if param is not None and param.requires_grad:
        param.grad = value.to(param.dtype).view_as(param)


def unfold(a: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """``F.unfold``'s [B, C·kh·kw, L] for the layer's input, as one strided
    copy. CUDA's im2col launches one kernel per image, which dominated the DP
    step's GPU time at 64 px (bench/RESULTS.md). Dilated kernels keep F.unfold."""
    if m.dilation != (1, 1):
        return F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    patches = a.unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, oh, ow, kh, kw], a view
    batch, channels, oh, ow = patches.shape[:4]
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kh * kw, oh * ow)


def _conv2d(m: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, _Apply]:
    unfolded = unfold(a.float(), m)  # [B, d, L]
    out = b.flatten(2)  # [B, p, L]
    d, positions, p = unfolded.shape[1], unfolded.shape[2], out.shape[1]
    per_sample = None
    if positions * (d + p) < d * p:
        # Ghost: two [B, L, L] Gram matrices instead of [B, p, d] gradients.
        gram_a = torch.bmm(unfolded.transpose(1, 2), unfolded)
        gram_b = torch.bmm(out.transpose(1, 2), out)
        sq = (gram_a * gram_b).sum(dim=(1, 2))
    else:
        per_sample = torch.bmm(out, unfolded.transpose(1, 2))  # [B, p, d]
        sq = per_sample.pow(2).sum(dim=(1, 2))
    bias = out.sum(dim=2) if m.bias is not None else None
    if bias is not None:
        sq = sq + bias.pow(2).sum(dim=1)

    def apply(c: torch.Tensor) -> None:
        if per_sample is not None:
            weight = torch.einsum("b,bpd->pd", c, per_sample)
        else:
            weight = torch.einsum("bpl,bdl->pd", out * c[:, None, None], unfolded)
        _set(m.weight, weight)
        if bias is not None:
            _set(m.bias, c @ bias)

    return sq, apply


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, _Apply]:
    normalised = F.group_norm(a.float(), m.num_groups, eps=m.eps)
    weight = (normalised * b).flatten(2).sum(dim=2)  # [B, C]
    bias = b.flatten(2).sum(dim=2)
    sq = weight.pow(2).sum(dim=1) + bias.pow(2).sum(dim=1)

    def apply(c: torch.Tensor) -> None:
        _set(m.weight, c @ weight)
        _set(m.bias, c @ bias)

    return sq, apply


def _linear(m: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, _Apply]:
    batch = a.shape[0]
    a = a.float().reshape(batch, -1, m.in_features)  # [B, T, in]
    b = b.reshape(batch, -1, m.out_features)  # [B, T, out]
    per_sample = torch.einsum("bto,bti->boi", b, a)
    bias = b.sum(dim=1) if m.bias is not None else None
    sq = per_sample.pow(2).sum(dim=(1, 2))
    if bias is not None:
        sq = sq + bias.pow(2).sum(dim=1)

    def apply(c: torch.Tensor) -> None:
        _set(m.weight, torch.einsum("b,boi->oi", c, per_sample))
        if bias is not None:
            _set(m.bias, c @ bias)

    return sq, apply


def _embedding(m: nn.Embedding, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, _Apply]:
    if a.ndim != 1:
        raise ValueError("per-sample clipping of an Embedding needs one index per sample")
    # Each sample's gradient is one row, b_i, at its own index.
    sq = b.pow(2).sum(dim=1)

    def apply(c: torch.Tensor) -> None:
        grad = torch.zeros(m.weight.shape, device=b.device, dtype=torch.float32)
        grad.index_add_(0, a, b * c[:, None])
        _set(m.weight, grad)

    return sq, apply


_LAYERS: dict[type, Callable[..., tuple[torch.Tensor, _Apply]]] = {
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.Linear: _linear,
    nn.Embedding: _embedding,
}
