"""FedProx at the site and the server's start/resume rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgan.aggregator.round import sample_sites as _sample
from fedgan.aggregator.run import start as _start
from fedgan.aggregator.run_store import RunOutputs
from fedgan.config.appbundle import default_run_config
from fedgan.config.run import ConfigError, RunSettings
from fedgan.gan.models import GanSpec, build
from fedgan.train import DPConfig, TrainConfig, train_local
from fedgan.weights import get_arrays

SPEC = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)


def _drift(mu: float, dp: DPConfig | None = None) -> float:
    gen, disc = build(SPEC, seed=0)
    start = get_arrays(gen) + get_arrays(disc)
    images = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = TrainConfig(local_steps=15, batch_size=8, lr_g=1e-2, lr_d=1e-2, prox_mu=mu)
    train_local(gen, disc, images, cfg, dp=dp)
    end = get_arrays(gen) + get_arrays(disc)
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(end, start, strict=True))))


def test_proximal_term_keeps_local_weights_near_the_global_model():
    # Adam normalises the pull, so it saturates; it must still be monotone.
    free, mild, strong = _drift(0.0), _drift(1.0), _drift(10.0)
    assert strong < mild < free and strong < 0.85 * free
    dp = DPConfig(0.5, 1.0, 0.5, secret_seed=3)
    assert _drift(10.0, dp) < 0.85 * _drift(0.0, dp)


def test_fedprox_needs_mu_and_fraction_is_bounded():
    cfg = default_run_config()
    cfg["strategy"] = "fedprox"
    with pytest.raises(ConfigError, match="prox-mu"):
        RunSettings.from_run_config(cfg)
    cfg = default_run_config()
    cfg["fraction-sites"] = 0.0
    with pytest.raises(ConfigError, match="fraction-sites"):
        RunSettings.from_run_config(cfg)


def test_sampling_is_a_reproducible_fraction():
    nodes = list(range(10))
    picked = _sample(nodes, 0.3, seed=1, server_round=4)
    assert len(picked) == 3 and set(picked) <= set(nodes)
    assert picked == _sample(nodes, 0.3, seed=1, server_round=4)
    assert _sample(nodes, 1.0, seed=1, server_round=4) == nodes
    assert len(_sample(nodes, 0.01, seed=1, server_round=4)) == 1


def test_a_run_folder_with_a_checkpoint_is_not_overwritten(tmp_path):
    from fedgan.config.appbundle import default_run_config
    from fedgan.config.run import ConfigError, RunSettings

    cfg = default_run_config()
    cfg["run-dir"] = str(tmp_path)
    settings = RunSettings.from_run_config(cfg)
    out = RunOutputs(tmp_path)
    gen, disc, first = _start(settings, out)
    assert first == 1
    out.save_checkpoint(gen, disc, 4)
    with pytest.raises(ConfigError, match="resume = true"):
        _start(settings, out)
    cfg["resume"] = True
    _, _, first = _start(RunSettings.from_run_config(cfg), out)
    assert first == 5


def test_a_stop_between_checkpoint_and_metrics_loses_no_row_and_doubles_none(tmp_path):
    """Issue 33: a kill between the checkpoint and the metrics append lost a
    row (the resume went on after the checkpoint's round). The row rides in
    the checkpoint now; a resume restores it, drops a torn line, and keeps
    metrics.jsonl in step with the checkpoint."""
    import json

    from fedgan.config.appbundle import default_run_config
    from fedgan.config.run import RunSettings

    cfg = default_run_config() | {"run-dir": str(tmp_path)}
    out = RunOutputs(tmp_path)
    gen, disc, _ = _start(RunSettings.from_run_config(cfg), out)
    rows = [{"round": r, "sites": ["a"], "g_loss": 0.5 + r} for r in (1, 2, 3)]
    for row in rows[:2]:
        out.save_checkpoint(gen, disc, row["round"], row)
        out.append_metrics(row)
    out.save_checkpoint(gen, disc, 3, rows[2])  # killed here, before the append
    with open(out.metrics_path, "a") as fh:
        fh.write('{"round": 3, "sit')  # ...or in the middle of it
    cfg["resume"] = True
    _, _, first = _start(RunSettings.from_run_config(cfg), out)
    assert first == 4
    kept = [json.loads(x) for x in out.metrics_path.read_text().splitlines()]
    assert kept == rows  # every round once, whole lines only
    _start(RunSettings.from_run_config(cfg), out)  # a second resume changes nothing
    assert [json.loads(x) for x in out.metrics_path.read_text().splitlines()] == rows


def test_local_epochs_turn_into_steps_from_the_silo_size(tmp_path, monkeypatch):
    from fedgan.config.run import SiteSettings
    from fedgan.silo.synth import synth_silo
    from fedgan.site import round as site_round

    seen = {}
    real_train = site_round.train_local

    def spy(gen, disc, images, cfg, **kw):
        seen["steps"] = cfg.local_steps
        seen["mode_seeking"] = cfg.mode_seeking
        return real_train(gen, disc, images, cfg, **kw)

    monkeypatch.setattr(site_round, "train_local", spy)
    silo = synth_silo(tmp_path / "silo", "fundus", 10, seed=1, size=32)
    cfg = RunSettings.from_run_config(
        {
            **default_run_config(),
            "image-size": 16,
            "batch-size": 4,
            "local-epochs": 1.5,
            "mode-seeking": 0.5,
            "dp": False,
            "run-dir": str(tmp_path / "run"),
        }
    )
    site = SiteSettings("s1", str(silo), "fundus", str(tmp_path / "work"), "cpu", 10.0)
    gen, disc = build(cfg.spec, seed=0)
    outcome = site_round.run_round(
        site, {}, "r", cfg.round_config(1), get_arrays(gen), get_arrays(disc)
    )
    assert seen["steps"] == 4  # ⌈1.5 · 10 / 4⌉
    assert seen["mode_seeking"] == 0.5  # the operator's key reaches the site's trainer
    assert outcome.update is not None and "epsilon" not in outcome.metrics


def test_generator_checkpoint_loads_back(tmp_path):
    from fedgan.aggregator.run_store import load_generator

    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, num_classes=2)
    gen, _ = build(spec, seed=5)
    RunOutputs(tmp_path).save_generator(gen, 3)
    loaded = load_generator(tmp_path / "generator.pt")
    assert loaded.spec == spec
    for a, b in zip(get_arrays(gen), get_arrays(loaded), strict=True):
        assert np.array_equal(a, b)
