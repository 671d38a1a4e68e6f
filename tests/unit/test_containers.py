"""The container deployment's rules, read off the files users run: compose
files, Dockerfiles, the site kit, and the container entrypoints' command
lines against the local launcher's. (docker-compose itself validates the
files in tests/integration/test_compose_config.py.)"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedgan import pki
from fedgan.cli import app
from fedgan.deploy import container, kit
from fedgan.deploy.container import ContainerConfigError
from fedgan.deploy.local import LocalFederation, SiteSpec

ROOT = Path(__file__).resolve().parents[2]
SITE_KIT = ROOT / "deploy" / "site"
ROOT_COMPOSE = ROOT / "docker-compose.yml"
KIT_COMPOSE = SITE_KIT / "docker-compose.yml"
FEDGAN_IMAGES = ("FEDGAN_SERVER_IMAGE", "FEDGAN_SITE_IMAGE")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _services(path: Path) -> dict[str, dict]:
    return _load(path)["services"]


def _runs_fedgan(svc: dict) -> bool:
    return any(name in str(svc.get("image", "")) for name in FEDGAN_IMAGES)


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _long_running(services: dict[str, dict]) -> dict[str, dict]:
    """Everything but the operator's one-shot `docker compose run` tool."""
    return {n: s for n, s in services.items() if "operator" not in s.get("profiles", [])}


# -- the rules ------------------------------------------------------------------


@pytest.mark.parametrize("path", [ROOT_COMPOSE, KIT_COMPOSE], ids=["root", "site-kit"])
def test_every_service_has_a_healthcheck_and_a_restart_policy(path):
    for name, svc in _long_running(_services(path)).items():
        test = (svc.get("healthcheck") or {}).get("test")
        assert test and not (svc["healthcheck"].get("disable")), f"{name} has no healthcheck"
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name


@pytest.mark.parametrize("path", [ROOT_COMPOSE, KIT_COMPOSE], ids=["root", "site-kit"])
def test_silos_are_mounted_read_only(path):
    silos = [
        (name, vol)
        for name, svc in _services(path).items()
        for vol in svc.get("volumes", [])
        if isinstance(vol, str) and re.search(r":/data(:ro)?$", vol)
    ]
    assert silos, "no silo mount found"
    for name, vol in silos:
        assert vol.endswith(":ro"), f"{name}: {vol} must be read-only"


@pytest.mark.parametrize("path", [ROOT_COMPOSE, KIT_COMPOSE], ids=["root", "site-kit"])
def test_keys_reach_containers_only_as_secrets(path):
    doc = _load(path)
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            host = str(vol).split(":")[0]
            assert not re.search(r"\.key$|node_key$|/ca/|certs/sites", host), (
                f"{name} bind-mounts key material {host}; use secrets"
            )
        for key, value in _env(svc).items():
            assert "PRIVATE KEY" not in str(value), f"{name}: {key} holds a key"
            if re.search(r"\.key$|node_key$", str(value)):
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
    key_secrets = [s for s in doc["secrets"] if re.search(r"key$", s)]
    assert key_secrets
    for secret in key_secrets:
        assert set(doc["secrets"][secret]) == {"file"}, secret


def test_only_the_edge_publishes_a_port_at_the_aggregator():
    services = _services(ROOT_COMPOSE)
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert set(published) <= {"edge", "grafana"}
    assert "edge" in published
    # Grafana is optional (profile) and on loopback only.
    assert services["grafana"]["profiles"] == ["grafana"]
    assert all(p.startswith("127.0.0.1:") for p in published.get("grafana", []))


def test_no_port_is_published_at_a_site():
    assert not any(s.get("ports") for s in _services(KIT_COMPOSE).values())


def test_control_api_and_supernodes_sit_on_internal_networks():
    root = _load(ROOT_COMPOSE)
    nets = root["networks"]
    assert nets["control"]["internal"] is True
    assert root["services"]["superlink"]["networks"] == ["control"]
    for i in (1, 2, 3):
        assert nets[f"site-{i}"]["internal"] is True
        assert root["services"][f"site-{i}"]["networks"] == [f"site-{i}"]
    site = _load(KIT_COMPOSE)
    assert site["networks"]["site"]["internal"] is True
    assert site["services"]["supernode"]["networks"] == ["site"]
    # The edge proxies the Fleet API only (the Control API never passes it).
    template = (ROOT / "server" / "edge.conf.template").read_text()
    assert re.findall(r"location\s+(\S+)\s*\{", template) == ["/v1/fleet/", "/"]


