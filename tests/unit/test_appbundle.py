"""The config-only app bundle (FAB): what `flwr run` ships carries configuration, never code."""

import io
import tomllib
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk

from fedgan.config.appbundle import app_config, project_pyproject, stage_app_dir


def test_fab_carries_configuration_only(tmp_path):
    app_dir = stage_app_dir(tmp_path / "app")
    fab = build_fab_from_disk(app_dir)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert not [n for n in names if n.endswith(".py")], names
    assert "pyproject.toml" in names
    staged = tomllib.loads((app_dir / "pyproject.toml").read_text())
    root = tomllib.loads(project_pyproject().read_text())
    assert staged["tool"]["flwr"]["app"] == root["tool"]["flwr"]["app"]
    assert staged["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedgan.aggregator.server_app:app",
        "clientapp": "fedgan.site.client_app:app",
    }
    assert "build-system" not in staged


def test_staging_refuses_a_directory_with_code(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "evil.py").write_text("print('x')")
    with pytest.raises(FileExistsError, match=r"evil\.py"):
        stage_app_dir(tmp_path / "app")


def test_app_config_keeps_only_flwr_dependency():
    deps = app_config()["project"]["dependencies"]
    assert deps and all(d.startswith("flwr") for d in deps)
