"""What each FedGAN container runs: its command line, its checks, its health.

The aggregator and site images call `fedgan container <role>`; the role reads
its settings from the environment (set by the compose files and the site's
``.env``), finds its keys under ``/run/secrets`` (compose secrets, never baked
into an image or put in an environment variable) and builds its command line
with `fedgan.deploy.commands`, the same functions the local launcher uses.

Every problem a hospital's IT can cause (a missing secret, a silo that is not
mounted, a typo in ``.env``) stops the container with one line naming the
variable or file and the fix, before Flower starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedgan.atomic import write_text_atomic
from fedgan.deploy import commands
from fedgan.deploy.process import https_status, signal_tree, tcp_open
from fedgan.errors import FedGanError
from fedgan.site import warm_runtime

CONNECTION = "fedgan"
SECRETS = Path("/run/secrets")
SUPERLINK_PORT = 9092
SUPERNODE_RUNTIME_PORT = 9094
EXPORTER_PORT = 9464
SITE_KINDS = ("dicom", "fundus")
# Site settings a hospital may set in .env, and the node-config key each one
# becomes; everything else about a round comes from the operator's run config.
SITE_ENV_KEYS = {
    "FEDGAN_EPSILON_BUDGET": "epsilon-budget",
    "FEDGAN_DELTA": "delta",
    "FEDGAN_PRECISION": "precision",
}


class ContainerConfigError(FedGanError):
    """A container's environment or mounts are wrong; names the variable or file."""


