"""The Flower app directory that `flwr run` turns into a FAB: configuration only.

The ClientApp that reads patient images is the `fedgan` package installed in
the site's image, never Python shipped by the operator, so the FAB we submit
carries one file, a `pyproject.toml` holding the app's name, version,
components and run-config defaults, taken from the project's own pyproject.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedgan.atomic import write_text_atomic

APP_CONFIG_ENV = "FEDGAN_APP_PYPROJECT"


def project_pyproject() -> Path:
    """The pyproject that defines the Flower app: `$FEDGAN_APP_PYPROJECT` (set
    in the images), else the one beside the package in a source checkout."""
    configured = os.environ.get(APP_CONFIG_ENV)
    path = (
        Path(configured) if configured else Path(__file__).resolve().parents[2] / "pyproject.toml"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; set {APP_CONFIG_ENV} to FedGAN's pyproject.toml"
        )
    return path


def app_config(pyproject: Path | None = None) -> dict[str, Any]:
    """The Flower-relevant part of the pyproject: nothing that builds or installs."""
    data = tomllib.loads((pyproject or project_pyproject()).read_text("utf-8"))
    project = data["project"]
    flwr_deps = [d for d in project.get("dependencies", []) if d.startswith("flwr")]
    return {
        "project": {
            "name": project["name"],
            "version": project["version"],
            "description": project.get("description", ""),
            "dependencies": flwr_deps,
        },
        "tool": {"flwr": {"app": data["tool"]["flwr"]["app"]}},
    }


def default_run_config(pyproject: Path | None = None) -> dict[str, Any]:
    return dict(app_config(pyproject)["tool"]["flwr"]["app"]["config"])


def stage_app_dir(dest: Path, pyproject: Path | None = None) -> Path:
    """Write a directory holding only the app's pyproject.toml; returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    extra = [p.name for p in dest.iterdir() if p.name != "pyproject.toml"]
    if extra:
        raise FileExistsError(f"{dest} must hold only pyproject.toml, found: {', '.join(extra)}")
    write_text_atomic(dest / "pyproject.toml", tomli_w.dumps(app_config(pyproject)))
    return dest


def fab_sha256(app_dir: Path) -> str:
    """The SHA-256 of the FAB `flwr run` builds from ``app_dir`` (Flower's
    build is deterministic), which sites under a hash-only policy approve."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def write_run_config(path: Path, values: dict[str, Any]) -> Path:
    """A TOML file of run-config overrides for `flwr run --run-config`."""
    write_text_atomic(path, tomli_w.dumps(values))
    return path
