"""The nginx edge and sidecar configs: rendering, mutual TLS, CRL, fleet-only, and `nginx -t`
(a real nginx)."""

import subprocess

import pytest

from fedgan import pki
from fedgan.deploy import commands
from fedgan.deploy.nginx import (
    EdgeSettings,
    SidecarSettings,
    render,
    render_edge,
    render_sidecar,
    write_nginx_config,
)


def test_render_refuses_missing_and_unused_values():
    with pytest.raises(KeyError, match="B"):
        render("a ${A} ${B}", {"A": "1"})
    with pytest.raises(KeyError, match="C"):
        render("a ${A}", {"A": "1", "C": "2"})
    assert render("x ${A} $host", {"A": "1"}) == "x 1 $host"


@pytest.fixture()
def certs(tmp_path):
    root = tmp_path / "certs"
    pki.init_ca(root, "T")
    pki.issue_aggregator(root)
    pki.issue_site(root, "site-a")
    return pki.PkiPaths(root)


def _edge(paths, tmp_path):
    return render_edge(
        EdgeSettings(
            "127.0.0.1:8443",
            "127.0.0.1:9000",
            "localhost",
            paths.server_cert,
            paths.server_key,
            paths.ca_cert,
            paths.crl,
            paths.node_bindings,
        ),
        tmp_path / "access.log",
    )


def test_edge_enforces_mutual_tls_crl_and_fleet_only(certs, tmp_path):
    conf = _edge(certs, tmp_path)
    assert "ssl_verify_client       on;" in conf
    assert f"ssl_crl                 {certs.crl};" in conf
    assert "ssl_protocols           TLSv1.3;" in conf
    assert "proxy_ssl_verify on;" in conf
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location")]
    assert locations == ["location /v1/fleet/ {", "location / {"]
    assert "return 403;" in conf.split("location / {")[1]


def test_sidecar_presents_the_site_certificate(certs, tmp_path):
    site = certs.site("site-a")
    conf = render_sidecar(
        SidecarSettings(
            "127.0.0.1:7443",
            "127.0.0.1:8443",
            "localhost",
            site.sidecar_cert,
            site.sidecar_key,
            site.client_cert,
            site.client_key,
            certs.ca_cert,
        ),
        tmp_path / "access.log",
    )
    assert f"proxy_ssl_certificate     {site.client_cert};" in conf
    assert f"proxy_ssl_certificate_key {site.client_key};" in conf
    assert "proxy_ssl_verify on;" in conf


def test_rendered_configs_pass_nginx_t(certs, tmp_path):
    main = write_nginx_config(tmp_path / "edge", _edge(certs, tmp_path))
    result = subprocess.run(commands.nginx_test_command(main), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
