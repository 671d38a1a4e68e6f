"""Render the nginx edge and sidecar configurations from their templates.

The same template files serve the local launcher (rendered here) and the
official nginx image (rendered by its envsubst entrypoint), so what the tests
exercise is what the containers run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedgan.atomic import write_text_atomic

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def template_text(name: str) -> str:
    return resources.files("fedgan.deploy").joinpath("templates", name).read_text("utf-8")


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``${NAME}`` placeholders; a missing or unused value is an error,
    because a silently empty ``ssl_crl`` or ``proxy_ssl_verify`` is a hole."""
    wanted = set(_PLACEHOLDER.findall(template))
    missing = wanted - values.keys()
    if missing:
        raise KeyError(f"nginx template needs values for: {', '.join(sorted(missing))}")
    unused = values.keys() - wanted
    if unused:
        raise KeyError(f"nginx template has no placeholder for: {', '.join(sorted(unused))}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class EdgeSettings:
    listen: str
    superlink_addr: str
    superlink_tls_name: str
    server_cert: Path
    server_key: Path
    ca_cert: Path
    crl: Path
    node_bindings: Path  # `fedgan.pki.write_node_bindings`


@dataclass(frozen=True)
class SidecarSettings:
    listen: str
    edge_addr: str
    edge_tls_name: str
    sidecar_cert: Path
    sidecar_key: Path
    client_cert: Path
    client_key: Path
    ca_cert: Path


def render_edge(s: EdgeSettings, access_log: Path) -> str:
    return render(
        template_text("edge.conf.template"),
        {
            "EDGE_LISTEN": s.listen,
            "SUPERLINK_ADDR": s.superlink_addr,
            "SUPERLINK_TLS_NAME": s.superlink_tls_name,
            "SERVER_CERT": str(s.server_cert),
            "SERVER_KEY": str(s.server_key),
            "CA_CERT": str(s.ca_cert),
            "CRL_FILE": str(s.crl),
            "NODE_BINDINGS": str(s.node_bindings),
            "ACCESS_LOG": str(access_log),
        },
    )


def render_sidecar(s: SidecarSettings, access_log: Path) -> str:
    return render(
        template_text("sidecar.conf.template"),
        {
            "SIDECAR_LISTEN": s.listen,
            "EDGE_ADDR": s.edge_addr,
            "EDGE_TLS_NAME": s.edge_tls_name,
            "SIDECAR_CERT": str(s.sidecar_cert),
            "SIDECAR_KEY": str(s.sidecar_key),
            "CLIENT_CERT": str(s.client_cert),
            "CLIENT_KEY": str(s.client_key),
            "CA_CERT": str(s.ca_cert),
            "ACCESS_LOG": str(access_log),
        },
    )


def write_nginx_config(workdir: Path, server_conf: str) -> Path:
    """Write a self-contained nginx prefix (main config, server block, temp
    dirs) under ``workdir`` and return the main config's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "temp").mkdir(exist_ok=True)
    server_path = workdir / "server.conf"
    write_text_atomic(server_path, server_conf)
    main = render(
        template_text("nginx-main.conf.template"),
        {
            "PID_FILE": str(workdir / "nginx.pid"),
            # stderr: the launcher captures it in logs/<name>.log, so a failed
            # start is reported with nginx's own words.
            "ERROR_LOG": "stderr",
            "TEMP_DIR": str(workdir / "temp"),
            "SERVER_CONF": str(server_path),
        },
    )
    main_path = workdir / "nginx.conf"
    write_text_atomic(main_path, main)
    return main_path