@dataclass(frozen=True)
class Launch:
    """A process to start: its argv, environment additions, working directory,
    and directories to put first on its PATH."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    path_first: tuple[Path, ...] = ()


def _get(env: Mapping[str, str], key: str, default: str | None = None) -> str:
    value = env.get(key, "").strip() or default
    if value is None:
        raise ContainerConfigError(f"{key} is not set; set it in .env (see .env.example)")
    return value


def _secret(env: Mapping[str, str], name: str) -> Path:
    path = Path(_get(env, "FEDGAN_SECRETS", str(SECRETS))) / name
    if not path.is_file():
        raise ContainerConfigError(
            f"secret {path} is missing; list `{name}` under the service's `secrets:` and point "
            "it at the file from the site kit's certs/ (see the kit's README)"
        )
    if not os.access(path, os.R_OK):
        raise ContainerConfigError(
            f"secret {path} is not readable by uid {os.getuid()}; "
            f"run `sudo chown {os.getuid()} <its file in certs/>` on the host"
        )
    return path


def _writable_dir(env: Mapping[str, str], key: str, default: str) -> Path:
    path = Path(_get(env, key, default))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ContainerConfigError(f"{key}={path} cannot be created: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ContainerConfigError(
            f"{key}={path} is not writable by uid {os.getuid()}; "
            f"on the host: `sudo chown -R {os.getuid()} <the folder mounted there>`"
        )
    return path


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    raw = _get(env, key, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ContainerConfigError(f"{key}={raw!r} is not a TCP port (1-65535)")
    return int(raw)


def silo_options(raw: str) -> dict[str, str]:
    """``FEDGAN_SILO_OPTIONS="modality=CT window=lung"`` as node-config pairs."""
    options: dict[str, str] = {}
    for item in raw.split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ContainerConfigError(
                f"FEDGAN_SILO_OPTIONS item {item!r} is not key=value "
                '(e.g. FEDGAN_SILO_OPTIONS="modality=CT window=lung")'
            )
        options[key] = value
    return options


def supernode_launch(env: Mapping[str, str]) -> Launch:
    """The site container: a SuperNode that reaches the aggregator only
    through its nginx sidecar, with the silo mounted read-only."""
    site_id = _get(env, "FEDGAN_SITE_ID")
    kind = _get(env, "FEDGAN_KIND")
    if kind not in SITE_KINDS:
        raise ContainerConfigError(f"FEDGAN_KIND={kind!r}: use one of {', '.join(SITE_KINDS)}")
    data_dir = Path(_get(env, "FEDGAN_DATA_DIR", "/data"))
    if not data_dir.is_dir() or not os.access(data_dir, os.R_OK | os.X_OK):
        raise ContainerConfigError(
            f"FEDGAN_DATA_DIR={data_dir} is not a readable folder in the container; "
            "check DATA_DIR in .env and that the silo is readable by the container's user"
        )
    work_dir = _writable_dir(env, "FEDGAN_WORK_DIR", "/var/lib/fedgan")
    ca = _secret(env, "ca_cert")
    extra = silo_options(env.get("FEDGAN_SILO_OPTIONS", ""))
    for key, node_key in SITE_ENV_KEYS.items():
        if env.get(key, "").strip():
            extra[node_key] = env[key].strip()
    node_config = commands.site_node_config(
        site_id=site_id,
        data_dir=data_dir,
        kind=kind,
        work_dir=work_dir,
        signing_key=_secret(env, "signing_key"),
        signing_cert=_secret(env, "signing_cert"),
        ca=ca,
        crl=_secret(env, "crl"),
        membership=_secret(env, "membership"),
        extra=extra,
    )
    argv = commands.supernode_command(
        superlink=_get(env, "FEDGAN_SUPERLINK", "sidecar:9095"),
        ca=ca,
        node_key=_secret(env, "node_key"),
        runtime_port=SUPERNODE_RUNTIME_PORT,
        node_config=node_config,
    )
    flwr_home = work_dir / "flwr-home"
    # Every task's app bundle is checked against the site's approval first,
    # in a fork of the site's warm runtime (`start_warm_runtime`).
    shim = commands.clientapp_shim(work_dir / "bin")
    env = {
        "FLWR_HOME": str(flwr_home),
        warm_runtime.ENV: str(commands.clientapp_socket(work_dir)),
    }
    return Launch(argv, env, work_dir, (shim,))


def start_warm_runtime(launch: Launch) -> None:
    """The site's warm ClientApp runtime, a child of this process, which then
    becomes the SuperNode (`exec_launch`): it serves until the SuperNode is
    gone. Should it fail, each task runs in its own process, as before."""
    socket_path = launch.env.get(warm_runtime.ENV)
    if not socket_path:
        return
    subprocess.Popen(
        commands.clientapp_server_command(Path(socket_path)),
        env=commands.process_env(launch.env, path_first=list(launch.path_first)),
        cwd=launch.cwd,
    )


def superlink_launch(env: Mapping[str, str]) -> Launch:
    """The aggregator container: the SuperLink (TLS, node auth, state on the
    volume); its ServerApp runs as its subprocess, as in the local launcher."""
    state = _writable_dir(env, "FEDGAN_STATE_DIR", "/var/lib/fedgan")
    argv = commands.superlink_command(
        host="0.0.0.0",
        port=_port(env, "FEDGAN_SUPERLINK_PORT", SUPERLINK_PORT),
        cert=_secret(env, "server_cert"),
        key=_secret(env, "server_key"),
        ca=_secret(env, "ca_cert"),
        database=state / "superlink.db",
    )
    return Launch(argv, {"FLWR_HOME": str(state / "flwr-home")}, state)


def exporter_launch(env: Mapping[str, str]) -> Launch:
    state = Path(_get(env, "FEDGAN_STATE_DIR", "/var/lib/fedgan"))
    argv = [
        commands.venv_bin("fedgan"),
        "exporter",
        "--runs",
        str(state / "runs"),
        "--host",
        "0.0.0.0",
        "--port",
        str(_port(env, "FEDGAN_EXPORTER_PORT", EXPORTER_PORT)),
    ]
    edge_log = env.get("FEDGAN_EDGE_LOG", "").strip()
    if edge_log:
        argv += ["--edge-log", edge_log]
    return Launch(argv, {}, state)


def write_operator_home(env: Mapping[str, str], flwr_home: Path) -> Path:
    """FLWR_HOME naming the SuperLink on the aggregator's internal network."""
    address = _get(env, "FEDGAN_SUPERLINK", f"superlink:{SUPERLINK_PORT}")
    path = flwr_home / "config.toml"
    write_text_atomic(
        path, commands.connection_config(CONNECTION, address, _secret(env, "ca_cert"))
    )
    return path


