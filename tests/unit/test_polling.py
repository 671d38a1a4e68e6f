"""Issue 34: Flower's SuperExec and our ServerApp poll at one interval that
the launchers set for every process, 0.25 s unless the deployment says
otherwise; a value Flower would refuse stops the launch with one line."""

from __future__ import annotations

import pytest

from fedgan import polling
from fedgan.aggregator.transport import GridTransport
from fedgan.deploy import commands


def test_every_launched_process_gets_the_interval_and_a_deployment_may_change_it(monkeypatch):
    monkeypatch.delenv(polling.ENV, raising=False)
    assert commands.process_env()[polling.ENV] == "0.25"
    monkeypatch.setenv(polling.ENV, "0.5")
    assert commands.process_env()[polling.ENV] == "0.5"
    assert GridTransport(grid=None).poll == 0.5  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["fast", "0", "0.001", "61", "nan", "inf", "-1"])
def test_a_value_flower_would_refuse_stops_the_launch_naming_the_key(monkeypatch, bad):
    monkeypatch.setenv(polling.ENV, bad)
    with pytest.raises(ValueError, match=r"FLWR_SUPEREXEC_TASK_POLL_INTERVAL=.*POLL_SECONDS") as e:
        commands.process_env()
    assert "\n" not in str(e.value)


def test_unset_or_blank_means_the_default():
    assert polling.seconds({}) == polling.DEFAULT_SECONDS
    assert polling.seconds({polling.ENV: "  "}) == polling.DEFAULT_SECONDS
    assert polling.seconds({polling.ENV: "60"}) == 60.0
