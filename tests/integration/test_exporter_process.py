"""The `fedgan exporter` process (a real one): it serves the runs' metrics
and, apart from scrapes, copies the edge's certificate rejections into the
audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from fedgan.deploy.process import free_port

pytestmark = pytest.mark.integration


def _round(n: int) -> dict:
    return {
        "round": n,
        "seconds": 10.0 * n,
        "sites": ["a", "b"],
        "sites_sampled": 3,
        "g_loss": 1.0 + n,
        "d_loss": 2.0 + n,
        "epsilon": {"a": 1.0 * n, "b": 2.0 * n},
        "epsilon_budget": {"a": 10.0, "b": 5.0},
        "update_bytes": {"a": 100, "b": 200},
    }


def test_the_exporter_process_records_rejections_in_the_audit_log(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "metrics.jsonl").write_text(json.dumps(_round(1)) + "\n")
    edge = tmp_path / "edge-access.log"
    edge.write_text(
        '2026 edge 1.2.3.4 "POST /v1/fleet/x" 200 verify=SUCCESS proto=TLSv1.3 upstream=200\n'
        '2026 edge 1.2.3.5 "GET / HTTP/1.1" 400 verify=NONE proto=TLSv1.3 upstream=-\n'
    )
    port = free_port()
    argv = [sys.executable, "-m", "fedgan.cli", "exporter", "--runs", str(runs)]
    argv += ["--port", str(port), "--edge-log", str(edge)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    audit = runs / "audit.jsonl"
    passed = runs / "audit.jsonl.edge-offset"  # written at the end of a pass
    try:
        deadline = time.monotonic() + 60
        while not passed.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no audit log after 60 s"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b'fedgan_round{run="r1"} 1.0' in resp.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["event"], e["remote"], e["verify"]) for e in events] == [
        ("certificate_rejected", "1.2.3.5", "NONE")
    ]
