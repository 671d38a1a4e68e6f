"""Run settings from the run config, the round contract, and node settings."""

import pytest

from fedgan.config.appbundle import default_run_config
from fedgan.config.run import ConfigError, RunSettings, SiteSettings


def test_defaults_parse():
    s = RunSettings.from_run_config(default_run_config())
    assert s.rounds == 3 and s.spec.image_size == 32 and s.train.local_steps == 25


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("num-server-rounds", "three", "num-server-rounds"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("image-size", 48, "image-size"),
        ("local-steps", 2.5, "local-steps"),
        ("dump-updates", "maybe", "dump-updates"),
        ("lr-g", -1.0, "lr-g"),
        ("mode-seeking", -1.0, "key 'mode-seeking' must be >= 0"),
    ],
)
def test_bad_values_name_their_key(key, value, match):
    cfg = default_run_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(cfg)


@pytest.mark.parametrize(
    ("lr_g", "init", "expected"),
    [(0.0, "", 2e-4), (0.0, "/inits/a.pt", 2e-5), (1e-3, "/inits/a.pt", 1e-3), (3e-4, "", 3e-4)],
)
def test_lr_g_left_at_zero_is_chosen_from_whether_the_run_starts_from_an_init(lr_g, init, expected):
    """Fine-tuning a pretrained G under DP needs a G that follows the noised D
    slowly (bench/RESULTS.md); an operator's own value is kept."""
    cfg = default_run_config() | {"lr-g": lr_g, "model-init": init}
    settings = RunSettings.from_run_config(cfg)
    assert settings.train.lr_g == expected
    assert settings.round_config(1).local.lr_g == expected  # what the sites train with


def test_round_seed_differs_per_round():
    s = RunSettings.from_run_config(default_run_config())
    assert s.round_config(1).local.seed != s.round_config(2).local.seed


def test_the_round_contract_survives_its_record_and_names_a_bad_key():
    from fedgan.config.round import RoundConfig

    s = RunSettings.from_run_config(default_run_config())
    contract = s.round_config(3, embedding_digest="ab" * 32)
    record = contract.to_record()
    parsed = RoundConfig.from_record(record)
    assert parsed.to_record() == record
    assert (parsed.model, parsed.local, parsed.embedding_digest) == (
        contract.model,
        contract.local,
        contract.embedding_digest,
    )
    with pytest.raises(ConfigError, match="round config key 'batch-size' = 'x'"):
        RoundConfig.from_record(record | {"batch-size": "x"})
    del record["lr-g"]
    with pytest.raises(ConfigError, match="round config key 'lr-g' is missing"):
        RoundConfig.from_record(record)


def test_node_config_lists_what_is_missing():
    with pytest.raises(ConfigError, match="data-dir, kind, work-dir"):
        SiteSettings.from_node_config({"site-id": "a"})


def test_missing_key_is_named():
    cfg = default_run_config()
    del cfg["lr-d"]
    with pytest.raises(ConfigError, match="'lr-d' is missing"):
        RunSettings.from_run_config(cfg)


def test_demo_overrides_are_typed_and_checked():
    from fedgan.demo import parse_overrides

    assert parse_overrides(["dp=false", "target-epsilon=4", "accountant=rdp"]) == {
        "dp": False,
        "target-epsilon": 4.0,
        "accountant": "rdp",
    }
    assert isinstance(parse_overrides(["target-epsilon=4"])["target-epsilon"], float)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["no-such-key=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["dp"])


def test_privacy_settings_are_validated():
    cfg = default_run_config()
    cfg["accountant"] = "gdp"
    with pytest.raises(ConfigError, match="accountant"):
        RunSettings.from_run_config(cfg)
    cfg = default_run_config()
    cfg["noise-multiplier"], cfg["target-epsilon"] = 0.0, 0.0
    with pytest.raises(ConfigError, match="target-epsilon"):
        RunSettings.from_run_config(cfg)


def test_device_resolution(monkeypatch):
    import torch

    from fedgan.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setenv("FEDGAN_DEVICE", "cpu")
    node = {"site-id": "a", "data-dir": "/d", "kind": "fundus", "work-dir": "/w"}
    assert SiteSettings.from_node_config(node).device == "cpu"


def test_site_precision(monkeypatch):
    node = {"site-id": "a", "data-dir": "/d", "kind": "fundus", "work-dir": "/w", "device": "cpu"}
    assert SiteSettings.from_node_config(node).precision == "fp32"
    assert SiteSettings.from_node_config(node | {"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match=r"'precision'.*fp32 or bf16"):
        SiteSettings.from_node_config(node | {"precision": "fp16"})
    monkeypatch.setenv("FEDGAN_PRECISION", "bf16")
    assert SiteSettings.from_node_config(node).precision == "bf16"


def test_site_delta_is_the_sites_own():
    node = {"site-id": "a", "data-dir": "/d", "kind": "fundus", "work-dir": "/w", "device": "cpu"}
    assert SiteSettings.from_node_config(node).delta == 0.0  # from the silo's size
    assert SiteSettings.from_node_config(node | {"delta": "1e-6"}).delta == 1e-6
    for bad in ("1", "-1e-5", "tiny"):
        with pytest.raises(ConfigError, match=r"node config delta=.*give a number in \[0, 1\)"):
            SiteSettings.from_node_config(node | {"delta": bad})


def test_secagg_settings_and_value_range():
    s = RunSettings.from_run_config(default_run_config())
    assert s.secagg.enabled and s.secagg.bits == 12 and s.secagg.threshold == 0
    # Adam moves a weight by ~lr per step: 2·lr·steps beats 8C/√P here.
    assert s.secagg_range(10_000) == pytest.approx(2 * 2e-4 * 25)
    assert s.secagg_range(10**9) == pytest.approx(8 * 20 / 10**4.5)
    cfg = default_run_config() | {"local-epochs": 1.0}
    assert RunSettings.from_run_config(cfg).secagg_range(400) == pytest.approx(8.0)
    cfg |= {"update-clip": 0.0}
    with pytest.raises(ConfigError, match="secagg-range"):
        RunSettings.from_run_config(cfg)
    cfg |= {"secagg-range": 0.5}
    assert RunSettings.from_run_config(cfg).secagg_range(400) == 0.5
    with pytest.raises(ConfigError, match="secagg-bits"):
        RunSettings.from_run_config(default_run_config() | {"secagg-bits": 10})


def test_demo_refuses_secure_aggregation_with_one_site():
    from fedgan.demo import DemoOptions

    with pytest.raises(ValueError, match=r"at least 2 sites.*secagg=false"):
        DemoOptions(sites=1)
    assert DemoOptions(sites=1, extra_config={"secagg": False}).sites == 1


def test_mean_embedding_refuses_d_steps_per_g():
    cfg = default_run_config() | {
        "mechanism": "mean-embedding",
        "num-server-rounds": 1,
        "d-steps-per-g": 2,
    }
    with pytest.raises(ConfigError, match="trains no D; set 'd-steps-per-g' = 1"):
        RunSettings.from_run_config(cfg)
