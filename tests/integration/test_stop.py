"""Stopping a running demo (issue 33): SIGTERM to `fedgan demo` mid-run
leaves no process it started, the ServerApp included (the SuperLink starts it
in a session of its own), and the run says "stopped", with the last round it
completed, in status.json, the audit log and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgan.deploy.process import descendants, process_table

pytestmark = pytest.mark.integration


def _zombie_or_gone(pid: int) -> bool:
    return process_table().get(pid, ("Z",))[0] == "Z"


def test_sigterm_stops_every_process_and_the_run_says_stopped(tmp_path):
    fedgan = Path(sys.executable).with_name("fedgan")
    argv = [str(fedgan), "demo", "--sites", "2", "--rounds", "20", "--image-size", "16"]
    argv += ["--images-per-site", "16", "--local-steps", "2", "--no-pretrain", "--no-evaluate"]
    argv += ["--out", str(tmp_path), "--run-id", "halt", "--config", "batch-size=4"]
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "halt"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and demo.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.5)
        assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-2000:]
        family = descendants({demo.pid})
        assert len(family) >= 6  # SuperLink, SuperExec, ServerApp, edge, sidecars, SuperNodes
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=90) == 130
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        log.close()
    time.sleep(1)
    left = [pid for pid in family if not _zombie_or_gone(pid)]
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    status = json.loads((run_dir / "status.json").read_text())
    completed = [
        json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert status["status"] == "stopped" and status["last_round"] == max(completed) >= 1
    assert "SIGTERM" in status["reason"]
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "run_stopped"]
    assert stopped and stopped[-1]["last_round"] == status["last_round"]
    from fedgan.report import reading

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    text = " ".join(reading(records, status))
    assert f"stopped after round {status['last_round']}" in text
