"""Fuzzing the two files a person writes by hand: the operator's
federation.yaml and a site's node config (issue 33). Seeded and derandomized
(the same 1,000+ cases everywhere). Whatever the input, the answer is a run
configuration the ServerApp accepts, or our own error naming the file or the
key; never a traceback from deeper down, never a silent NaN."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgan.config import federation
from fedgan.config.appbundle import default_run_config
from fedgan.config.run import ConfigError, RunSettings, SiteSettings
from fedgan.errors import FedGanError

SHIPPED = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "deploy" / "federation.yaml").read_text()
)
KEYS = [(section, key) for section, body in SHIPPED.items() for key in body]
FILE = Path("federation.yaml")
FUZZ = settings(
    max_examples=1000,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

values = st.one_of(
    # The edges a hand-written file reaches: YAML's .inf and .nan, zero,
    # negatives, huge numbers, numbers written as text.
    st.sampled_from([math.inf, -math.inf, math.nan, 0, -1, 0.0, 1e308, "8", "true", ""]),
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def documents(draw):
    """The shipped file with a few keys changed, dropped or invented."""
    doc = {section: dict(body) for section, body in SHIPPED.items()}
    for _ in range(draw(st.integers(1, 4))):
        section, key = draw(st.sampled_from(KEYS))
        action = draw(st.sampled_from(["value", "drop", "unknown", "section"]))
        if not isinstance(doc[section], dict):
            continue  # already replaced by a non-mapping
        if action == "value":
            doc[section][key] = draw(values)
        elif action == "drop":
            doc[section].pop(key, None)
        elif action == "unknown":
            doc[section][draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            doc[section] = draw(values)
    return doc


def _accepted_or_named(call) -> dict | None:
    """What ``call`` returns, or None after our own error, which names the
    file (federation.yaml: every problem with its key path) or the run
    config key at fault."""
    try:
        return call()
    except FedGanError as exc:
        message = str(exc)
        assert "federation.yaml" in message or "run config" in message, message
        return None


@FUZZ
@given(documents())
def test_federation_yaml_is_accepted_or_refused_by_key(doc):
    config = _accepted_or_named(lambda: federation.parse(doc, FILE))
    if config is None:
        return
    # What parse accepts, the ServerApp's settings accept too (or refuse by key).
    settings_ = _accepted_or_named(
        lambda: RunSettings.from_run_config(default_run_config() | config)
    )
    if settings_ is not None:
        for value in config.values():
            assert not (isinstance(value, float) and not math.isfinite(value)), config


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_a_garbled_file_is_refused_with_its_name(tmp_path, raw):
    path = tmp_path / "federation.yaml"
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw, encoding="utf-8")
    _accepted_or_named(lambda: federation.load(path))


NODE_KEYS = [
    "site-id",
    "data-dir",
    "kind",
    "work-dir",
    "device",
    "epsilon-budget",
    "precision",
    "delta",
    "dump-updates",
    "signing-key",
    "crl",
]
node_values = st.one_of(
    st.text(max_size=20),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["auto", "cpu", "bf16", "fp32", "1e-6", "0", "-1", "nan", "inf"]),
    st.sampled_from(["dicom", "fundus", "site-1", "/data", "true", "false"]),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(NODE_KEYS), node_values, max_size=len(NODE_KEYS)))
def test_node_config_is_accepted_or_refused_by_key(monkeypatch, node):
    monkeypatch.delenv("FEDGAN_DEVICE", raising=False)
    monkeypatch.delenv("FEDGAN_PRECISION", raising=False)
    try:
        site = SiteSettings.from_node_config(node)
    except ConfigError as exc:
        assert any(k in str(exc) for k in [*NODE_KEYS, "FEDGAN_"]), str(exc)
        assert "\n" not in str(exc)
        return
    assert site.site_id.strip() and site.kind in ("dicom", "fundus")
    assert 0 <= site.delta < 1 and site.epsilon_budget > 0
    assert math.isfinite(site.epsilon_budget) and math.isfinite(site.delta)
