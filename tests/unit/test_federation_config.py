"""deploy/federation.yaml: the shipped file is valid, every problem of a bad
one is listed with its key path, and what the operator sees of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedgan import operator
from fedgan.config import federation
from fedgan.config.appbundle import default_run_config
from fedgan.config.run import RunSettings
from fedgan.progress import ROUND_MARKER, format_round

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "federation.yaml"


def test_shipped_federation_yaml_is_valid_and_complete():
    overrides = federation.load(SHIPPED)
    settings = RunSettings.from_run_config(default_run_config() | overrides)
    assert settings.secagg.enabled and settings.privacy.enabled
    # Every schema key appears in the shipped file, so it documents them all.
    text = SHIPPED.read_text()
    for section, fields in federation.SCHEMA.items():
        assert f"{section}:" in text
        for key in fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from {SHIPPED.name}"


def test_every_problem_is_listed_with_its_key_path(tmp_path):
    bad = tmp_path / "federation.yaml"
    bad.write_text(
        "run:\n  rounds: 0\n  colour: blue\n"
        "model:\n  image_size: 48\n  classes: [a, a]\n"
        "strategy:\n  name: fedprox\n"
        "privacy:\n  dp: maybe\n  delta: 2\n"
        "secure_aggregation:\n  bits: 10\n"
        "extras:\n  x: 1\n"
    )
    with pytest.raises(federation.FederationConfigError) as info:
        federation.load(bad)
    problems = info.value.problems
    for path in (
        "run.rounds",
        "run.colour: unknown key",
        "model.image_size",
        "model.classes: a class is named twice",
        "strategy.prox_mu",
        "privacy.dp",
        "privacy.delta",
        "secure_aggregation.bits",
        "extras: unknown section",
    ):
        assert any(p.startswith(path) for p in problems), (path, problems)
    assert len(problems) == 9
    assert "nothing submitted" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("run: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "mapping of sections")],
)
def test_unreadable_files_are_refused(tmp_path, text, fragment):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(federation.FederationConfigError, match=fragment):
        federation.load(path)
    with pytest.raises(federation.FederationConfigError, match="file not found"):
        federation.load(tmp_path / "missing.yaml")


def test_prepare_applies_resume_and_run_dir(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("run:\n  rounds: 4\n  dir: runs/a\n")
    assert operator.prepare(path)["run-dir"] == "runs/a"
    assert operator.prepare(path, run_dir="runs/b")["run-dir"] == "runs/b"
    resumed = operator.prepare(path, resume="runs/a")
    assert resumed["resume"] is True and resumed["num-server-rounds"] == 4


def test_the_operator_sees_rounds_from_the_log_stream():
    record = {
        "round": 2,
        "seconds": 12.5,
        "sites": ["a", "b"],
        "sites_sampled": 3,
        "g_loss": 1.0,
        "d_loss": 2.0,
        "epsilon": {"a": 3.0, "b": 4.0},
        "secagg": {"failures": {"c": "secagg_mask: no reply within 120 s"}},
    }
    seen: list[str] = []
    operator._follow(f"INFO : {ROUND_MARKER}{json.dumps(record)}\n", 4, seen.append)
    operator._follow("INFO :      Received successfully\n", 4, seen.append)
    assert seen == format_round(record, 4)
    assert seen[0].startswith("round 2/4 [##########..........]") and "ε max 4.00" in seen[0]
    assert seen[1] == "  c dropped out: secagg_mask: no reply within 120 s"
    assert "mode-seeking" not in seen[0]
    line = format_round(record | {"mode_seeking_loss": 9.5}, 4)[0]
    assert "G loss 1.000  mode-seeking 9.500  D loss on fakes 2.000" in line


def test_a_mean_embedding_run_is_checked_before_submission(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text('privacy:\n  mechanism: mean-embedding\nmodel:\n  attributes: "age=0:100"\n')
    with pytest.raises(federation.FederationConfigError) as info:
        federation.load(path)
    text = str(info.value)
    assert "run.rounds: mechanism mean-embedding releases once" in text
    assert "model.attributes: mechanism mean-embedding conditions on classes only" in text
    path.write_text("run:\n  rounds: 1\nprivacy:\n  mechanism: mean-embedding\n  features: 64\n")
    settings = RunSettings.from_run_config(default_run_config() | federation.load(path))
    assert settings.privacy.mean_embedding and settings.privacy.embedding_features == 64


def test_progress_line_of_a_mean_embedding_round_shows_the_fit():
    record = {
        "round": 1,
        "seconds": 3.0,
        "sites": ["a", "b"],
        "sites_sampled": 2,
        "mechanism": "mean-embedding",
        "g_loss": 0.0123,
        "fit_loss_first": 0.5,
        "epsilon": {"a": 7.99, "b": 7.99},
    }
    (line,) = format_round(record, 1)
    assert "G fit to the releases 0.0123 (from 0.5000)" in line and "D loss" not in line


def test_the_fit_of_a_mean_embedding_run_shows_its_progress(tmp_path):
    """Minutes of fitting at the aggregator are not silent: `fedgan run`
    passes the ServerApp's fit lines on, and `fedgan demo` reads them from
    the log as they land, each once, a half-written line only when whole."""
    from fedgan.demo import RoundPrinter

    line = "INFO fedgan.server: fitting G to the releases: step 150/1500, loss 0.41234"
    seen: list[str] = []
    operator._follow(line + "\n", 1, seen.append)
    assert seen == ["  fitting G to the releases: step 150/1500, loss 0.41234"]

    log = tmp_path / "flwr-run.log"
    log.write_text("an earlier run's line: fitting G to the releases: step 1/1\n")
    printed: list[str] = []
    printer = RoundPrinter(tmp_path / "metrics.jsonl", 1, printed.append, log)
    printer()
    assert printed == []  # what the log held before this run
    with log.open("a") as fh:
        fh.write(line + "\nINFO : something else\nINFO fedgan.server: fitting G to the rel")
    printer()
    assert printed == ["  fitting G to the releases: step 150/1500, loss 0.41234"]
    with log.open("a") as fh:
        fh.write("eases: step 300/1500, loss 0.3\n")
    printer()
    assert printed[1:] == ["  fitting G to the releases: step 300/1500, loss 0.3"]


def test_site_names_are_an_extra_that_fails_quietly(tmp_path, monkeypatch):
    """Without a reachable SuperLink (here: no Flower config at all), the
    listing keeps its node ids: no names, no error, FLWR_HOME as it was."""
    monkeypatch.setenv("FLWR_HOME", "/the/operator/own")
    assert operator.node_names("consortium", tmp_path / "empty-home") == {}
    assert os.environ["FLWR_HOME"] == "/the/operator/own"
    monkeypatch.delenv("FLWR_HOME")
    assert operator.node_names("consortium", tmp_path / "empty-home") == {}
    assert "FLWR_HOME" not in os.environ
