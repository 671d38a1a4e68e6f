"""Round metrics through a real Prometheus: the exporter (`fedgan exporter`,
its own process) serves a finished 2-site, 2-round federation's run folder;
a real Prometheus server (Debian's) scrapes it; its HTTP API must give back
what metrics.jsonl says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from fedgan.deploy.process import free_port

pytestmark = pytest.mark.integration


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(port: int, expr: str) -> float:
    result = _query(port, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


@pytest.fixture()
def prometheus(finished_run, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make setup` (Debian package prometheus)")
    run_dir, _ = finished_run
    exporter_port, prom_port = free_port(), free_port()
    exporter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedgan.cli",
            "exporter",
            "--runs",
            str(run_dir.parent),
            "--port",
            str(exporter_port),
            "--edge-log",
            str(run_dir / "logs" / "edge-access.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: fedgan\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n"
    )
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert exporter.poll() is None and server.poll() is None
            try:
                if _query(prom_port, "fedgan_round"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
            time.sleep(0.5)
        yield prom_port, run_dir
    finally:
        for proc in (server, exporter):
            proc.terminate()
            proc.wait(timeout=30)


def test_prometheus_serves_what_metrics_jsonl_says(prometheus):
    port, run_dir = prometheus
    run = run_dir.name
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    sel = f'{{run="{run}"}}'
    assert _value(port, f"fedgan_round{sel}") == last["round"] == 2
    assert _value(port, f"fedgan_sites_participating{sel}") == len(last["sites"]) == 2
    assert _value(port, f"fedgan_generator_loss{sel}") == pytest.approx(last["g_loss"])
    assert _value(port, f"fedgan_discriminator_loss{sel}") == pytest.approx(last["d_loss"])
    assert _value(port, f"fedgan_round_duration_seconds_count{sel}") == 2
    assert _value(port, f"fedgan_round_duration_seconds_sum{sel}") == pytest.approx(
        sum(r["seconds"] for r in records)
    )
    assert _value(port, f"fedgan_sites_dropped_total{sel}") == 0
    assert _value(port, f"fedgan_secagg_aborted_rounds_total{sel}") == 0
    for site in ("site-1", "site-2"):
        s = f'{{run="{run}",site="{site}"}}'
        eps = last["epsilon"][site]
        assert _value(port, f"fedgan_privacy_epsilon{s}") == pytest.approx(eps)
        budget = last["epsilon_budget"][site]
        assert _value(port, f"fedgan_privacy_budget_remaining{s}") == pytest.approx(budget - eps)
        sent = sum(r["update_bytes"][site] for r in records)
        assert _value(port, f"fedgan_update_bytes_total{s}") == sent > 0
    # A secure round: only the sites' (geometric) mean noise figure is known.
    assert "noise_figure" not in last and last["noise_figure_mean"] > 0
    assert _value(port, f"fedgan_privacy_noise_figure_mean{sel}") == pytest.approx(
        last["noise_figure_mean"]
    )
    # Every site connected with a valid certificate: no rejection logged.
    assert _value(port, "fedgan_tls_rejections_total") == 0


def test_shipped_prometheus_config_is_valid():
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
