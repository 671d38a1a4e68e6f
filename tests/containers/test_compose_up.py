"""The staging consortium for real: the root docker-compose.yml brought up
with podman-compose (sites on the CPU), one federated round with secure
aggregation through the real edge and sidecars, then the result, the
exporter's metrics and Prometheus's scrape of them are checked, and
everything is torn down.

Run by `make test-containers` (CI runs it after `make test`); it needs
podman, podman-compose, debootstrap and root, which `make container-deps`
installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fedgan.config.model import GanSpec
from fedgan.deploy.kit import staging_pki
from fedgan.pretrain import pretrain_to_file
from fedgan.silo.synth import synth_silo
from tests.containers import podman_env as pe

PROJECT = "fedgan-ci"
SERVICES = [
    "superlink",
    "edge",
    "exporter",
    "prometheus",
    *(f"site-{i}{part}" for i in (1, 2, 3) for part in ("-sidecar", "")),
]


def _compose(project: Path, *args: str, timeout: float = 600, check: bool = True) -> str:
    done = subprocess.run(
        ["podman-compose", "-p", PROJECT, "-f", "docker-compose.yml", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=pe.compose_env(),
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"podman-compose {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def _podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        env=pe.env(),
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def _name(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def _logs() -> str:
    out = []
    for service in SERVICES:
        text = _podman("logs", "--tail", "25", _name(service), check=False)
        out.append(f"--- {service}\n{text}")
    return "\n".join(out)


def _python(service: str, code: str) -> str:
    return _podman("exec", _name(service), "python3", "-c", code)


def _project(tmp: Path) -> Path:
    """A copy of the files the root compose file mounts, with its own PKI
    (staging, chowned to the containers' uid) and synthetic silos."""
    project = pe.WORK / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    shutil.copy(pe.ROOT / "docker-compose.yml", project)
    for sub in ("server", "client", "deploy"):
        shutil.copytree(pe.ROOT / sub, project / sub)  # symlinked templates become files
    staging_pki(project / "certs", 3)
    for i in (1, 2, 3):
        synth_silo(project / "data" / f"site-{i}", "fundus", 24, seed=i, size=32)
    config = yaml.safe_load((pe.ROOT / "deploy" / "federation.yaml").read_text())
    config["run"].update({"rounds": 1, "min_sites": 3, "round_timeout": 300})
    config["model"].update({"image_size": 16, "channels": 3, "width": 8, "latent_dim": 16})
    config["training"].update({"local_steps": 2, "batch_size": 8})
    # The run starts from a (briefly) pretrained init in the mounted deploy/inits.
    public = synth_silo(project / "public", "fundus", 16, seed=9, size=32, profile="public")
    spec = GanSpec(image_size=16, channels=3, latent_dim=16, width=8)
    init = pretrain_to_file(
        public,
        "fundus",
        spec,
        (),
        project / "deploy" / "inits" / "t.pt",
        steps=2,
        batch_size=8,
        say=lambda _: None,
    )
    (project / "init-sha256").write_text(init.weights_sha256)
    config["model"]["init"] = "inits/t.pt"
    (project / "deploy" / "federation.yaml").write_text(yaml.safe_dump(config))
    return project


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    if shutil.which("podman-compose") is None or shutil.which("debootstrap") is None:
        pytest.fail("podman-compose and debootstrap are needed: run `make container-deps`")
    pe.python_base()
    pe.stand_in_images()
    pe.fedgan_images()
    project = _project(tmp_path_factory.mktemp("unused"))
    _compose(project, "down", "-v", check=False)
    try:
        _compose(project, "up", "-d", *SERVICES)
        yield project
    finally:
        logs = _logs()
        (pe.WORK / "last-run-logs.txt").write_text(logs)
        _compose(project, "down", "-v", check=False)


def _wait(what: str, check, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        time.sleep(3)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s (last: {last})\n{_logs()}")


def _online_sites() -> int:
    out = _podman(
        "exec",
        "-e",
        "FLWR_HOME=/var/lib/fedgan/flwr-home",
        _name("superlink"),
        "flwr",
        "supernode",
        "list",
        "fedgan",
        "--format",
        "json",
        check=False,
    )
    try:
        nodes = json.loads(out[out.index("{") :]).get("nodes", [])
    except ValueError:
        return 0
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")


def test_one_round_through_edge_and_sidecars(consortium):
    project = consortium

    # Every service's compose healthcheck passes. (podman runs healthchecks
    # from systemd timers, absent here, so the test runs each one itself.)
    def healthy() -> list[str]:
        failing = [
            s
            for s in SERVICES
            if subprocess.run(
                ["podman", "healthcheck", "run", _name(s)],
                env=pe.env(),
                capture_output=True,
                check=False,
            ).returncode
            != 0
        ]
        if failing:
            raise AssertionError(f"unhealthy: {failing}")
        return SERVICES

    _wait("all services healthy", healthy, 240)
    _wait("3 sites online through their sidecars and the edge", lambda: _online_sites() == 3, 180)

    out = _compose(
        project,
        "run",
        "--rm",
        "--no-deps",
        "operator",
        "run",
        "--config",
        "/etc/fedgan/federation.yaml",
        timeout=900,
    )
    (pe.WORK / "operator-run.txt").write_text(out)
    assert "round 1/1" in out and "secure sum" in out, out[-3000:]

    runs = _podman("exec", _name("superlink"), "ls", "/var/lib/fedgan/runs").split()
    run_id = next(r for r in runs if r.startswith("flower-"))
    metrics = [
        json.loads(line)
        for line in _podman(
            "exec", _name("superlink"), "cat", f"/var/lib/fedgan/runs/{run_id}/metrics.jsonl"
        ).splitlines()
        if line.strip()
    ]
    rounds = [m for m in metrics if m.get("round") == 1]
    assert rounds and len(rounds[-1]["sites"]) == 3 and "secagg" in rounds[-1], metrics
    assert "generator.pt" in _podman(
        "exec", _name("superlink"), "ls", f"/var/lib/fedgan/runs/{run_id}"
    )
    # It started from the init mounted at /etc/fedgan/inits (every site checked round 1's
    # model against the declared hash before training).
    recorded = json.loads(
        _podman("exec", _name("superlink"), "cat", f"/var/lib/fedgan/runs/{run_id}/run-config.json")
    )
    assert recorded["model-init"] == "/etc/fedgan/inits/t.pt"
    assert recorded["model-init-record"]["weights_sha256"] == (project / "init-sha256").read_text()

    # The exporter serves the run's round metric…
    scraped = _python(
        "exporter",
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())",
    )
    assert f'fedgan_round{{run="{run_id}"}} 1.0' in scraped, scraped[-2000:]
    # …and Prometheus, on the internal network, scrapes it.
    query = (
        "import urllib.request, json; print(json.dumps(json.load(urllib.request.urlopen("
        "'http://prometheus:9090/api/v1/query?query=fedgan_round', timeout=5))))"
    )
    result = _wait(
        "Prometheus has fedgan_round",
        lambda: json.loads(_python("exporter", query))["data"]["result"],
        90,
    )
    assert any(r["metric"].get("run") == run_id and r["value"][1] == "1" for r in result)

    # The edge saw each site's client certificate verified.
    edge_log = _podman("exec", _name("edge"), "cat", "/var/log/fedgan/edge-access.log")
    for i in (1, 2, 3):
        assert f"CN=site-{i}" in edge_log and "verify=SUCCESS" in edge_log

    # Hardening (issue 33): every service's first process runs with no
    # capabilities and no-new-privileges, under a memory limit, on a
    # read-only root filesystem; FedGAN's and nginx's as uid 10001.
    for service in SERVICES:
        status = _podman("exec", _name(service), "cat", "/proc/1/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert int(fields["CapEff"].strip(), 16) == 0, (service, fields["CapEff"])
        assert fields["NoNewPrivs"].strip() == "1", service
        if service != "prometheus":
            assert fields["Uid"].split()[1] == "10001", (service, fields["Uid"])
        host = json.loads(_podman("inspect", _name(service)))[0]["HostConfig"]
        assert host["ReadonlyRootfs"] and 0 < host["Memory"] <= 8 * 2**30, service
        writable = subprocess.run(
            ["podman", "exec", _name(service), "touch", "/etc/fedgan-was-here"],
            env=pe.env(),
            capture_output=True,
            check=False,
        )
        assert writable.returncode != 0, f"{service}: its root filesystem is writable"

    # Networks: another site's sidecar cannot even reach site-1's, only the
    # edge; the metrics side (exporter) cannot reach the SuperLink's Control
    # API, which has no authentication of its own; the edge (control) can.
    def connects(service: str, host: str, port: int) -> bool:
        probe = f"exec 3<>/dev/tcp/{host}/{port}"
        return (
            subprocess.run(
                ["podman", "exec", _name(service), "bash", "-c", probe],
                env=pe.env(),
                capture_output=True,
                timeout=30,
                check=False,
            ).returncode
            == 0
        )

    assert connects("site-2-sidecar", "edge", 9443)
    assert not connects("site-2-sidecar", "site-1-sidecar", 9095)
    assert connects("edge", "superlink", 9092)
    assert not connects("exporter", "superlink", 9092)
    assert not connects("prometheus", "superlink", 9092)

    # The site's warm ClientApp runtime serves beside the SuperNode (each task
    # a fork of it), on its socket in the work dir, mode 0600.
    cmdlines = _podman(
        "exec", _name("site-1"), "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
    )
    assert "fedgan-clientapp --serve /var/lib/fedgan/clientapp.sock" in cmdlines, cmdlines
    mode = _podman("exec", _name("site-1"), "stat", "-c", "%a", "/var/lib/fedgan/clientapp.sock")
    assert mode.strip() == "600"

    # The silo is read-only inside the site container, and it runs as uid 10001.
    assert _podman("exec", _name("site-1"), "id", "-u").strip() == "10001"
    denied = subprocess.run(
        ["podman", "exec", _name("site-1"), "touch", "/data/x"],
        env=pe.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert denied.returncode != 0 and "Read-only" in denied.stderr
    # The site's privacy ledger is on its own volume.
    ledger = _podman("exec", _name("site-1"), "cat", "/var/lib/fedgan/privacy-ledger.jsonl")
    entries = [json.loads(line) for line in ledger.splitlines() if line.strip()]
    # Created when the container first started (fedgan site init), then the round.
    assert [(e["type"], e.get("round")) for e in entries] == [
        ("created", None),
        ("spend", 1),
        ("complete", 1),
    ]
    assert entries[1]["epsilon_after"] > 0 and entries[1]["prev"] != entries[2]["prev"]
