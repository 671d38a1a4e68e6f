"""The operator's commands against a live deployment: `fedgan run` with a
federation.yaml (checked first, then submitted and followed), `--resume`,
`fedgan sites` and `fedgan status`. The run is conditioned on tabular
attributes, so that path runs through real sites too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedgan import pki
from fedgan.deploy.local import CONNECTION, LocalFederation, SiteSpec
from fedgan.silo.synth import synth_silo
from fedgan.site.approval import PolicyStore

pytestmark = pytest.mark.integration

YAML = """
run:
  dir: {run_dir}
  rounds: {rounds}
  min_sites: 2
model:
  image_size: 16
  channels: 3
  width: 8
  latent_dim: 16
  attributes: "age=0:100,sex=F|M"   # the synthetic silos carry attributes.csv
training:
  local_steps: 3
  batch_size: 4
privacy:
  noise_multiplier: 1.0
secure_aggregation:
  enabled: true
  timeout: 60
"""


def fedgan(*args: str, home) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedgan.cli", *args, "--flwr-home", str(home)]
        + (["--connection", CONNECTION] if args[0] in ("run", "status", "sites") else []),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_run_follow_resume_sites_and_status(tmp_path):
    certs = tmp_path / "certs"
    pki.init_ca(certs, "Operator test")
    pki.issue_aggregator(certs)
    sites = []
    for i, site in enumerate(("site-1", "site-2")):
        pki.issue_site(certs, site)
        silo = synth_silo(tmp_path / "silos" / site, "fundus", 12, seed=i, size=32)
        sites.append(SiteSpec(site, silo, "fundus"))
    run_dir = tmp_path / "runs" / "op"
    config = tmp_path / "federation.yaml"
    with LocalFederation(tmp_path / "deploy", certs, sites) as fed:
        for site in sites:  # two hospitals, each joining sums of two
            PolicyStore(fed.site_work_dir(site.site_id), site.site_id).update(min_sites=2)
        fed.start()
        home = fed.operator_home

        config.write_text(YAML.format(run_dir=run_dir, rounds=2).replace("rounds: 2", "rounds: 0"))
        bad = fedgan("run", "--config", str(config), home=home)
        assert bad.returncode == 1 and "run.rounds: 0 must be > 0" in bad.stderr
        assert "nothing submitted" in bad.stderr
        assert json.loads(fed.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"] == []

        config.write_text(YAML.format(run_dir=run_dir, rounds=2))
        first = fedgan("run", "--config", str(config), home=home)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "configuration only" in first.stdout
        rounds = [line for line in first.stdout.splitlines() if line.startswith("round ")]
        assert [r.split()[1] for r in rounds] == ["1/2", "2/2"], first.stdout
        assert all("sites 2/2" in r and "secure sum" in r for r in rounds)
        assert (run_dir / "checkpoint.pt").exists()

        config.write_text(YAML.format(run_dir=run_dir, rounds=3))
        again = fedgan("run", "--config", str(config), "--resume", str(run_dir), home=home)
        assert again.returncode == 0, again.stdout + again.stderr
        assert [
            line.split()[1] for line in again.stdout.splitlines() if line.startswith("round ")
        ] == ["3/3"]
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in metrics] == [1, 2, 3]

        listed = fedgan("sites", home=home)
        assert listed.returncode == 0, listed.stderr
        online = {int(line.split()[1]) for line in listed.stdout.splitlines() if "online" in line}
        assert online == set(fed.node_ids.values()), listed.stdout
        # Each node by the site name it was registered under, not only its id.
        named = {int(line.split()[1]): line.split()[3] for line in listed.stdout.splitlines()}
        assert named == {node: site for site, node in fed.node_ids.items()}, listed.stdout
        status = fedgan("status", home=home)
        assert status.returncode == 0, status.stderr
        assert status.stdout.lower().count("finished:completed") == 2, status.stdout
