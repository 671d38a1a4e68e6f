"""The edge, probed for real: only a current consortium certificate reaches
the Fleet API, and nothing reaches the Control API."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
import uuid

import pytest

from fedgan import pki
from fedgan.deploy.local import TLS_NAME

pytestmark = pytest.mark.integration


def _request(fed, path, *, cert=None, key=None, max_version=None, node=None):
    """POST ``path`` to the edge with a client certificate and, as a
    SuperNode does, a node key in ``flwr-public-key`` (``node``: its .pub)."""
    ctx = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version:
        ctx.maximum_version = max_version
    headers = {"Content-Type": "application/protobuf"}
    if node is not None:
        headers["flwr-public-key"] = pki.node_key_header(node.read_bytes())
    conn = http.client.HTTPSConnection("127.0.0.1", fed.edge_port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _edge_log_line(fed, path):
    log = fed.logs / "edge-access.log"
    for _ in range(50):
        for line in log.read_text().splitlines():
            if path in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{path} not in {log}")


def _probe_path():
    return f"/v1/fleet/probe-{uuid.uuid4().hex}"


def _assert_not_proxied(fed, path):
    line = _edge_log_line(fed, path)
    assert re.search(r"upstream=-$", line), line


def test_valid_site_certificate_is_proxied(live_federation):
    fed = live_federation
    site = fed.pki.site("site-1")
    path = _probe_path()
    status, _ = _request(fed, path, cert=site.client_cert, key=site.client_key, node=site.node_pub)
    assert status != 400
    line = _edge_log_line(fed, path)
    assert "verify=SUCCESS" in line and "proto=TLSv1.3" in line
    assert re.search(r"upstream=\d{3}$", line), line  # the SuperLink answered


def test_a_certificate_speaks_only_for_its_own_sites_node_key(live_federation):
    """Issue 33: site A's certificate worked with site B's node key. The edge
    now holds, from the PKI, which certificate goes with which node key."""
    fed = live_federation
    one = fed.pki.site("site-1")
    pki.issue_site(fed.pki.root, "site-2")  # rewrites the edge's bindings
    fed.reload_edge()
    two = fed.pki.site("site-2")
    cases = {
        "own": (two.client_cert, two.client_key, two.node_pub),
        "other's": (two.client_cert, two.client_key, one.node_pub),
        "none": (one.client_cert, one.client_key, None),
    }
    seen = {}
    deadline = time.monotonic() + 10
    while True:  # until the reloaded workers answer
        for name, (cert, key, node) in cases.items():
            path = _probe_path()
            seen[name] = (_request(fed, path, cert=cert, key=key, node=node)[0], path)
        if seen["own"][0] != 403 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert re.search(r"upstream=\d{3}$", _edge_log_line(fed, seen["own"][1]))
    for name in ("other's", "none"):
        assert seen[name][0] == 403, name
        line = _edge_log_line(fed, seen[name][1])
        assert "verify=SUCCESS" in line and re.search(r"upstream=-$", line), line


def test_no_client_certificate_is_refused(live_federation):
    path = _probe_path()
    status, _ = _request(live_federation, path)
    assert status == 400
    _assert_not_proxied(live_federation, path)


def test_certificate_from_another_ca_is_refused(live_federation, tmp_path):
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, "Rogue")
    pki.issue_site(rogue, "site-1")
    site = pki.PkiPaths(rogue).site("site-1")
    path = _probe_path()
    status, _ = _request(live_federation, path, cert=site.client_cert, key=site.client_key)
    assert status == 400
    _assert_not_proxied(live_federation, path)


def test_a_signing_certificate_is_not_a_tls_client_certificate(live_federation):
    """Issue 32, item 6: the site's secure-aggregation signing certificate
    (a current, unrevoked consortium certificate naming the site) opens no
    connection: it carries the signing usage, not clientAuth."""
    site = live_federation.pki.site("site-1")
    path = _probe_path()
    status, _ = _request(live_federation, path, cert=site.signing_cert, key=site.signing_key)
    assert status == 400
    line = _edge_log_line(live_federation, path)
    assert "verify=FAILED" in line and "unsuitable certificate purpose" in line, line
    _assert_not_proxied(live_federation, path)


def test_revoked_certificate_is_refused_after_reload(live_federation):
    fed = live_federation
    pki.issue_site(fed.pki.root, "site-leaver")
    fed.reload_edge()
    site = fed.pki.site("site-leaver")
    deadline = time.monotonic() + 10
    while True:
        before = _probe_path()
        status, _ = _request(
            fed, before, cert=site.client_cert, key=site.client_key, node=site.node_pub
        )
        if status != 403 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert re.search(r"upstream=\d{3}$", _edge_log_line(fed, before))
    pki.revoke_site(fed.pki.root, "site-leaver")
    fed.reload_edge()
    deadline = time.monotonic() + 10
    while True:
        path = _probe_path()
        status, _ = _request(
            fed, path, cert=site.client_cert, key=site.client_key, node=site.node_pub
        )
        if status == 400 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert status == 400
    _assert_not_proxied(fed, path)
    # Revoked, its node key is unbound too: not even a valid certificate
    # carries it in (issue 33: revoking left the node key registered).
    ok = fed.pki.site("site-1")
    stolen = _probe_path()
    assert (
        _request(fed, stolen, cert=ok.client_cert, key=ok.client_key, node=site.node_pub)[0] == 403
    )
    _assert_not_proxied(fed, stolen)
    # The site still in good standing is unaffected.
    good = _probe_path()
    _request(fed, good, cert=ok.client_cert, key=ok.client_key, node=ok.node_pub)
    assert re.search(r"upstream=\d{3}$", _edge_log_line(fed, good))


def test_plaintext_http_is_refused(live_federation):
    path = _probe_path()
    with socket.create_connection(("127.0.0.1", live_federation.edge_port), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        head = sock.recv(200).decode("latin-1")
    assert head.startswith("HTTP/1.1 400"), head
    _assert_not_proxied(live_federation, path)


def test_tls_below_1_3_is_refused(live_federation):
    site = live_federation.pki.site("site-1")
    with pytest.raises(ssl.SSLError) as refused:
        _request(
            live_federation,
            _probe_path(),
            cert=site.client_cert,
            key=site.client_key,
            max_version=ssl.TLSVersion.TLSv1_2,
        )
    # The protocol version itself, not any TLS failure (issue 33).
    assert "PROTOCOL_VERSION" in (refused.value.reason or "") or "protocol version" in str(
        refused.value
    ), refused.value


def _expired_client_cert(fed, tmp_path):
    """site-1's key in a CA-signed client certificate that expired yesterday."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = pki._load_ca(fed.pki)
    site = fed.pki.site("site-1")
    key = serialization.load_pem_private_key(site.client_key.read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    path = tmp_path / "expired.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, site.client_key


@pytest.mark.parametrize("which", ["expired", "sidecar-server-cert"])
def test_an_expired_or_server_certificate_is_refused(live_federation, tmp_path, which):
    """Issue 33: an expired client certificate; the sidecar's serverAuth
    certificate (the site's, CA-signed, current) presented as a client's."""
    fed = live_federation
    site = fed.pki.site("site-1")
    if which == "expired":
        cert, key = _expired_client_cert(fed, tmp_path)
        why = "certificate has expired"
    else:
        cert, key = site.sidecar_cert, site.sidecar_key
        why = "unsuitable certificate purpose"
    path = _probe_path()
    status, _ = _request(fed, path, cert=cert, key=key, node=site.node_pub)
    assert status == 400
    line = _edge_log_line(fed, path)
    assert "verify=FAILED" in line and why in line, line
    _assert_not_proxied(fed, path)


@pytest.mark.parametrize("path", ["/v1/control/list-runs", "/v1/runtime/x", "/health", "/"])
def test_only_fleet_api_is_exposed(live_federation, path):
    site = live_federation.pki.site("site-1")
    marker = f"{path}?probe={uuid.uuid4().hex}"
    status, _ = _request(live_federation, marker, cert=site.client_cert, key=site.client_key)
    assert status == 403
    _assert_not_proxied(live_federation, marker)


def test_audit_probe_confirms_tls13_only_at_the_live_edge(live_federation):
    from fedgan.audit_report import probe

    fed = live_federation
    seen = probe(f"127.0.0.1:{fed.edge_port}", fed.pki.ca_cert, server_name=TLS_NAME)
    assert seen["negotiated"] == "TLSv1.3", seen
    assert seen["cipher"].startswith("TLS_") and seen["tls12_refused"] is True


def test_audit_json_reports_what_the_deployment_configured(live_federation, tmp_path):
    import json
    import subprocess
    import sys

    fed = live_federation
    config = tmp_path / "federation.yaml"

    def audit() -> dict:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedgan.cli",
                "audit",
                "--json",
                "--certs",
                str(fed.pki.root),
                "--config",
                str(config),
                "--runs",
                str(tmp_path / "none"),
                "--nginx-conf",
                str(fed.run_dir / "nginx" / "edge" / "nginx.conf"),
                "--probe",
                f"127.0.0.1:{fed.edge_port}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    config.write_text("secure_aggregation:\n  bits: 8\nprivacy:\n  target_epsilon: 4.0\n")
    first = audit()
    (edge,) = first["tls"]
    assert edge["protocols"] == ["TLSv1.3"] and edge["client_certificate"] == "on" and edge["crl"]
    assert first["probe"]["negotiated"] == "TLSv1.3" and first["probe"]["tls12_refused"]
    assert first["secure_aggregation"]["bits"] == 8
    assert first["differential_privacy"]["target-epsilon"] == 4.0
    assert first["differential_privacy"]["mechanism"] == "dp-sgd"
    subjects = {c["subject"] for c in first["pki"]["certificates"]}
    assert {"CN=site-1", "CN=site-1-secagg", "CN=site-1-sidecar"} <= subjects
    assert not any("off" in w for w in first["warnings"])
    config.write_text("secure_aggregation:\n  enabled: false\n  bits: 16\nprivacy:\n  dp: false\n")
    second = audit()
    assert second["secure_aggregation"]["bits"] == 16
    assert "secure aggregation is off: the aggregator sees each site's update" in second["warnings"]
    assert "differential privacy is off" in second["warnings"]


def test_refused_certificates_land_in_the_audit_log(live_federation, tmp_path):
    from fedgan.audit_log import AuditLog, ingest_edge_log

    fed = live_federation
    # Without a certificate: refused, and logged by the edge.
    status, _ = _request(fed, "/v1/fleet/audit-probe")
    assert status == 400
    log = AuditLog(tmp_path / "audit.jsonl")
    assert ingest_edge_log(log, fed.logs / "edge-access.log") >= 1
    events = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert all(e["event"] == "certificate_rejected" for e in events)
    assert any(e["verify"] == "NONE" and e["status"] == 400 for e in events)
    assert log.verify().ok
