import pytest

from fedgan.appbundle import default_run_config
from fedgan.run_config import ConfigError, RunSettings, SiteSettings


def test_defaults_parse():
    s = RunSettings.from_run_config(default_run_config())
    assert s.rounds == 3 and s.spec.image_size == 32 and s.train.local_steps == 100


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("num-server-rounds", "three", "num-server-rounds"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("image-size", 48, "image-size"),
        ("local-steps", 2.5, "local-steps"),
        ("dump-updates", "maybe", "dump-updates"),
        ("lr-g", -1.0, "lr-g"),
    ],
)
def test_bad_values_name_their_key(key, value, match):
    cfg = default_run_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(cfg)


def test_round_seed_differs_per_round():
    s = RunSettings.from_run_config(default_run_config())
    assert s.round_config(1)["seed"] != s.round_config(2)["seed"]


def test_node_config_lists_what_is_missing():
    with pytest.raises(ConfigError, match="data-dir, kind, work-dir"):
        SiteSettings.from_node_config({"site-id": "a"})


def test_missing_key_is_named():
    cfg = default_run_config()
    del cfg["lr-d"]
    with pytest.raises(ConfigError, match="'lr-d' is missing"):
        RunSettings.from_run_config(cfg)
