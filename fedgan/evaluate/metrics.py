"""The numbers of an evaluation, as functions of image tensors (N×C×H×W in
[-1, 1]) and feature matrices: no files, no models to load. Each says what
it measures in the units a reader of the report sees.

Quality: FID and KID on a domain encoder's features (torchmetrics), k-NN
precision and recall of those features (Kynkäänniemi et al. 2019), SSIM and
PSNR of each synthetic image against its nearest real one. Privacy: the ROC
AUC of membership-inference attacks, and the memorization check (synthetic
images closer to a training image than real images are to each other).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

_CHUNK = 256


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).float()


def nearest(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False):
    """(L2 distance, index) of each query's nearest reference, in pixel or
    feature space; ``exclude_self`` when queries are refs (leave-one-out)."""
    q, r = _flat(queries), _flat(refs)
    dists, idx = [], []
    for start in range(0, q.shape[0], _CHUNK):
        d = torch.cdist(q[start : start + _CHUNK], r)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        best = d.min(dim=1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists), torch.cat(idx)


def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, encoder: torch.nn.Module
) -> tuple[float, float]:
    """Fréchet and kernel (×1000) distances of the encoder's features."""
    fid = FrechetInceptionDistance(feature=encoder, reset_real_features=True)
    subset = max(2, min(real.shape[0], fake.shape[0], 100))
    with warnings.catch_warnings():
        # KID keeps every feature vector: a few MB at our sizes.
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=encoder, subsets=20, subset_size=subset)
    with torch.no_grad():
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        kid_mean, _ = kid.compute()
        return float(fid.compute()), 1000.0 * float(kid_mean)


def fid_chunked(
    real: torch.Tensor,
    fake: torch.Tensor,
    network: torch.nn.Module,
    chunk: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """FID on a large network's features (Inception at 299×299), fed in
    chunks so memory stays bounded; ``progress(done, total)`` after each."""
    fid = FrechetInceptionDistance(feature=network, reset_real_features=True)
    total, done = real.shape[0] + fake.shape[0], 0
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, images.shape[0], chunk):
                part = images[start : start + chunk]
                fid.update(part, real=is_real)
                done += part.shape[0]
                if progress is not None:
                    progress(done, total)
        return float(fid.compute())


def precision_recall(
    real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3
) -> tuple[float, float]:
    """Fidelity (synthetic inside the real manifold) and diversity (real
    inside the synthetic manifold): manifolds are k-NN balls."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(min(k + 1, x.shape[0]), dim=1).values  # k+1: itself is 0

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r.unsqueeze(0)).any(dim=1).float().mean())

    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    return (
        covered(fake_feats, real_feats, radii(real_feats)),
        covered(real_feats, fake_feats, radii(fake_feats)),
    )


def ssim_psnr_to_nearest(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """Mean SSIM and PSNR (dB) of each synthetic image against its nearest
    real image: high values mean synthetic images look like real ones (and,
    near 1 and ∞, that they are copies; see `memorization`)."""
    _, idx = nearest(fake, real)
    a, b = (fake + 1) / 2, (real[idx] + 1) / 2
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
    return float(ssim), float(psnr)


def auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """ROC AUC of an attack score that is higher for members: 0.5 is a coin
    flip, 1.0 a perfect attacker."""
    scores = torch.cat([members, non_members]).double()
    target = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).long()
    return float(binary_auroc(scores, target))


def mia_generator_auc(
    fake: torch.Tensor, members: torch.Tensor, non_members: torch.Tensor
) -> float:
    """Nearest-neighbour attack on the generator: a candidate whose nearest
    synthetic image is closer is more likely a member."""
    d_in, _ = nearest(members, fake)
    d_out, _ = nearest(non_members, fake)
    return auc(-d_in, -d_out)


def memorization(
    fake: torch.Tensor, train: torch.Tensor, reference: torch.Tensor | None = None
) -> tuple[float, float, torch.Tensor]:
    """(fraction of synthetic images closer to a training image than the
    threshold, the threshold, every synthetic image's nearest distance).
    The threshold is the 5th percentile of real-to-real nearest distances:
    held-out images to the training set when there are any, else training
    images to each other."""
    d_fake, _ = nearest(fake, train)
    if reference is not None and reference.shape[0] > 0:
        d_real, _ = nearest(reference, train)
    else:
        d_real, _ = nearest(train, train, exclude_self=True)
    threshold = float(torch.quantile(d_real.double(), 0.05))
    return float((d_fake < threshold).double().mean()), threshold, d_fake
