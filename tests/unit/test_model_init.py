"""A federation started from a pretrained init (`fedgan pretrain`,
`model.init`): the file, its two hashes, the aggregator starting from it,
and the site's policy (pin or refuse) and check of round 1's model."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgan import wire
from fedgan.aggregator.round import run_round
from fedgan.aggregator.run import start
from fedgan.config import federation as federation_yaml
from fedgan.config.appbundle import default_run_config
from fedgan.config.model import GanSpec
from fedgan.config.run import ConfigError, RunSettings, SiteSettings
from fedgan.gan.models import build
from fedgan.model_init import load_init, save_init, weights_sha256
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.site import round as site_round
from fedgan.site import work_dir
from fedgan.site.admission import check_start
from fedgan.site.approval import AppRefused, Limits
from fedgan.weights import get_arrays
from tests.memory_federation import SMALL, MemorySite, consortium, federation

SPEC = GanSpec(image_size=16, channels=1, latent_dim=8, width=8)
DATA = {"description": "test data", "images": 3, "kind": "fundus", "stand_in": True}


def _init(tmp_path: Path, spec: GanSpec = SPEC, seed: int = 7) -> Path:
    gen, disc = build(spec, seed=seed)
    path = tmp_path / f"init-{seed}.pt"
    save_init(path, gen, disc, data=DATA, steps=5)
    return path


def test_the_init_file_keeps_both_hashes_and_loads_back_the_same_weights(tmp_path):
    path = _init(tmp_path)
    init = load_init(path, SPEC)
    gen, disc = build(SPEC, seed=7)
    assert init.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert init.weights_sha256 == weights_sha256(get_arrays(gen), get_arrays(disc))
    assert init.record()["data"] == DATA and init.record()["steps"] == 5
    other, _ = build(SPEC, seed=8)
    assert weights_sha256(get_arrays(other), get_arrays(disc)) != init.weights_sha256
    # One value changed by one ulp changes the hash.
    arrays = get_arrays(gen)
    arrays[0].flat[0] = np.nextafter(arrays[0].flat[0], np.float32(1))
    assert weights_sha256(arrays, get_arrays(disc)) != init.weights_sha256


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("missing", "not found; write it with `fedgan pretrain"),
        ("garbage", "is not a FedGAN init file"),
        ("tampered", "is damaged"),
        ("other-shape", "was pretrained for 16 px × 1 channels, latent 8, width 8"),
    ],
)
def test_a_bad_init_file_is_one_line_naming_the_key_and_the_file(tmp_path, damage, named):
    path = _init(tmp_path)
    spec = SPEC
    if damage == "missing":
        path = tmp_path / "nothing.pt"
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "tampered":
        doc = torch.load(path, weights_only=True)
        doc["state_dict"]["net.0.weight"] += 0.5
        torch.save(doc, path)
    else:
        spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=16)
    with pytest.raises(ConfigError) as err:
        load_init(path, spec)
    assert str(err.value).startswith(f"model.init: {path}") and named in str(err.value)
    assert "\n" not in str(err.value)


def test_federation_yaml_names_the_init_relative_to_itself(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "federation.yaml"
    path.write_text("model:\n  init: ../inits/chest.pt\n")
    assert federation_yaml.load(path)["model-init"] == str(tmp_path / "inits" / "chest.pt")


def test_the_aggregator_starts_from_the_init_and_round_one_declares_its_hash(tmp_path):
    init = load_init(_init(tmp_path), SPEC)
    settings = consortium(tmp_path, ["site-a", "site-b"])
    sites = [MemorySite(s, 10.0, 0.001, settings[s]) for s in settings]
    fed = federation(tmp_path, sites, secagg=False)
    gen, disc, first = start(fed.settings, fed.store, init)
    assert first == 1
    assert weights_sha256(get_arrays(gen), get_arrays(disc)) == init.weights_sha256
    fed.gen, fed.disc, fed.init_sha256 = gen, disc, init.weights_sha256
    run_round(fed, 1)
    request = fed.transport.log[0]
    sent_gen, sent_disc, record = wire.read_train_request(request.content)
    assert record["model-init-sha256"] == init.weights_sha256
    assert weights_sha256(sent_gen, sent_disc) == init.weights_sha256


def _site(tmp_path: Path, **keys) -> tuple[RunSettings, SiteSettings]:
    from fedgan.silo.synth import synth_silo

    silo = synth_silo(tmp_path / "silo", "fundus", 12, seed=1, size=16)
    base = SMALL | {"run-dir": str(tmp_path / "run"), "batch-size": 4, "local-steps": 2}
    run = RunSettings.from_run_config(default_run_config() | base | keys)
    site = SiteSettings("s1", str(silo), "fundus", str(tmp_path / "work"), "cpu", 10.0)
    work_dir.init(tmp_path / "work", "s1")
    return run, site


@pytest.mark.parametrize(
    ("limits", "sent", "why"),
    [
        (Limits(refuse_init=True), "init", "refuses any init"),
        (Limits(init_hashes=["0" * 64]), "init", "not one this site pins"),
        (Limits(), "other", "is not the pretrained init"),
    ],
)
def test_a_site_refuses_an_init_it_does_not_accept_before_any_spend(tmp_path, limits, sent, why):
    run, site = _site(tmp_path)
    init = load_init(_init(tmp_path, run.spec), run.spec)
    gen, disc = build(run.spec, seed=7 if sent == "init" else 99)
    cfg = run.round_config(1, init_sha256=init.weights_sha256)
    with pytest.raises(AppRefused) as err:
        site_round.run_round(
            site, {}, "r", cfg, get_arrays(gen), get_arrays(disc), limits=limits, secure=True
        )
    assert why in err.value.reason
    assert PrivacyLedger.in_work_dir(Path(site.work_dir)).spends() == []


def test_a_site_that_pins_the_init_trains_from_it_and_checks_later_rounds_were_seen(tmp_path):
    run, site = _site(tmp_path)
    init = load_init(_init(tmp_path, run.spec), run.spec)
    gen, disc = build(run.spec, seed=7)
    pinned = Limits(init_hashes=[init.weights_sha256])
    cfg = run.round_config(1, init_sha256=init.weights_sha256)
    outcome = site_round.run_round(
        site, {}, "r", cfg, get_arrays(gen), get_arrays(disc), limits=pinned, secure=True
    )
    assert outcome.update is not None and "epsilon" in outcome.metrics
    # Later rounds carry averaged weights: it checked round 1, and remembers it did.
    other, _ = build(run.spec, seed=99)
    later = run.round_config(2, init_sha256=init.weights_sha256)
    check_start(site, later, get_arrays(other), get_arrays(disc), pinned)
    # A site that never saw round 1 of a run cannot tell what it started from.
    unseen = dataclasses.replace(later, run_name="another-run")
    with pytest.raises(AppRefused, match="was not asked in round 1 of run 'another-run'"):
        check_start(site, unseen, get_arrays(other), get_arrays(disc), pinned)
    check_start(site, unseen, get_arrays(other), get_arrays(disc), Limits())  # not strict


def test_a_site_that_checks_inits_refuses_undeclared_pretrained_weights(tmp_path):
    """An aggregator that leaves the init's hash out and sends pretrained
    weights as if they were random: round 1's model is not the run seed's."""
    run, site = _site(tmp_path)
    undeclared, disc = build(run.spec, seed=7)  # not the run's seed (0)
    cfg = run.round_config(1)
    with pytest.raises(AppRefused, match="neither a declared pretrained init nor the random"):
        check_start(site, cfg, get_arrays(undeclared), get_arrays(disc), Limits(refuse_init=True))
    gen, disc = build(run.spec, seed=run.train.seed)  # the honest random start
    check_start(site, cfg, get_arrays(gen), get_arrays(disc), Limits(refuse_init=True))
    check_start(site, cfg, get_arrays(undeclared), get_arrays(disc), Limits())  # not strict


def test_the_operator_is_told_before_submitting_that_the_init_does_not_fit(tmp_path):
    from fedgan.operator import OperatorError, prepare

    path = _init(tmp_path, GanSpec(image_size=16, channels=3, latent_dim=8, width=8))
    config = tmp_path / "federation.yaml"
    config.write_text(f"model:\n  init: {path}\n  image_size: 32\n")
    with pytest.raises(OperatorError, match="was pretrained for 16 px"):
        prepare(config)


def test_the_demo_pretrains_on_the_stand_in_set_once_and_reuses_the_cache(tmp_path):
    """`make demo` pays for pretraining once: the second demo with the same
    model reuses the cached init; a damaged cache file is pretrained again;
    another model shape gets its own."""
    from fedgan.demo import DemoOptions, run_config, standin_init

    opts = DemoOptions(
        out_root=tmp_path, image_size=16, pretrain=True, pretrain_steps=2, standin_images=16
    )
    config = run_config(opts, tmp_path / "run") | {"width": 8, "latent-dim": 8}
    lines: list[str] = []
    first = standin_init(opts, config, lines.append)
    init = load_init(first, RunSettings.from_run_config(config).spec)
    assert init.data["stand_in"] is True and init.steps == 2
    assert first.with_suffix(".png").exists() and any("pretraining on" in x for x in lines)
    lines.clear()
    assert standin_init(opts, config, lines.append) == first
    assert any("(cached;" in x for x in lines) and not any("pretraining on" in x for x in lines)
    first.write_bytes(b"damaged")
    lines.clear()
    assert standin_init(opts, config, lines.append) == first
    assert any("unusable" in x for x in lines) and load_init(first).weights_sha256
    wider = standin_init(opts, config | {"width": 16}, lines.append)
    assert wider != first and load_init(wider).spec.width == 16


def test_an_init_pretrained_with_other_class_names_is_refused(tmp_path):
    """Same shape, classes in another order: class i of the init would be
    another grade in the run, silently."""
    spec = GanSpec(image_size=16, channels=1, latent_dim=8, width=8, num_classes=2)
    gen, disc = build(spec, seed=1)
    path = tmp_path / "init.pt"
    save_init(path, gen, disc, data=DATA | {"classes": ["normal", "abnormal"]}, steps=1)
    assert load_init(path, spec, classes=("normal", "abnormal")).spec == spec
    with pytest.raises(ConfigError, match="pretrained with classes normal, abnormal; the run"):
        load_init(path, spec, classes=("abnormal", "normal"))


def test_a_resumed_run_takes_its_weights_from_the_checkpoint_not_the_init(tmp_path):
    from fedgan.aggregator.server_app import start_from

    path = _init(tmp_path)
    base = default_run_config() | SMALL | {"model-init": str(path), "run-dir": str(tmp_path / "r")}
    assert start_from(RunSettings.from_run_config(base)).weights_sha256
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"held")
    path.unlink()  # moved since: a resume no longer needs it
    assert start_from(RunSettings.from_run_config(base | {"resume": True})) is None
    with pytest.raises(ConfigError, match="not found"):
        start_from(RunSettings.from_run_config(base))