def register_nodes(
    keys_dir: Path, flwr_home: Path, say: Callable[[str], None] = print
) -> dict[str, int | None]:
    """Register every ``<site-id>.pub`` in ``keys_dir`` (public keys only: the
    operator never holds a site's private key). A key the SuperLink already
    knows from its database is reported, not an error."""
    results: dict[str, int | None] = {}
    env = commands.process_env({"FLWR_HOME": str(flwr_home)})
    for pub in sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []:
        site_id = pub.stem
        argv = commands.flwr_register_command(pub, CONNECTION, site_id)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        node_id = commands.registered_node_id(done.stdout)
        results[site_id] = node_id
        if node_id is not None:
            say(f"registered site {site_id} as node {node_id}")
        else:
            # A restarted SuperLink keeps its database: "Public key already in use".
            why = commands.flwr_error(done.stdout + done.stderr)
            say(f"site {site_id} not registered now: {why}")
    return results


def run_superlink(env: Mapping[str, str], say: Callable[[str], None] = print) -> int:
    """Start the SuperLink, wait for its health endpoint, register the node
    keys mounted in FEDGAN_NODE_KEYS, then stay in the foreground until it
    exits; SIGTERM from the engine is passed on so it stops cleanly."""
    launch = superlink_launch(env)
    proc = subprocess.Popen(launch.argv, env=commands.process_env(launch.env), cwd=launch.cwd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: signal_tree(proc.pid, signal.Signals(s)))
    port = _port(env, "FEDGAN_SUPERLINK_PORT", SUPERLINK_PORT)
    ca = _secret(env, "ca_cert")
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _healthy(
        lambda: https_status("127.0.0.1", port, "/health", ca, "localhost") < 500
    ):
        if time.monotonic() > deadline:
            say("superlink did not answer /health within 120 s")
            proc.terminate()
            return proc.wait()
        time.sleep(0.5)
    if proc.poll() is None:
        home = Path(launch.env["FLWR_HOME"])
        write_text_atomic(
            home / "config.toml",
            commands.connection_config(CONNECTION, f"127.0.0.1:{port}", ca),
        )
        register_nodes(Path(_get(env, "FEDGAN_NODE_KEYS", "/etc/fedgan/nodes")), home, say)
        say(f"superlink serving on :{port} (Fleet via the edge; Control on this network only)")
    return proc.wait()


def _healthy(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (OSError, ValueError, IndexError):
        return False


def health(role: str, env: Mapping[str, str]) -> bool:
    """The compose healthcheck of each FedGAN service."""
    if role == "superlink":
        port = _port(env, "FEDGAN_SUPERLINK_PORT", SUPERLINK_PORT)
        ca = _secret(env, "ca_cert")
        return _healthy(lambda: https_status("127.0.0.1", port, "/health", ca, "localhost") < 500)
    if role == "supernode":
        return _healthy(lambda: tcp_open("127.0.0.1", SUPERNODE_RUNTIME_PORT))
    if role == "exporter":
        port = _port(env, "FEDGAN_EXPORTER_PORT", EXPORTER_PORT)

        def metrics() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
                return bool(r.status == 200)

        return _healthy(metrics)
    raise ContainerConfigError(f"unknown role {role!r}: use superlink, supernode or exporter")


def exec_launch(launch: Launch) -> None:
    """Replace this process, so the engine's signals reach Flower directly."""
    sys.stdout.flush()
    os.chdir(launch.cwd)
    os.execvpe(
        launch.argv[0],
        launch.argv,
        commands.process_env(launch.env, path_first=list(launch.path_first)),
    )
