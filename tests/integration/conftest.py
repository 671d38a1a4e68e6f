"""Integration fixtures: real flower-superlink, flower-supernode and nginx
processes on loopback with real certificates."""

from __future__ import annotations

import pytest

from fedgan import pki, timeline
from fedgan.demo import run_demo
from fedgan.deploy.local import LocalFederation, SiteSpec
from fedgan.silo.synth import synth_silo
from tests.federations import small_federation
from tests.proc import pids_in_groups


@pytest.fixture(scope="session")
def live_federation(tmp_path_factory):
    """One site connected through sidecar and edge, no run: for probing."""
    run_dir = tmp_path_factory.mktemp("mtls")
    certs = run_dir / "certs"
    pki.init_ca(certs, "Integration")
    pki.issue_aggregator(certs)
    pki.issue_site(certs, "site-1")
    silo = synth_silo(run_dir / "silo", "fundus", 4, seed=0, size=32)
    fed = LocalFederation(run_dir, certs, [SiteSpec("site-1", silo, "fundus")])
    with fed:
        fed.start()
        yield fed
    assert pids_in_groups({p.pid for p in fed.group.processes}) == []


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-site, 2-round federation (secure aggregation on, updates
    dumped), started from a (briefly) pretrained init and evaluated by
    site-1, as `make demo` does; shared by the tests that inspect a run's
    outputs."""
    out = tmp_path_factory.mktemp("runs")
    opts = small_federation(
        out,
        "it",
        rounds=2,
        images_per_site=24,
        dump_updates=True,
        pretrain=True,
        pretrain_steps=3,
        standin_images=48,
        evaluate=True,
    )
    lines: list[str] = []
    # Every process marks its steps (`fedgan.timeline`) beside the run
    # folder, for test_timeline.py; the variable reaches them all.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(timeline.ENV, str(out / "timeline.jsonl"))
        run_dir = run_demo(opts, say=lines.append)
    return run_dir, lines
