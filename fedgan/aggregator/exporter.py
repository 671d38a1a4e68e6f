"""The aggregator's Prometheus exporter: a long-lived process that serves
every run's round metrics, read at scrape time from the run folders the
ServerApp writes (``<runs>/<run>/metrics.jsonl``, appended and fsync'd every
round). Nothing lives only in the exporter's memory, so values survive
between runs and across restarts of either process.

Names follow Prometheus conventions (base units, ``_total`` for counters);
per-run series carry ``run`` (the run folder's name), per-site ones ``site``.
``fedgan_tls_rejections_total`` counts the edge's access-log lines whose
client certificate did not verify (no certificate, unknown CA, revoked)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

ROUND_SECONDS_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_VERIFY = re.compile(r" verify=(\S+) ")


def read_records(metrics_path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a line being written at scrape time is skipped."""
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "round" in record:
            out.append(record)
    return out


def latest_by_site(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Each site's last reported value of a per-site field (``epsilon``,
    ``epsilon_budget``, ``noise_figure``) across a run's rounds."""
    out: dict[str, float] = {}
    for r in records:
        out.update(r.get(key, {}))
    return out


def tls_rejections(edge_logs: Iterable[Path]) -> int:
    count = 0
    for path in edge_logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    m = _VERIFY.search(line)
                    if m and m.group(1) != "SUCCESS":
                        count += 1
        except OSError:
            continue
    return count