@pytest.mark.parametrize("path", [ROOT_COMPOSE, KIT_COMPOSE], ids=["root", "site-kit"])
def test_flower_telemetry_and_update_checks_are_off(path):
    for name, svc in _services(path).items():
        if _runs_fedgan(svc):
            env = _env(svc)
            assert env.get("FLWR_TELEMETRY_ENABLED") == "0", name
            assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", name
            assert "user" not in svc, f"{name} overrides the image's non-root user"


def test_gpu_overrides_reserve_nvidia_gpus_for_sites_only():
    for path, sites in (
        (ROOT / "docker-compose.gpu.yml", {"site-1", "site-2", "site-3"}),
        (SITE_KIT / "docker-compose.gpu.yml", {"supernode"}),
    ):
        services = _services(path)
        assert set(services) == sites
        for svc in services.values():
            (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            assert "GPU_COUNT" in str(device["count"])
    assert "GPU_COUNT=" in (SITE_KIT / ".env.example").read_text()


def test_env_example_names_every_variable_the_kit_needs():
    text = (SITE_KIT / ".env.example").read_text()
    keys = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and line[0] != "#"}
    assert {
        "SITE_ID",
        "AGGREGATOR_HOST",
        "DATA_DIR",
        "CERT_DIR",
        "GPU_COUNT",
        "EPSILON_BUDGET",
    } <= keys
    used = set(re.findall(r"\$\{([A-Z_]+)", KIT_COMPOSE.read_text()))
    assert used <= keys, f"not in .env.example: {used - keys}"


# -- Dockerfiles ------------------------------------------------------------------

BASE_DOCKERFILE = ROOT / "deploy" / "images" / "base.Dockerfile"
DOCKERFILES = [ROOT / "server" / "Dockerfile", ROOT / "client" / "Dockerfile"]


