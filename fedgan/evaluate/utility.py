"""Utility of synthetic images: train on synthetic, test on real.

TSTR: a small CNN classifier is trained on conditional synthetic images (the
class each was asked for) and another on the site's real training images,
three of each from different seeds, and all are tested on the real images
the site held out. TSTR accuracy close
to train-on-real accuracy means the synthetic data carries the classes' signal.

Anomaly detection: an autoencoder trained on synthetic *normal* images only;
its reconstruction error scores held-out real images, and the ROC AUC of
normal against abnormal says whether synthetic normals teach what normal
looks like (the seeds' reference: AUC ≥ 0.85).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn
from torch.nn import functional as F

from fedgan.evaluate.encoder import DomainEncoder


def _classifier(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, 1, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, 1, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, classes: int, *, steps: int = 300, seed: int = 0
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _classifier(images.shape[1], classes)
    x_all = DomainEncoder.prepare(images)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (min(64, x_all.shape[0]),), generator=gen)
        loss = F.cross_entropy(model(x_all[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model(DomainEncoder.prepare(images)).argmax(dim=1)
    return float((pred == labels).float().mean())


def tstr(
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
    *,
    seed: int = 0,
    seeds: int = 3,
    steps: int = 300,
    at_mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``at_mix``: synthetic images and labels drawn at the real images' class
    mix. The even draw in ``fake`` is the headline figure; the classifier on
    real images learns the real mix, though, and on an imbalanced test set
    that alone favours it, so the matched draw says how much of the gap is
    the mix rather than the images.

    Every accuracy is the mean over ``seeds`` classifiers (seeds ``seed``,
    ``seed`` + 1, ...), with its standard deviation beside it: on a few hundred
    held-out images one classifier's initialisation moved TSTR by up to
    ±0.09 (bench/RESULTS.md), more than most differences between generators."""
    if seeds < 1:
        raise ValueError("seeds must be >= 1")

    def mean_sd(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        accs = [
            accuracy(
                train_classifier(images, labels, classes, steps=steps, seed=s), test, test_labels
            )
            for s in range(seed, seed + seeds)
        ]
        return statistics.fmean(accs), statistics.stdev(accs) if seeds > 1 else 0.0

    on_synthetic, synthetic_sd = mean_sd(fake, fake_labels)
    on_real, real_sd = mean_sd(real, real_labels)
    out = {
        "tstr_accuracy": on_synthetic,
        "tstr_accuracy_sd": synthetic_sd,
        "trtr_accuracy": on_real,
        "trtr_accuracy_sd": real_sd,
        "tstr_ratio": on_synthetic / on_real if on_real > 0 else 0.0,
        "classifier_seeds": seeds,
    }
    if at_mix is not None:
        matched, matched_sd = mean_sd(*at_mix)
        out["tstr_mix_accuracy"] = matched
        out["tstr_mix_accuracy_sd"] = matched_sd
        out["tstr_mix_ratio"] = matched / on_real if on_real > 0 else 0.0
    return out


def anomaly_auc(
    fake_normal: torch.Tensor,
    test: torch.Tensor,
    test_abnormal: torch.Tensor,
    *,
    steps: int = 400,
    seed: int = 0,
) -> dict[str, float]:
    """ROC AUC of reconstruction error (abnormal high), and the shares of
    held-out abnormal and normal images above the detector's threshold: the
    95th percentile of the error on synthetic normals it did not train on."""
    from fedgan.evaluate.encoder import train_encoder
    from fedgan.evaluate.metrics import auc

    cut = max(1, int(0.8 * fake_normal.shape[0]))
    model = train_encoder(fake_normal[:cut], steps=steps, seed=seed)

    def errors(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = DomainEncoder.prepare(x)
            return ((model.reconstruct(x) - target) ** 2).flatten(1).mean(dim=1)

    threshold = torch.quantile(errors(fake_normal[cut:]), 0.95)
    scores = errors(test)
    abnormal = test_abnormal.bool()
    return {
        "anomaly_auc": auc(scores[abnormal], scores[~abnormal]),
        "anomaly_detected": float((scores[abnormal] > threshold).float().mean()),
        "anomaly_false_alarms": float((scores[~abnormal] > threshold).float().mean()),
    }
