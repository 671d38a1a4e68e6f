"""kill -9 of a site's training process in the middle of a DP round: the
ledger counts the interrupted round as spent, once, and nothing is lost when
the site trains again (Flower starts a fresh ClientApp process each round, so
the next round is the restart)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fedgan.config.appbundle import stage_app_dir, write_run_config
from fedgan.demo import prepare, run_config
from fedgan.deploy.local import LocalFederation
from fedgan.privacy.accountant import epsilon
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.site.approval import PolicyStore
from tests.federations import small_federation
from tests.proc import pids_in_groups

pytestmark = pytest.mark.integration


def test_kill_9_mid_round_counts_the_round_once(tmp_path):
    run_dir = tmp_path / "crash"
    run_dir.mkdir()
    opts = small_federation(
        tmp_path,
        "crash",
        rounds=3,
        local_steps=300,  # ~4 s of training: a wide window for the kill
        node_config={s: {"epsilon-budget": "1000"} for s in ("site-1", "site-2")},
        extra_config={
            "noise-multiplier": 1.0,
            "batch-size": 4,
            "delta": 1e-5,
            "round-timeout": 45.0,
            # site-2 trains alone while site-1 is down; a secure sum of one
            # update is refused, and this test is about the ledger.
            "secagg": False,
        },
    )
    sites = prepare(opts, run_dir, lambda _: None)
    app_dir = stage_app_dir(run_dir / "app")
    config = write_run_config(run_dir / "run-config.toml", run_config(opts, run_dir))
    ledger = PrivacyLedger.in_work_dir(run_dir / "sites" / "site-1")
    errors: list[BaseException] = []
    with LocalFederation(run_dir, run_dir / "certs", sites) as fed:
        for site in sites:  # each hospital's own choice: plain rounds allowed
            PolicyStore(fed.site_work_dir(site.site_id), site.site_id).update(
                require_secure_aggregation=False
            )
        fed.start()

        def submit() -> None:
            try:
                fed.run(app_dir, config, timeout=400)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        runner = threading.Thread(target=submit)
        runner.start()
        deadline = time.monotonic() + 120
        while not (ledger.path.exists() and '"spend"' in ledger.path.read_text()):
            assert time.monotonic() < deadline, "site-1 never started round 1"
            time.sleep(0.05)
        assert '"complete"' not in ledger.path.read_text()  # mid-round
        supernode = next(p for p in fed.group.processes if p.name == "supernode-site-1")
        victims = [
            pid
            for pid in pids_in_groups({supernode.pid})
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert victims, "no ClientApp process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        runner.join(timeout=400)
    assert not errors, errors
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "site-1" not in rounds[0]["sites"]  # its round-1 update died with it
    # The site trains again in a later round (its SuperNode needs ~30 s to
    # notice the dead ClientApp, so not necessarily in round 2).
    assert any(r["sites"] == ["site-1", "site-2"] for r in rounds[1:])
    spends = ledger.spends()
    completed = [r for r in ledger.records() if r["type"] == "complete"]
    trained = [s.round for s in spends]
    assert trained[0] == 1 and len(trained) == len(set(trained))  # no duplicates
    assert 1 not in [r["round"] for r in completed]  # round 1 interrupted, still counted
    q = 4 / 16
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon([(1.0, q, 300)] * len(spends), 1e-5))
    assert len(spends) >= 2 and spends[-1].epsilon_after == pytest.approx(ledger.epsilon(1e-5))