def test_the_base_image_runs_as_non_root_from_a_pinned_base():
    text = BASE_DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == str(kit.CONTAINER_UID)
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    tag = base.rsplit(":", 1)[1]
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    for src in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert not re.search(r"cert|key|runs|data|\.env", src), src
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "FLWR_DISABLE_UPDATE_CHECK=1" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=["server", "client"])
def test_each_role_is_only_its_role_on_the_shared_base(path):
    """One install, in the base: a role adds its command and ports, never a
    package, a file or another user."""
    text = path.read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${FEDGAN_BASE}"]
    (base,) = re.findall(r"^ARG FEDGAN_BASE=(\S+)", text, re.M)
    assert base.startswith("localhost/fedgan-base:")
    instructions = {ln.split()[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert instructions <= {"ARG", "FROM", "ENV", "EXPOSE", "ENTRYPOINT", "CMD"}, instructions


def test_dockerignore_keeps_certs_runs_and_data_out():
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "the context must start from nothing"
    included = [ln[1:] for ln in lines if ln.startswith("!")]
    assert set(included) == {"pyproject.toml", "README.md", "fedgan/"}


def test_nginx_templates_are_the_package_templates():
    pkg = ROOT / "fedgan" / "deploy" / "templates"
    for copy, name in (
        (ROOT / "server" / "edge.conf.template", "edge.conf.template"),
        (ROOT / "client" / "sidecar.conf.template", "sidecar.conf.template"),
        (SITE_KIT / "sidecar.conf.template", "sidecar.conf.template"),
    ):
        assert copy.read_text() == (pkg / name).read_text(), copy


# -- entrypoints: same command lines as the local launcher -------------------------


def _secrets(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    for n in names:
        (d / n).write_text("x")
    return d


SITE_SECRETS = ["ca_cert", "crl", "membership", "node_key", "signing_key", "signing_cert"]


def _site_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {
        "FEDGAN_SITE_ID": "site-1",
        "FEDGAN_KIND": "dicom",
        "FEDGAN_DATA_DIR": str(data),
        "FEDGAN_WORK_DIR": str(tmp_path / "work"),
        "FEDGAN_SECRETS": str(tmp_path / "secrets"),
        "FEDGAN_SILO_OPTIONS": "modality=CT window=lung",
        "FEDGAN_EPSILON_BUDGET": "4",
    }
    env.update(extra)
    return env


def _options(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def _node_config_keys(argv: list[str]) -> list[str]:
    value = argv[argv.index("--node-config") + 1]
    return [item.split("=", 1)[0] for item in value.split(" ") if "=" in item]


def test_site_entrypoint_builds_the_local_launchers_command(tmp_path):
    _secrets(tmp_path, SITE_SECRETS)
    in_container = container.supernode_launch(_site_env(tmp_path)).argv

    certs = tmp_path / "certs"
    pki.init_ca(certs, "T")
    pki.issue_site(certs, "site-1")
    fed = LocalFederation(
        tmp_path / "run",
        certs,
        [
            SiteSpec(
                "site-1",
                tmp_path / "data",
                "dicom",
                node_config={"modality": "CT", "window": "lung", "epsilon-budget": "4"},
            )
        ],
    )
    local = fed.supernode_argv(fed.sites[0], 9095, 9094)

    assert Path(in_container[0]).name == Path(local[0]).name == "flower-supernode"
    assert _options(in_container) == _options(local)
    assert _node_config_keys(in_container) == _node_config_keys(local)
    # The differences are the addresses and the paths, nothing else.
    assert in_container[in_container.index("--superlink") + 1] == "sidecar:9095"
    assert in_container[in_container.index("--auth-supernode-private-key") + 1] == str(
        tmp_path / "secrets" / "node_key"
    )


def test_aggregator_entrypoint_builds_the_local_launchers_command(tmp_path):
    _secrets(tmp_path, ["ca_cert", "server_cert", "server_key"])
    env = {"FEDGAN_SECRETS": str(tmp_path / "secrets"), "FEDGAN_STATE_DIR": str(tmp_path / "s")}
    in_container = container.superlink_launch(env)
    fed = LocalFederation(tmp_path / "run", tmp_path / "certs", [])
    local = fed.superlink_argv(9092, tmp_path / "db")
    assert _options(in_container.argv) == _options(local)
    assert "--enable-supernode-auth" in in_container.argv
    assert in_container.argv[in_container.argv.index("--host") + 1] == "0.0.0.0"
    assert in_container.cwd == tmp_path / "s"  # the ServerApp writes runs/ on the volume


def test_site_entrypoint_cli_prints_the_command(tmp_path, monkeypatch):
    _secrets(tmp_path, SITE_SECRETS)
    for k, v in _site_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(app, ["container", "supernode", "--print"])
    assert result.exit_code == 0, result.output
    argv = json.loads(result.output)
    assert 'epsilon-budget="4"' in argv[argv.index("--node-config") + 1]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"FEDGAN_SITE_ID": ""}, "FEDGAN_SITE_ID"),
        ({"FEDGAN_KIND": "xray"}, "FEDGAN_KIND"),
        ({"FEDGAN_DATA_DIR": "/nonexistent/silo"}, "FEDGAN_DATA_DIR"),
        ({"FEDGAN_SILO_OPTIONS": "modality"}, "FEDGAN_SILO_OPTIONS"),
    ],
)
def test_site_entrypoint_names_the_bad_setting(tmp_path, change, named):
    _secrets(tmp_path, SITE_SECRETS)
    with pytest.raises(ContainerConfigError) as err:
        container.supernode_launch(_site_env(tmp_path, **change))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_site_entrypoint_names_a_missing_secret(tmp_path):
    _secrets(tmp_path, [s for s in SITE_SECRETS if s != "signing_key"])
    with pytest.raises(ContainerConfigError, match=r"secrets/signing_key is missing"):
        container.supernode_launch(_site_env(tmp_path))


def test_superlink_port_setting_is_checked(tmp_path):
    _secrets(tmp_path, ["ca_cert", "server_cert", "server_key"])
    env = {
        "FEDGAN_SECRETS": str(tmp_path / "secrets"),
        "FEDGAN_STATE_DIR": str(tmp_path / "s"),
        "FEDGAN_SUPERLINK_PORT": "90x",
    }
    with pytest.raises(ContainerConfigError, match="FEDGAN_SUPERLINK_PORT"):
        container.superlink_launch(env)


