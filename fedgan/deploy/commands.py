"""One function per process that builds its command line.

The local launcher and the container entrypoints both call these, so a flag
that is right in the tests is right in production.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fedgan import polling

# A hospital host must not phone home; every Flower process gets these.
PRIVATE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def venv_bin(name: str) -> str:
    """A console script installed beside the running interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found; run `make setup` first")
    return found


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )
    if found is None:
        raise FileNotFoundError("nginx not found; run `make setup` (installs Debian's nginx)")
    return found


def process_env(
    extra: dict[str, str] | None = None, path_first: list[Path] | None = None
) -> dict[str, str]:
    """The environment for a Flower process: ours, private, venv bin first on
    PATH (the SuperLink spawns `flower-superexec` by name), after ``path_first``."""
    env = dict(os.environ)
    env.update(PRIVATE_ENV)
    # Validated here, so a bad value stops the launch with one line rather
    # than each SuperExec dying with a traceback.
    env[polling.ENV] = str(polling.seconds(env))
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [*(str(p) for p in path_first or []), bindir, env.get("PATH", "")]
    )
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def superlink_command(
    *,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path,
    database: Path | None,
    node_auth: bool = True,
) -> list[str]:
    cmd = [
        venv_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        # Never `uv sync` what an operator's FAB declares: no network, no surprises.
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(
    *,
    superlink: str,
    ca: Path,
    node_key: Path,
    runtime_port: int,
    node_config: dict[str, str | int | float],
) -> list[str]:
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    return [
        venv_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(node_key),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--node-config",
        config,
        "--max-retries",
        "60",
        "--max-wait-time",
        "300",
    ]


def clientapp_shim(directory: Path) -> Path:
    """A directory whose ``flwr-clientapp`` is FedGAN's ClientApp runtime
    (`fedgan.site.runtime`): the SuperNode launches that name from its PATH,
    so with this directory first every task's app bundle is checked against
    the site's approval before Flower installs it."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "flwr-clientapp"
    target = venv_bin("fedgan-clientapp")
    if not (link.is_symlink() and os.readlink(link) == target):
        tmp = directory / ".flwr-clientapp.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    return directory


def clientapp_server_command(socket_path: Path) -> list[str]:
    """The site's warm ClientApp runtime (`fedgan.site.warm_runtime`),
    serving the SuperNode's ClientApp launches on ``socket_path``."""
    return [venv_bin("fedgan-clientapp"), "--serve", str(socket_path)]


def clientapp_socket(work_dir: Path) -> Path:
    """Where a site's warm runtime listens: in its work dir, unless that path
    is too long for a Unix socket (108 bytes), then in a private temp folder."""
    path = Path(work_dir) / "clientapp.sock"
    if len(str(path).encode()) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="fedgan-")) / "clientapp.sock"


def site_node_config(
    *,
    site_id: str,
    data_dir: Path,
    kind: str,
    work_dir: Path,
    signing_key: Path,
    signing_cert: Path,
    ca: Path,
    crl: Path,
    membership: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, str | int | float]:
    """The SuperNode's ``--node-config``: what the site decides (its silo, its
    keys), never the operator. Extra keys are the site's own settings
    (silo options, ε budget, device, precision)."""
    config: dict[str, str | int | float] = {
        "site-id": site_id,
        "data-dir": str(data_dir),
        "kind": kind,
        "work-dir": str(work_dir),
        "signing-key": str(signing_key),
        "signing-cert": str(signing_cert),
        "ca-cert": str(ca),
        "crl": str(crl),
        "membership": str(membership),
    }
    config.update(extra or {})
    return config


def flwr_register_command(public_key: Path, connection: str, name: str) -> list[str]:
    """Register a site's SuperNode key (node auth) on the SuperLink."""
    return [
        venv_bin("flwr"),
        "supernode",
        "register",
        str(public_key),
        connection,
        "--name",
        name,
        "--format",
        "json",
    ]


def registered_node_id(output: str) -> int | None:
    """The node id in `flwr supernode register --format json` output."""
    try:
        data = json.loads(output[output.index("{") :])
        return int(data["node-id"] if "node-id" in data else data["node_id"])
    except (ValueError, KeyError, TypeError):
        return None


def flwr_error(output: str) -> str:
    """The reason in a failed `flwr ... --format json` answer, one line."""
    try:
        message = str(json.loads(output[output.index("{") :])["error-message"])
    except (ValueError, KeyError, TypeError):
        message = output
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def connection_config(name: str, address: str, ca: Path) -> str:
    """FLWR_HOME/config.toml naming one SuperLink (Control API over TLS)."""
    return (
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca}"\n'
    )


def nginx_command(config: Path) -> list[str]:
    return [nginx_binary(), "-c", str(config), "-p", str(config.parent), "-g", "daemon off;"]


def nginx_test_command(config: Path) -> list[str]:
    return [nginx_binary(), "-t", "-q", "-c", str(config), "-p", str(config.parent)]


def nginx_reload_command(config: Path) -> list[str]:
    """Re-read config, certificates and CRL without dropping connections."""
    return [nginx_binary(), "-s", "reload", "-c", str(config), "-p", str(config.parent)]


def flwr_run_command(app_dir: Path, connection: str | None, run_config: Path) -> list[str]:
    """``connection`` None: the default SuperLink of the operator's FLWR_HOME."""
    return [
        venv_bin("flwr"),
        "run",
        str(app_dir),
        *([connection] if connection else []),
        "--run-config",
        str(run_config),
        "--stream",
    ]


def _toml_value(value: str | int | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
