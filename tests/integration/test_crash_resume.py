"""A crash mid-round (issue 33): kill -9 the SuperLink and the ServerApp
while the sites train a secure round, bring the federation back and resume.
No round is lost or doubled, metrics.jsonl stays in step with the checkpoint,
and every site's ledger counts every training it did, the interrupted one
included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedgan.deploy.process import descendants, process_table
from fedgan.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2")


def _spent_rounds(run_dir: Path, site: str) -> list[int]:
    return [s.round for s in PrivacyLedger.in_work_dir(run_dir / "sites" / site).spends()]


def _named(family: set[int], name: str) -> list[int]:
    found = []
    for pid in family:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == name for a in argv[:2]):
            found.append(pid)
    return found


def _fedgan(*args: str, log: Path) -> subprocess.Popen:
    fedgan = Path(sys.executable).with_name("fedgan")
    out = open(log, "ab")  # noqa: SIM115 - the child holds it; closed with the test
    return subprocess.Popen(
        [str(fedgan), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_kill_9_mid_round_then_resume_loses_and_doubles_no_round(tmp_path):
    log = tmp_path / "demo.log"
    argv = ["demo", "--sites", "2", "--rounds", "3", "--image-size", "16"]
    argv += ["--images-per-site", "16", "--local-steps", "12", "--no-pretrain", "--no-evaluate"]
    argv += ["--out", str(tmp_path), "--run-id", "crash", "--config", "batch-size=4"]
    demo = _fedgan(*argv, log=log)
    run_dir = tmp_path / "crash"
    family: set[int] = set()
    try:
        # Wait until round 1 is kept and both sites have spent for round 2:
        # they are training it (the spend is written before the first step).
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and demo.poll() is None:
            ledgers = [run_dir / "sites" / s / "privacy-ledger.jsonl" for s in SITES]
            if all(p.exists() for p in ledgers) and all(
                2 in _spent_rounds(run_dir, s) for s in SITES
            ):
                break
            time.sleep(0.2)
        assert demo.poll() is None, log.read_text()[-3000:]
        family = descendants({demo.pid})
        victims = _named(family, "flower-superlink") + _named(family, "flwr-serverapp")
        assert len(victims) == 2, victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        # The demo notices and stops what is left; a host crash would not
        # even do that, so whatever still runs after a while is killed too.
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        for pid in descendants({demo.pid}) | family:
            if process_table().get(pid, ("Z",))[0] != "Z":
                os.kill(pid, signal.SIGKILL)
    kept = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1], f"the kill was meant to land in round 2: {kept}"
    interrupted = {s: _spent_rounds(run_dir, s) for s in SITES}
    assert all(rounds == [1, 2] for rounds in interrupted.values()), interrupted

    resumed = _fedgan("demo", "--resume", str(run_dir), "--rounds", "3", log=log)
    try:
        assert resumed.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(len(r["sites"]) == 2 and "secagg" in r for r in rows), rows
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 3
    assert json.loads(checkpoint["metrics_line"])["round"] == 3
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["rounds"] == 3
    # The interrupted round's training is counted, and so is its retry.
    for site in SITES:
        assert _spent_rounds(run_dir, site) == [1, 2, 2, 3], site
