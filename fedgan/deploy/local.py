"""A whole consortium as real processes on loopback.

    operator CLI --TLS--> flower-superlink (Control, Fleet, Runtime APIs)
                                ^ TLS
                          nginx edge      verifies the site certificate and CRL; /v1/fleet/ only
                                ^ mutual TLS
                          nginx sidecar   presents the site's client certificate
                                ^ TLS
                          flower-supernode + ClientApp (node key)

Every process is the one the containers run, with the command line built by
`fedgan.deploy.commands`. Ports are found free at start; every process logs to
``<run-dir>/logs/``; ``deployment.json`` maps roles, pids, addresses and
certificate files once everything is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgan.atomic import write_text_atomic
from fedgan.deploy import commands
from fedgan.deploy.nginx import (
    EdgeSettings,
    SidecarSettings,
    render_edge,
    render_sidecar,
    write_nginx_config,
)
from fedgan.deploy.process import (
    ProcessFailed,
    ProcessGroup,
    free_port,
    https_status,
    tail,
    tcp_open,
)
from fedgan.pki import PkiPaths, list_members, write_node_bindings
from fedgan.site import warm_runtime
from fedgan.site import work_dir as site_setup

CONNECTION = "fedgan-local"
LOOPBACK = "127.0.0.1"
TLS_NAME = "localhost"


@dataclass(frozen=True)
class SiteSpec:
    site_id: str
    data_dir: Path
    kind: str
    # Extra SuperNode node config: the site's silo options (modality, window…).
    node_config: dict[str, str] = field(default_factory=dict)
    # Extra environment of the site's SuperNode (e.g. FEDGAN_DEVICE, FEDGAN_FAULT).
    env: dict[str, str] = field(default_factory=dict)


class LocalFederation:
    """Use as a context manager (which always stops every process), then
    `start()` and `run()`."""

    def __init__(
        self,
        run_dir: Path,
        pki_root: Path,
        sites: list[SiteSpec],
        *,
        start_timeout: float = 90.0,
        warm_clientapps: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.warm_clientapps = warm_clientapps
        self.pki = PkiPaths(Path(pki_root).resolve())
        self.sites = sites
        self.start_timeout = start_timeout
        self.logs = self.run_dir / "logs"
        self.group = ProcessGroup(self.logs)
        self.operator_home = self.run_dir / "operator" / "flwr-home"
        self.node_ids: dict[str, int] = {}
        self.superlink_port = 0
        self.edge_port = 0
        for site in sites:  # as hospital IT does once: `fedgan site init`
            site_setup.ensure(self.site_work_dir(site.site_id), site.site_id)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.group.stop_all()

    def start(self, progress: Callable[[str], None] = lambda _msg: None) -> None:
        self._start_superlink()
        progress(f"superlink     https://{LOOPBACK}:{self.superlink_port}  (TLS, node auth)")
        self._start_edge()
        progress(f"edge          https://{LOOPBACK}:{self.edge_port}  (mutual TLS, CRL)")
        self._write_operator_config()
        list_members(self.pki.root, [s.site_id for s in self.sites])
        for site in self.sites:
            self.node_ids[site.site_id] = self._register(site.site_id)
        for site in self.sites:
            sidecar_port = self._start_sidecar(site)
            self._start_supernode(site, sidecar_port)
            progress(
                f"{site.site_id:<13} sidecar https://{LOOPBACK}:{sidecar_port} -> edge; "
                f"supernode node {self.node_ids[site.site_id]}"
            )
        self._wait_sites_online()
        self.write_deployment()

    # -- processes -----------------------------------------------------------

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return commands.process_env({"FLWR_HOME": str(flwr_home)})

    def superlink_argv(self, port: int, database: Path | None) -> list[str]:
        return commands.superlink_command(
            host=LOOPBACK,
            port=port,
            cert=self.pki.server_cert,
            key=self.pki.server_key,
            ca=self.pki.ca_cert,
            database=database,
        )

    def _start_superlink(self) -> None:
        self.superlink_port = free_port()
        state = self.run_dir / "aggregator"
        state.mkdir(parents=True, exist_ok=True)
        # Flower's state in memory, new each start (a resumed demo registers
        # its sites' node keys afresh). Its SQLite file state waits at most 5 s
        # for a lock: with 30 sites' processes on one 2-core host, a heartbeat
        # write failed with "database is locked" and the run was stopped
        # (issue 34). A deployed SuperLink keeps its file (`container.py`).
        argv = self.superlink_argv(self.superlink_port, None)
        proc = self.group.start(
            "superlink",
            "flower-superlink (Fleet, Control and Runtime APIs)",
            argv,
            env=self._env(state / "flwr-home"),
            cwd=state,
            address=f"https://{LOOPBACK}:{self.superlink_port}",
            files={
                "certificate": str(self.pki.server_cert),
                "key": str(self.pki.server_key),
                "ca": str(self.pki.ca_cert),
            },
        )
        self.group.wait_until(
            proc,
            lambda: (
                https_status(LOOPBACK, self.superlink_port, "/health", self.pki.ca_cert, TLS_NAME)
                < 500
            ),
            timeout=self.start_timeout,
        )

    def _start_nginx(
        self, name: str, role: str, conf: str, port: int, files: dict[str, str]
    ) -> None:
        workdir = self.run_dir / "nginx" / name
        config = write_nginx_config(workdir, conf)
        check = subprocess.run(
            commands.nginx_test_command(config), capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise ProcessFailed(f"{name} ({role}) has an invalid config {config}:\n{check.stderr}")
        proc = self.group.start(
            name,
            role,
            commands.nginx_command(config),
            env=commands.process_env(),
            address=f"https://{LOOPBACK}:{port}",
            files={"config": str(config), **files},
        )
        self.group.wait_until(proc, lambda: tcp_open(LOOPBACK, port), timeout=self.start_timeout)

    def _start_edge(self) -> None:
        self.edge_port = free_port()
        settings = EdgeSettings(
            listen=f"{LOOPBACK}:{self.edge_port}",
            superlink_addr=f"{LOOPBACK}:{self.superlink_port}",
            superlink_tls_name=TLS_NAME,
            server_cert=self.pki.server_cert,
            server_key=self.pki.server_key,
            ca_cert=self.pki.ca_cert,
            crl=self.pki.crl,
            node_bindings=write_node_bindings(self.pki.root),
        )
        self._start_nginx(
            "edge",
            "nginx edge (mutual TLS, CRL, /v1/fleet/ only)",
            render_edge(settings, self.logs / "edge-access.log"),
            self.edge_port,
            {
                "certificate": str(self.pki.server_cert),
                "key": str(self.pki.server_key),
                "client_ca": str(self.pki.ca_cert),
                "crl": str(self.pki.crl),
            },
        )

    def _start_sidecar(self, site: SiteSpec) -> int:
        port = free_port()
        paths = self.pki.site(site.site_id)
        settings = SidecarSettings(
            listen=f"{LOOPBACK}:{port}",
            edge_addr=f"{LOOPBACK}:{self.edge_port}",
            edge_tls_name=TLS_NAME,
            sidecar_cert=paths.sidecar_cert,
            sidecar_key=paths.sidecar_key,
            client_cert=paths.client_cert,
            client_key=paths.client_key,
            ca_cert=self.pki.ca_cert,
        )
        self._start_nginx(
            f"sidecar-{site.site_id}",
            f"nginx sidecar of site {site.site_id} (originates mutual TLS)",
            render_sidecar(settings, self.logs / f"sidecar-{site.site_id}-access.log"),
            port,
            {
                "certificate": str(paths.sidecar_cert),
                "key": str(paths.sidecar_key),
                "client_certificate": str(paths.client_cert),
                "client_key": str(paths.client_key),
                "ca": str(self.pki.ca_cert),
            },
        )
        return port

    def reload_edge(self) -> None:
        """Make the edge re-read its CRL (after `fedgan pki revoke`)."""
        config = self.run_dir / "nginx" / "edge" / "nginx.conf"
        result = subprocess.run(
            commands.nginx_reload_command(config), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ProcessFailed(f"reloading the edge failed: {result.stderr.strip()}")

    def site_work_dir(self, site_id: str) -> Path:
        return self.run_dir / "sites" / site_id

    def supernode_argv(self, site: SiteSpec, sidecar_port: int, runtime_port: int) -> list[str]:
        paths = self.pki.site(site.site_id)
        return commands.supernode_command(
            superlink=f"{TLS_NAME}:{sidecar_port}",
            ca=self.pki.ca_cert,
            node_key=paths.node_key,
            runtime_port=runtime_port,
            node_config=commands.site_node_config(
                site_id=site.site_id,
                data_dir=Path(site.data_dir).resolve(),
                kind=site.kind,
                work_dir=self.site_work_dir(site.site_id),
                signing_key=paths.signing_key.resolve(),
                signing_cert=paths.signing_cert.resolve(),
                ca=self.pki.ca_cert.resolve(),
                crl=self.pki.crl.resolve(),
                membership=self.pki.membership.resolve(),
                extra=site.node_config,
            ),
        )

    def _start_supernode(self, site: SiteSpec, sidecar_port: int) -> None:
        paths = self.pki.site(site.site_id)
        work = self.site_work_dir(site.site_id)
        site_setup.ensure(work, site.site_id)
        runtime_port = free_port()
        argv = self.supernode_argv(site, sidecar_port, runtime_port)
        # Sites share this machine's cores: oversubscribed OpenMP threads
        # spin against each other and slow every round down several-fold.
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))
        (work / "flwr-home").mkdir(parents=True, exist_ok=True)
        env = commands.process_env(
            {"FLWR_HOME": str(work / "flwr-home")},
            path_first=[commands.clientapp_shim(work / "bin")],
        )
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env.update(site.env)
        if self.warm_clientapps:
            # Each task runs in a fork of this server, which has imported
            # Flower, FedGAN, torch and Opacus once (`fedgan.site.warm_runtime`).
            socket_path = commands.clientapp_socket(work)
            env[warm_runtime.ENV] = str(socket_path)
            self.group.start(
                f"clientapp-{site.site_id}",
                f"warm ClientApp runtime of site {site.site_id}",
                commands.clientapp_server_command(socket_path),
                env=env,
                cwd=work,
                address=f"unix:{socket_path}",
            )
        self.group.start(
            f"supernode-{site.site_id}",
            f"flower-supernode of site {site.site_id} (ClientApp runtime)",
            argv,
            env=env,
            cwd=work,
            address=f"http://{LOOPBACK}:{runtime_port} (runtime API, loopback only)",
            files={"node_key": str(paths.node_key), "ca": str(self.pki.ca_cert)},
        )

    # -- operator side --------------------------------------------------------

    def _write_operator_config(self) -> None:
        text = commands.connection_config(
            CONNECTION, f"{LOOPBACK}:{self.superlink_port}", self.pki.ca_cert
        )
        write_text_atomic(self.operator_home / "config.toml", text)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI as the operator, against this deployment."""
        return subprocess.run(
            [commands.venv_bin("flwr"), *args],
            capture_output=True,
            text=True,
            env=commands.process_env({"FLWR_HOME": str(self.operator_home)}),
            timeout=timeout,
            check=False,
        )

    def _register(self, site_id: str) -> int:
        pub = self.pki.site(site_id).node_pub
        argv = commands.flwr_register_command(pub, CONNECTION, site_id)
        result = self.flwr(*argv[1:])
        node_id = commands.registered_node_id(result.stdout)
        if node_id is None:
            raise ProcessFailed(
                f"registering the node key of site {site_id} ({pub}) failed "
                f"(exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return node_id

    def online_nodes(self) -> set[int]:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if result.returncode != 0:
            return set()
        data = json.loads(result.stdout)
        nodes = data.get("nodes", [])
        return {int(n["node-id"]) for n in nodes if str(n.get("status", "")).lower() == "online"}

    def _wait_sites_online(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        wanted = set(self.node_ids.values())
        while True:
            self.group.check_alive()
            if wanted <= self.online_nodes():
                return
            if time.monotonic() > deadline:
                missing = [s for s, n in self.node_ids.items() if n not in self.online_nodes()]
                proc = next(p for p in self.group.processes if p.name == f"supernode-{missing[0]}")
                raise proc.failure(f"did not connect through its sidecar and the edge ({missing})")
            time.sleep(1.0)

    def write_deployment(self) -> Path:
        doc: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "connection": {
                "name": CONNECTION,
                "flwr_home": str(self.operator_home),
                "control_api": f"https://{LOOPBACK}:{self.superlink_port}",
            },
            "edge": f"https://{LOOPBACK}:{self.edge_port}",
            "pki": str(self.pki.root),
            "sites": {
                s.site_id: {
                    "node_id": self.node_ids.get(s.site_id),
                    "data_dir": str(s.data_dir),
                    "kind": s.kind,
                    "node_config": s.node_config,
                }
                for s in self.sites
            },
            "processes": [p.describe() for p in self.group.processes],
        }
        path = self.run_dir / "deployment.json"
        write_text_atomic(path, json.dumps(doc, indent=1))
        return path

    def run(
        self,
        app_dir: Path,
        run_config: Path,
        *,
        on_poll: Callable[[], None] = lambda: None,
        timeout: float = 3600.0,
    ) -> int:
        """Submit the app with `flwr run --stream` and wait for it to end,
        checking every second that all processes are still alive."""
        log = self.logs / "flwr-run.log"
        argv = commands.flwr_run_command(app_dir, CONNECTION, run_config)
        env = commands.process_env({"FLWR_HOME": str(self.operator_home)})
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                self.group.check_alive()
                on_poll()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run did not finish within {timeout:.0f} s; see {log}")
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        on_poll()
        if proc.returncode != 0:
            raise ProcessFailed(f"`flwr run` exited with {proc.returncode}:\n{tail(log)}")
        return proc.returncode