class RunsCollector(Collector):
    def __init__(
        self, runs_root: Path, edge_logs: Iterable[Path] = (), audit: bool = False
    ) -> None:
        self.runs_root = Path(runs_root)
        self.edge_logs = list(edge_logs)
        # Also copy new certificate rejections into <runs>/audit.jsonl.
        self.audit = audit

    def runs(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        if not self.runs_root.is_dir():
            return
        for path in sorted(self.runs_root.glob("*/metrics.jsonl")):
            records = read_records(path)
            if records:
                yield path.parent.name, records

    def _evaluations(self) -> Iterator[Metric]:
        """Sites' `fedgan evaluate` numbers (quality, privacy, utility)."""
        from fedgan.evaluate.results import load_all

        series = {
            ("quality", "domain_fid"): ("fedgan_eval_domain_fid", "Domain-FID at a site."),
            ("quality", "inception_fid"): (
                "fedgan_eval_inception_fid",
                "Inception FID at a site (only where it passed --inception-weights).",
            ),
            ("quality", "precision"): ("fedgan_eval_precision", "k-NN precision (fidelity)."),
            ("quality", "recall"): ("fedgan_eval_recall", "k-NN recall (diversity)."),
            ("privacy", "memorized_fraction"): (
                "fedgan_eval_memorized_fraction",
                "Synthetic images closer to a training image than real images are to each other.",
            ),
            ("utility", "tstr_ratio"): (
                "fedgan_eval_tstr_ratio",
                "Train-on-synthetic accuracy over train-on-real accuracy.",
            ),
        }
        families = {
            k: GaugeMetricFamily(name, doc, labels=["run", "site"])
            for k, (name, doc) in series.items()
        }
        mia = GaugeMetricFamily(
            "fedgan_eval_mia_auc",
            "Membership-inference ROC AUC at a site (0.5: guessing).",
            labels=["run", "site", "attack"],
        )
        for run_dir in sorted(p.parent for p in self.runs_root.glob("*/metrics.jsonl")):
            for ev in load_all(run_dir):
                labels = [run_dir.name, str(ev["site"])]
                for (group, key), family in families.items():
                    value = ev.get(group, {}).get(key)
                    if isinstance(value, int | float):
                        family.add_metric(labels, float(value))
                for attack in ("discriminator", "generator"):
                    value = ev.get("privacy", {}).get(f"mia_{attack}_auc")
                    if isinstance(value, int | float):
                        mia.add_metric([*labels, attack], float(value))
        yield from families.values()
        yield mia

    def collect(self) -> Iterator[Metric]:
        if self.audit:
            from fedgan.audit_log import AuditLog, ingest_edge_log

            log = AuditLog(self.runs_root / "audit.jsonl")
            for edge_log in self.edge_logs:
                ingest_edge_log(log, edge_log)
        g = {
            "round": GaugeMetricFamily(
                "fedgan_round", "Last completed round of the run.", labels=["run"]
            ),
            "sites": GaugeMetricFamily(
                "fedgan_sites_participating",
                "Sites whose update is in the last round's aggregate.",
                labels=["run"],
            ),
            "g_loss": GaugeMetricFamily(
                "fedgan_generator_loss", "Generator loss, last aggregated round.", labels=["run"]
            ),
            "d_loss": GaugeMetricFamily(
                "fedgan_discriminator_loss",
                "Discriminator loss, last aggregated round.",
                labels=["run"],
            ),
            "eps": GaugeMetricFamily(
                "fedgan_privacy_epsilon", "Site's ε after its last round.", labels=["run", "site"]
            ),
            "remaining": GaugeMetricFamily(
                "fedgan_privacy_budget_remaining",
                "Site's ε budget minus the ε it has spent.",
                labels=["run", "site"],
            ),
            "noise": GaugeMetricFamily(
                "fedgan_privacy_noise_figure",
                "Site's DP noise per step over the largest clipped signal (σ·√d/B).",
                labels=["run", "site"],
            ),
        }
        dropped = CounterMetricFamily(
            "fedgan_sites_dropped",
            "Sampled sites left out of a round's aggregate (failed, timed out, "
            "dropped in secure aggregation; budget refusals not counted).",
            labels=["run"],
        )
        update_bytes = CounterMetricFamily(
            "fedgan_update_bytes", "Bytes a site sent for its updates.", labels=["run", "site"]
        )
        aborted = CounterMetricFamily(
            "fedgan_secagg_aborted_rounds",
            "Rounds abandoned by secure aggregation (fewer than t sites left).",
            labels=["run"],
        )
        duration = HistogramMetricFamily(
            "fedgan_round_duration_seconds", "Wall time of a round.", labels=["run"]
        )
        for run, records in self.runs():
            last = records[-1]
            g["round"].add_metric([run], float(last["round"]))
            aggregated = [r for r in records if "skipped" not in r]
            g["sites"].add_metric([run], float(0 if "skipped" in last else len(last["sites"])))
            if aggregated:
                g["g_loss"].add_metric([run], float(aggregated[-1]["g_loss"]))
                if "d_loss" in aggregated[-1]:  # a mean-embedding run trains no D
                    g["d_loss"].add_metric([run], float(aggregated[-1]["d_loss"]))
            eps = latest_by_site(records, "epsilon")
            budget = latest_by_site(records, "epsilon_budget")
            sent: dict[str, float] = {}
            lost = 0
            for r in records:
                for site, n in r.get("update_bytes", {}).items():
                    sent[site] = sent.get(site, 0) + n
                refused = len(r.get("budget_exhausted", {})) + len(r.get("refused", {}))
                in_sum = len(r.get("sites", [])) if "skipped" not in r else 0
                lost += max(0, r.get("sites_sampled", 0) - refused - in_sum)
            for site, value in sorted(eps.items()):
                g["eps"].add_metric([run, site], float(value))
                if site in budget:
                    g["remaining"].add_metric([run, site], float(budget[site] - value))
            for site, value in sorted(latest_by_site(records, "noise_figure").items()):
                g["noise"].add_metric([run, site], float(value))
            for site, n in sorted(sent.items()):
                update_bytes.add_metric([run, site], float(n))
            dropped.add_metric([run], float(lost))
            aborted.add_metric(
                [run], float(sum(1 for r in records if "skipped" in r and "secagg" in r))
            )
            seconds = [float(r["seconds"]) for r in records if "seconds" in r]
            buckets = [
                (str(b), float(sum(1 for s in seconds if s <= b))) for b in ROUND_SECONDS_BUCKETS
            ]
            duration.add_metric([run], [*buckets, ("+Inf", float(len(seconds)))], sum(seconds))
        yield from g.values()
        yield from (dropped, update_bytes, aborted, duration)
        yield from self._evaluations()
        rejections = CounterMetricFamily(
            "fedgan_tls_rejections",
            "Requests at the edge whose client certificate did not verify.",
        )
        rejections.add_metric([], float(tls_rejections(self.edge_logs)))
        yield rejections


def serve(
    runs_root: Path,
    port: int,
    host: str = "127.0.0.1",
    edge_logs: Iterable[Path] = (),
    audit: bool = True,
) -> WSGIServer:
    """Start the HTTP endpoint (``/metrics``) in a background thread; returns
    the server so a caller can shut it down."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RunsCollector(runs_root, edge_logs, audit))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
