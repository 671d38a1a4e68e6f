"""Class conditioning: G draws the class it is asked for, and a site feeds
its silo's labels through the run's class list."""

from __future__ import annotations

import csv

import pytest
import torch

from fedgan.config.run import ConfigError, SiteSettings, parse_classes
from fedgan.gan.models import GanSpec, build
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_silo
from fedgan.site.round import site_images
from fedgan.train import DPConfig, TrainConfig, train_local


def _two_classes(n: int, seed: int):
    """Class 0: left half bright; class 1: top half bright; plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 16, 16), -0.8)
    x[y == 0, :, :, :8] = 0.8
    x[y == 1, :, :8, :] = 0.8
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y


def _classifier(x, y):
    clf = torch.nn.Linear(x[0].numel(), 2)
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x.flatten(1)), y).backward()
        opt.step()
    return clf


def test_conditional_generator_draws_the_requested_class():
    x, y = _two_classes(256, 0)
    clf = _classifier(x, y)
    test_x, test_y = _two_classes(200, 1)
    assert (clf(test_x.flatten(1)).argmax(1) == test_y).float().mean() > 0.95
    spec = GanSpec(image_size=16, channels=1, latent_dim=16, width=16, num_classes=2)
    gen, disc = build(spec, seed=0)
    cfg = TrainConfig(local_steps=300, batch_size=32, lr_g=2e-3, lr_d=2e-3)
    train_local(gen, disc, x, cfg, labels=y)
    gen.eval()
    wanted = torch.arange(200) % 2
    with torch.no_grad():
        samples = gen(torch.randn(200, 16, generator=torch.Generator().manual_seed(2)), wanted)
    accuracy = float((clf(samples.flatten(1)).argmax(1) == wanted).float().mean())
    assert accuracy > 0.8  # chance is 0.5


def test_conditional_models_need_labels_and_train_with_dp():
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, num_classes=3)
    gen, disc = build(spec, seed=0)
    x = torch.rand(12, 1, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="class index"):
        train_local(gen, disc, x, TrainConfig(local_steps=1))
    with pytest.raises(ValueError, match="needs labels"):
        gen(torch.randn(2, 8))
    y = torch.arange(12) % 3
    result = train_local(
        gen, disc, x, TrainConfig(local_steps=2, batch_size=4), labels=y, dp=DPConfig(1.0, 1.0, 0.3)
    )
    assert result.steps == 2


def test_site_maps_silo_labels_to_the_runs_classes(tmp_path):
    silo = synth_silo(tmp_path / "silo", "fundus", 20, seed=4, size=32)
    with open(silo / "labels.csv") as fh:
        grades = [row["diagnosis"] for row in csv.DictReader(fh)]
    site = SiteSettings("s", str(silo), "fundus", str(tmp_path / "work"), "cpu", 10.0)
    opts = SiloOptions(kind="fundus", image_size=16, channels=3)
    images, labels, _ = site_images(site, opts, ("0", "2"))
    wanted = [g for g in grades if g in ("0", "2")]
    assert images.shape[0] == len(wanted) == labels.shape[0]
    assert labels.tolist() == [0 if g == "0" else 1 for g in wanted]
    images, labels, _ = site_images(site, opts)
    assert labels is None and images.shape[0] == 20
    with pytest.raises(ConfigError, match="twice"):
        parse_classes("a,b,a")
