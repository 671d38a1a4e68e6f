"""The exporter reads run folders at scrape time: counters add up over
rounds, a half-written line is skipped, and the Grafana dashboard only asks
for series the exporter serves. (The `fedgan exporter` process itself:
tests/integration/test_exporter_process.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedgan.aggregator.exporter import RunsCollector

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "fedgan.json"
)


def _round(n, **extra):
    base = {
        "round": n,
        "seconds": 10.0 * n,
        "sites": ["a", "b"],
        "sites_sampled": 3,
        "g_loss": 1.0 + n,
        "d_loss": 2.0 + n,
        "epsilon": {"a": 1.0 * n, "b": 2.0 * n},
        "epsilon_budget": {"a": 10.0, "b": 5.0},
        "noise_figure": {"a": 3.0 * n, "b": 12.5},
        "update_bytes": {"a": 100, "b": 200},
        "secagg": {"survivors": ["a", "b"], "dropped": ["c"]},
    }
    return base | extra


def _samples(tmp_path: Path) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    edge = tmp_path / "edge-access.log"
    edge.write_text(
        '2026 edge 1.2.3.4 "POST /v1/fleet/x" 200 verify=SUCCESS proto=TLSv1.3 upstream=200\n'
        '2026 edge 1.2.3.5 "GET / HTTP/1.1" 400 verify=NONE proto=TLSv1.3 upstream=-\n'
        '2026 edge 1.2.3.6 "GET /" 400 verify=FAILED:certificate revoked proto=- upstream=-\n'
    )
    registry.register(RunsCollector(tmp_path / "runs", [edge]))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_series_follow_the_run_folders(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    skipped = {
        "round": 3,
        "seconds": 4.0,
        "sites": [],
        "sites_sampled": 3,
        "skipped": "abandoned",
        "secagg": {"survivors": [], "dropped": ["a", "b", "c"]},
    }
    lines = [json.dumps(_round(1)), json.dumps(_round(2)), json.dumps(skipped), '{"round": 4, "sec']
    (run / "metrics.jsonl").write_text("\n".join(lines))
    s = _samples(tmp_path)
    r = (("run", "r1"),)
    assert s[("fedgan_round", r)] == 3
    assert s[("fedgan_generator_loss", r)] == 3.0  # the last aggregated round
    assert s[("fedgan_sites_participating", r)] == 0  # round 3 aggregated nothing
    assert s[("fedgan_sites_dropped_total", r)] == 1 + 1 + 3
    assert s[("fedgan_secagg_aborted_rounds_total", r)] == 1
    assert s[("fedgan_round_duration_seconds_count", r)] == 3
    assert s[("fedgan_round_duration_seconds_sum", r)] == 34.0
    assert s[("fedgan_round_duration_seconds_bucket", (("le", "5.0"), *r))] == 1
    b = (("run", "r1"), ("site", "b"))
    assert s[("fedgan_privacy_epsilon", b)] == 4.0
    assert s[("fedgan_privacy_budget_remaining", b)] == 1.0
    assert s[("fedgan_privacy_noise_figure", b)] == 12.5
    assert s[("fedgan_privacy_noise_figure", (("run", "r1"), ("site", "a")))] == 6.0  # round 2's
    assert s[("fedgan_update_bytes_total", b)] == 400
    assert ("fedgan_privacy_noise_figure_mean", r) not in s  # plain rounds: per site
    assert s[("fedgan_tls_rejections_total", ())] == 2
    # A scrape only reads: the exporter process writes the audit log on its own timer.
    assert not (tmp_path / "runs" / "audit.jsonl").exists()
    # A new run and a later round show up at the next scrape, nothing cached.
    (tmp_path / "runs" / "r2").mkdir()
    (tmp_path / "runs" / "r2" / "metrics.jsonl").write_text(json.dumps(_round(1)) + "\n")
    assert _samples(tmp_path)[("fedgan_round", (("run", "r2"),))] == 1
    # A secure round's figure is the sites' mean, one series per run.
    secure = {k: v for k, v in _round(2).items() if k != "noise_figure"}
    (tmp_path / "runs" / "r2" / "metrics.jsonl").write_text(
        json.dumps(secure | {"noise_figure_mean": 7.5}) + "\n"
    )
    assert _samples(tmp_path)[("fedgan_privacy_noise_figure_mean", (("run", "r2"),))] == 7.5


def test_dashboard_asks_only_for_served_series(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps(_round(1)) + "\n")
    # A site's `fedgan evaluate` result, for the evaluation panel.
    (run / "evaluation").mkdir()
    (run / "evaluation" / "site-1.json").write_text(
        json.dumps(
            {
                "site": "site-1",
                "quality": {"domain_fid": 30.0, "precision": 0.5, "recall": 0.4},
                "privacy": {
                    "memorized_fraction": 0.0,
                    "mia_discriminator_auc": 0.51,
                    "mia_generator_auc": 0.5,
                },
                "utility": {"tstr_ratio": 0.8},
            }
        )
    )
    served = {name for name, _ in _samples(tmp_path)}
    dashboard = json.loads(DASHBOARD.read_text())
    asked = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            asked |= set(re.findall(r"\bfedgan_[a-z_]+", target["expr"]))
    assert asked and asked <= served, asked - served
    assert "fedgan_round" in dashboard["templating"]["list"][0]["query"]
