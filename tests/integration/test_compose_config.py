"""docker-compose itself (Debian's 1.29, no engine needed) validates every
compose file users run: the staging consortium, the site kit, and a kit as
`fedgan site-kit` hands it over; a kit without its required values fails."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from fedgan.deploy import kit

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SITE_KIT = ROOT / "deploy" / "site"


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: `make setup` installs Debian's docker-compose")
    return found


def _config(cwd: Path, files: list[str], env_file: Path | None = None) -> subprocess.Popen:
    argv = [_docker_compose()]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    for f in files:
        argv += ["-f", f]
    return subprocess.run(
        [*argv, "config", "-q"], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_docker_compose_validates_root_files():
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        done = _config(ROOT, files)
        assert done.returncode == 0, done.stderr


def test_docker_compose_validates_site_kit(tmp_path):
    env = tmp_path / ".env"
    env.write_text(
        (SITE_KIT / ".env.example")
        .read_text()
        .replace("DATA_DIR=/srv/imaging/fedgan-silo", f"DATA_DIR={tmp_path}")
    )
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        done = _config(SITE_KIT, files, env)
        assert done.returncode == 0, done.stderr


def test_site_kit_refuses_to_start_without_its_required_values(tmp_path):
    env = tmp_path / ".env"
    env.write_text("SITE_ID=\n")
    done = _config(SITE_KIT, ["docker-compose.yml"], env)
    assert done.returncode != 0
    assert (
        "AGGREGATOR_HOST" in done.stderr or "SITE_ID" in done.stderr or "DATA_DIR" in (done.stderr)
    )


def test_a_handed_over_kit_validates_once_its_env_names_a_silo(tmp_path):
    kit.staging_pki(tmp_path / "certs", 2)
    tarball = kit.site_kit(tmp_path / "certs", "site-2", SITE_KIT, tmp_path / "dist")
    tar_dir = tmp_path / "unpacked"
    with tarfile.open(tarball) as tar:
        tar.extractall(tar_dir, filter="fully_trusted")
    kit_dir = tar_dir / "fedgan-site-site-2"
    env = (kit_dir / ".env").read_text()
    (kit_dir / ".env").write_text(env.replace("/srv/imaging/fedgan-silo", str(tmp_path)))
    done = _config(kit_dir, ["docker-compose.yml"])
    assert done.returncode == 0, done.stderr


def _resolved(cwd: Path, files: list[str], env_file: Path | None = None) -> dict:
    argv = [_docker_compose()]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    for f in files:
        argv += ["-f", f]
    done = subprocess.run(
        [*argv, "--profile", "grafana", "--profile", "operator", "config"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_every_container_is_hardened(tmp_path):
    """Issue 33: as docker-compose itself resolves both files, every service
    has a read-only root filesystem, no capabilities, no-new-privileges and
    memory and pids limits; nginx runs as the keys' uid; Grafana's admin
    password is a secret; nothing on the metrics side shares a network with
    the SuperLink, and no two sites' sidecars share one."""
    env = tmp_path / ".env"
    env.write_text(
        (SITE_KIT / ".env.example")
        .read_text()
        .replace("DATA_DIR=/srv/imaging/fedgan-silo", f"DATA_DIR={tmp_path}")
    )
    root = _resolved(ROOT, ["docker-compose.yml"])["services"]
    kit = _resolved(SITE_KIT, ["docker-compose.yml"], env)["services"]
    for name, service in [*root.items(), *(("kit " + k, v) for k, v in kit.items())]:
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("mem_limit") and service.get("pids_limit"), name
        if "nginx" in service["image"]:
            assert service.get("user") == "10001:10001", name
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in root["grafana"]["environment"]
    near_superlink = set(root["superlink"]["networks"])
    for name in ("exporter", "prometheus", "grafana"):
        assert not near_superlink & set(root[name]["networks"]), name
    sidecars = [set(s["networks"]) for n, s in root.items() if n.endswith("-sidecar")]
    for i, a in enumerate(sidecars):
        for b in sidecars[i + 1 :]:
            assert not a & b
