"""Build everything the real-container test needs, offline, with podman.

No registry is reachable from these machines, so the bases are built here:
a Debian bookworm root file system from Debian's packages (debootstrap),
imported as the Python base; nginx and Prometheus images on top of it from
Debian's packages, standing in for the official images the compose files
name. The FedGAN images are built from the real Dockerfiles with the local
base and a wheelhouse made on the host (torch's CPU wheel from this disk).

Everything lands under ``build/containers/`` and in podman's image store, and
is reused by later runs: only what changed is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "build" / "containers"
PYTHON_BASE = "localhost/fedgan-test-python:bookworm"
NGINX_IMAGE = "localhost/fedgan-test-nginx:bookworm"
PROMETHEUS_IMAGE = "localhost/fedgan-test-prometheus:bookworm"
SERVER_IMAGE = "localhost/fedgan-server:test"
SITE_IMAGE = "localhost/fedgan-site:test"
FEDGAN_BASE = "localhost/fedgan-base:test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["CONTAINERS_CONF"] = str(HERE / "containers.conf")
    return e


def say(msg: str) -> None:
    print(f"[containers] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], *, timeout: float = 900, check: bool = True, **kw) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env(), timeout=timeout, check=False, **kw
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])}… exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env()).returncode == 0


def python_base() -> None:
    """Debian bookworm with Python 3.11 and venv, from Debian's packages."""
    if image_exists(PYTHON_BASE):
        return
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    say("debootstrap bookworm (python3, python3-venv)…")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        timeout=900,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", "import", "-", PYTHON_BASE],
        stdin=tar.stdout,
        env=env(),
        check=True,
        capture_output=True,
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def _build(tag: str, containerfile: Path, context: Path, *extra: str) -> None:
    say(f"building {tag}…")
    run(
        [
            "podman",
            "build",
            "--network",
            "host",
            "--layers",
            "-t",
            tag,
            "-f",
            str(containerfile),
            *extra,
            str(context),
        ],
        timeout=1500,
    )


def stand_in_images() -> None:
    """nginx and Prometheus from Debian's packages, behaving like the official
    images the compose files name (templates rendered by envsubst; prometheus
    as the entrypoint). Built every time, so a changed entrypoint is never
    left out: podman's layer cache makes an unchanged build a no-op."""
    for tag, containerfile in (
        (NGINX_IMAGE, "nginx.Containerfile"),
        (PROMETHEUS_IMAGE, "prometheus.Containerfile"),
    ):
        _build(tag, HERE / containerfile, HERE, "--build-arg", f"BASE_IMAGE={PYTHON_BASE}")


def wheelhouse() -> Path:
    """Every dependency as a wheel for Linux/CPython 3.11, made on the host
    (pip's cache and torch's CPU wheel on this disk): the image builds install
    with --no-index, so nothing in a build depends on the network."""
    wheels = WORK / "wheels"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [*deps, "setuptools>=68"]
    stamp = wheels / ".requirements.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return wheels
    say("wheelhouse (pip wheel)…")
    wheels.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), *wanted], timeout=1500)
    stamp.write_text(json.dumps(wanted))
    return wheels


def fedgan_images() -> None:
    """The real Dockerfiles, offline: FedGAN's base image once, on the local
    Debian base with the CPU torch, and both roles on it."""
    wheels = wheelhouse()
    _build(
        FEDGAN_BASE,
        ROOT / "deploy" / "images" / "base.Dockerfile",
        ROOT,
        "--volume",
        f"{wheels}:/wheels:ro",
        "--build-arg",
        f"BASE_IMAGE={PYTHON_BASE}",
        "--build-arg",
        "TORCH_INDEX_URL=",
        "--build-arg",
        "PIP_OPTIONS=--no-index --find-links /wheels",
    )
    role = ["--build-arg", f"FEDGAN_BASE={FEDGAN_BASE}"]
    _build(SERVER_IMAGE, ROOT / "server" / "Dockerfile", ROOT, *role)
    _build(SITE_IMAGE, ROOT / "client" / "Dockerfile", ROOT, *role)


def compose_env() -> dict[str, str]:
    e = env()
    e.update(
        {
            "NGINX_IMAGE": NGINX_IMAGE,
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "FEDGAN_SERVER_IMAGE": SERVER_IMAGE,
            "FEDGAN_SITE_IMAGE": SITE_IMAGE,
        }
    )
    return e