# -- staging PKI and the site kit -------------------------------------------------


def test_staging_pki_is_idempotent_and_exports_public_node_keys(tmp_path):
    first = kit.staging_pki(tmp_path / "certs", 2, ["fed.example.org"])
    ca = (tmp_path / "certs" / "ca" / "ca.crt").read_bytes()
    password = tmp_path / "certs" / "grafana" / "admin-password"
    first_password = password.read_text()
    second = kit.staging_pki(tmp_path / "certs", 2)
    assert (tmp_path / "certs" / "ca" / "ca.crt").read_bytes() == ca
    # Grafana's admin password: random, kept, in a folder only the owner opens.
    assert password.read_text() == first_password and len(first_password) >= 32
    assert first_password != "admin"
    assert kit.staging_pki(tmp_path / "other", 1) and (
        (tmp_path / "other" / "grafana" / "admin-password").read_text() != first_password
    )
    assert password.parent.stat().st_mode & 0o077 == 0
    assert first.sites == second.sites == ["site-1", "site-2"]
    pubs = sorted(p.name for p in first.node_keys.iterdir())
    assert pubs == ["site-1.pub", "site-2.pub"]
    assert all(b"PRIVATE" not in p.read_bytes() for p in first.node_keys.iterdir())
    sans = pki.inspect_cert(tmp_path / "certs" / "aggregator" / "server.crt")["sans"]
    assert {"edge", "superlink", "fed.example.org"} <= set(sans)
    sidecar = pki.inspect_cert(tmp_path / "certs" / "sites" / "site-1" / "sidecar.crt")["sans"]
    assert "site-1-sidecar" in sidecar and "sidecar" in sidecar
    if os.geteuid() == 0:
        assert (tmp_path / "certs" / "aggregator" / "server.key").stat().st_uid == 10001
    else:
        assert first.needs_chown


def test_site_kit_holds_one_sites_keys_owned_by_the_container_user(tmp_path):
    kit.staging_pki(tmp_path / "certs", 2)
    tarball = kit.site_kit(tmp_path / "certs", "site-2", SITE_KIT, tmp_path / "dist")
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
        env = tar.extractfile("fedgan-site-site-2/.env").read().decode()
        key = tar.extractfile("fedgan-site-site-2/certs/signing.key").read()
    names = set(members)
    assert "fedgan-site-site-2/docker-compose.yml" in names
    assert "fedgan-site-site-2/state" in names
    certs = {n.rsplit("/", 1)[1] for n in names if "/certs/" in n}
    assert certs == {
        "ca.crt",
        "crl.pem",
        "membership.json",
        "client.crt",
        "client.key",
        "sidecar.crt",
        "sidecar.key",
        "node_key",
        "node_key.pub",
        "signing.crt",
        "signing.key",
    }
    assert key == (tmp_path / "certs" / "sites" / "site-2" / "signing.key").read_bytes()
    assert all(m.uid == 10001 and m.gid == 10001 for m in members.values())
    for n in ("client.key", "sidecar.key", "node_key", "signing.key"):
        assert members[f"fedgan-site-site-2/certs/{n}"].mode == 0o400
    assert "SITE_ID=site-2" in env.splitlines()


def test_site_kit_refuses_an_unknown_site(tmp_path):
    kit.staging_pki(tmp_path / "certs", 1)
    with pytest.raises(kit.KitError, match="issue-site site-9"):
        kit.site_kit(tmp_path / "certs", "site-9", SITE_KIT, tmp_path / "dist")
    assert not (tmp_path / "dist" / "fedgan-site-site-9.tar.gz").exists()


def test_flwr_refusal_is_reported_in_one_line():
    from fedgan.deploy.commands import flwr_error

    answer = (
        '{\n  "success": false,\n  "error-message": "Using SuperLink: fedgan (127.0.0.1:1)'
        '\\n\\n[code: 23] Public key already in use."\n}\n'
    )
    assert flwr_error(answer) == "[code: 23] Public key already in use."
    assert flwr_error("boom\nlast words\n") == "last words"
