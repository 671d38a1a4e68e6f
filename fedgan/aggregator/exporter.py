"""The aggregator's Prometheus exporter: a long-lived process that serves
every run's round metrics, read at scrape time from the run folders the
ServerApp writes (``<runs>/<run>/metrics.jsonl``, appended and fsync'd every
round). Nothing lives only in the exporter's memory, so values survive
between runs and across restarts of either process.

Names follow Prometheus conventions (base units, ``_total`` for counters);
per-run series carry ``run`` (the run folder's name), per-site ones ``site``.
``fedgan_tls_rejections_total`` counts the edge's access-log lines whose
client certificate did not verify (no certificate, unknown CA, revoked).

A scrape only reads. Copying those rejections into the audit log is a step
of its own (`fedgan.audit_log.follow_edge_logs`), which the `fedgan exporter`
process runs on a timer beside the HTTP server."""

from __future__ import annotations

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

from fedgan.aggregator.run_store import latest_by_site, read_records

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

ROUND_SECONDS_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_VERIFY = re.compile(r" verify=(\S+) ")


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
    """Serves what the run folders and the edge's logs say at scrape time;
    it only reads (the exporter process records rejections in the audit log
    on its own timer, `fedgan.audit_log.follow_edge_logs`)."""

    def __init__(self, runs_root: Path, edge_logs: Iterable[Path] = ()) -> None:
        self.runs_root = Path(runs_root)
        self.edge_logs = list(edge_logs)

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

        families = {
            k: GaugeMetricFamily(name, doc, labels=["run", "site"])
            for k, (name, doc) in EVALUATION_SERIES.items()
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
        series = RunSeries()
        for run, records in self.runs():
            series.add(run, records)
        yield from series
        yield from self._evaluations()
        rejections = CounterMetricFamily(
            "fedgan_tls_rejections",
            "Requests at the edge whose client certificate did not verify.",
        )
        rejections.add_metric([], float(tls_rejections(self.edge_logs)))
        yield rejections


# (group, key) of an evaluation's JSON: the gauge's name and help.
EVALUATION_SERIES = {
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


class RunSeries:
    """The per-run families, filled one run at a time and served in a fixed
    order, so that a scrape reads the same whichever run came first."""

    def __init__(self) -> None:
        run, site = ["run"], ["run", "site"]
        self.round = GaugeMetricFamily(
            "fedgan_round", "Last completed round of the run.", labels=run
        )
        self.sites = GaugeMetricFamily(
            "fedgan_sites_participating",
            "Sites whose update is in the last round's aggregate.",
            labels=run,
        )
        self.g_loss = GaugeMetricFamily(
            "fedgan_generator_loss", "Generator loss, last aggregated round.", labels=run
        )
        self.d_loss = GaugeMetricFamily(
            "fedgan_discriminator_loss", "Discriminator loss, last aggregated round.", labels=run
        )
        self.eps = GaugeMetricFamily(
            "fedgan_privacy_epsilon", "Site's ε after its last round.", labels=site
        )
        self.remaining = GaugeMetricFamily(
            "fedgan_privacy_budget_remaining",
            "Site's ε budget minus the ε it has spent.",
            labels=site,
        )
        self.noise = GaugeMetricFamily(
            "fedgan_privacy_noise_figure",
            "Site's DP noise per step over the largest clipped signal (σ·√d/B).",
            labels=site,
        )
        self.noise_mean = GaugeMetricFamily(
            "fedgan_privacy_noise_figure_mean",
            "Secure rounds: the geometric mean of the sites' noise figures, last round "
            "(no single site's is known).",
            labels=run,
        )
        self.dropped = CounterMetricFamily(
            "fedgan_sites_dropped",
            "Sampled sites left out of a round's aggregate (failed, timed out, "
            "dropped in secure aggregation; budget refusals not counted).",
            labels=run,
        )
        self.update_bytes = CounterMetricFamily(
            "fedgan_update_bytes", "Bytes a site sent for its updates.", labels=site
        )
        self.aborted = CounterMetricFamily(
            "fedgan_secagg_aborted_rounds",
            "Rounds abandoned by secure aggregation (fewer than t sites left).",
            labels=run,
        )
        self.duration = HistogramMetricFamily(
            "fedgan_round_duration_seconds", "Wall time of a round.", labels=run
        )

    def __iter__(self) -> Iterator[Metric]:
        yield from (self.round, self.sites, self.g_loss, self.d_loss)
        yield from (self.eps, self.remaining, self.noise, self.noise_mean)
        yield from (self.dropped, self.update_bytes, self.aborted, self.duration)

    def add(self, run: str, records: list[dict[str, Any]]) -> None:
        self._progress(run, records)
        self._privacy(run, records)
        self._traffic(run, records)
        self._durations(run, records)

    def _progress(self, run: str, records: list[dict[str, Any]]) -> None:
        """The last round, who was in it, and the last aggregated losses."""
        last = records[-1]
        self.round.add_metric([run], float(last["round"]))
        self.sites.add_metric([run], float(0 if "skipped" in last else len(last["sites"])))
        aggregated = [r for r in records if "skipped" not in r]
        if aggregated:
            self.g_loss.add_metric([run], float(aggregated[-1]["g_loss"]))
            if "d_loss" in aggregated[-1]:  # a mean-embedding run trains no D
                self.d_loss.add_metric([run], float(aggregated[-1]["d_loss"]))

    def _privacy(self, run: str, records: list[dict[str, Any]]) -> None:
        eps = latest_by_site(records, "epsilon")
        budget = latest_by_site(records, "epsilon_budget")
        for site, value in sorted(eps.items()):
            self.eps.add_metric([run, site], float(value))
            if site in budget:
                self.remaining.add_metric([run, site], float(budget[site] - value))
        for site, value in sorted(latest_by_site(records, "noise_figure").items()):
            self.noise.add_metric([run, site], float(value))
        means = [r["noise_figure_mean"] for r in records if "noise_figure_mean" in r]
        if means:
            self.noise_mean.add_metric([run], float(means[-1]))

    def _traffic(self, run: str, records: list[dict[str, Any]]) -> None:
        """Counters over every round: bytes sent, sites lost, rounds aborted."""
        sent: dict[str, float] = {}
        for r in records:
            for site, n in r.get("update_bytes", {}).items():
                sent[site] = sent.get(site, 0) + n
        for site, n in sorted(sent.items()):
            self.update_bytes.add_metric([run, site], float(n))
        self.dropped.add_metric([run], float(sum(_left_out(r) for r in records)))
        self.aborted.add_metric(
            [run], float(sum(1 for r in records if "skipped" in r and "secagg" in r))
        )

    def _durations(self, run: str, records: list[dict[str, Any]]) -> None:
        seconds = [float(r["seconds"]) for r in records if "seconds" in r]
        buckets = [
            (str(b), float(sum(1 for s in seconds if s <= b))) for b in ROUND_SECONDS_BUCKETS
        ]
        self.duration.add_metric([run], [*buckets, ("+Inf", float(len(seconds)))], sum(seconds))


def _left_out(record: dict[str, Any]) -> int:
    """Sampled sites neither in the round's sum nor refused (budget, policy):
    they failed, timed out or dropped out of secure aggregation."""
    refused = len(record.get("budget_exhausted", {})) + len(record.get("refused", {}))
    in_sum = len(record.get("sites", [])) if "skipped" not in record else 0
    return max(0, record.get("sites_sampled", 0) - refused - in_sum)


def serve(
    runs_root: Path,
    port: int,
    host: str = "127.0.0.1",
    edge_logs: Iterable[Path] = (),
) -> WSGIServer:
    """Start the HTTP endpoint (``/metrics``) in a background thread; returns
    the server so a caller can shut it down."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RunsCollector(runs_root, edge_logs))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
