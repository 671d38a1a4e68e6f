"""`fedgan audit`: every warning fires on the condition it names, and only
then; the report reads the TLS settings from the configs actually used."""

from __future__ import annotations

import json

from fedgan import audit_report, pki
from fedgan.audit_log import AuditLog
from fedgan.config.appbundle import default_run_config


def _setup(tmp_path):
    certs = tmp_path / "certs"
    pki.init_ca(certs, "Audit test")
    pki.issue_aggregator(certs)
    pki.issue_site(certs, "site-a")
    pki.issue_site(certs, "site-b", days=10)  # expires soon
    pki.revoke_site(certs, "site-a")
    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    record = {"round": 1, "epsilon": {"site-a": 3.0}, "epsilon_budget": {"site-a": 12.0}}
    (runs / "r1" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    log = AuditLog(runs / "audit.jsonl")
    log.append("run_started", run="r1")
    log.append("run_completed", run="r1")
    return certs, runs, log


def test_secure_defaults_give_no_protocol_warnings(tmp_path):
    certs, runs, _ = _setup(tmp_path)
    report = audit_report.build(certs, default_run_config(), [], runs)
    tls = {t["file"].rsplit("/", 1)[-1]: t for t in report["tls"]}
    assert tls["edge.conf.template"]["protocols"] == ["TLSv1.3"]
    assert (
        tls["edge.conf.template"]["client_certificate"] == "on" and tls["edge.conf.template"]["crl"]
    )
    assert report["telemetry"] == {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    assert report["audit_log"]["intact"] and report["audit_log"]["entries"] == 2
    revoked = {c["subject"]: c["revoked"] for c in report["pki"]["certificates"]}
    assert revoked["CN=site-a"] and revoked["CN=site-a-secagg"] and not revoked["CN=site-b"]
    keys = {c["subject"]: c["key"] for c in report["pki"]["certificates"]}
    assert keys["CN=site-b-secagg"] == "Ed25519" and keys["CN=site-b"].startswith("EC secp384r1")
    w = report["warnings"]
    # Expected: site-b expires within 30 days; r1's site-a allows ε 12.
    assert any("site-b/client.crt expires in" in x for x in w)
    assert not any("site-a/client.crt expires" in x for x in w)  # revoked: no expiry noise
    assert any("site site-a allows an ε budget of 12" in x for x in w)
    assert not any("TLS 1.3" in x or "secure aggregation" in x or "privacy is off" in x for x in w)
    assert "| edge.conf.template" in audit_report.markdown(report) or "templates/edge" in (
        audit_report.markdown(report)
    )


def test_weak_settings_and_a_broken_log_are_flagged(tmp_path):
    certs, runs, log = _setup(tmp_path)
    weak = tmp_path / "edge.conf"
    weak.write_text("server {\n ssl_protocols TLSv1.2 TLSv1.3;\n ssl_verify_client on;\n}\n")
    lines = log.path.read_text().splitlines()
    log.path.write_text(lines[1] + "\n")  # the first line deleted
    config = default_run_config() | {"secagg": False, "dp": False}
    report = audit_report.build(certs, config, [weak], runs)
    w = report["warnings"]
    assert any("allows TLSv1.2 (below TLS 1.3)" in x for x in w)
    assert any("secure aggregation is off" in x for x in w)
    assert any("differential privacy is off" in x for x in w)
    assert any(x.startswith("audit log: line 1 does not follow") for x in w)
    assert "BROKEN" in audit_report.markdown(report)


def test_without_a_pki_the_rest_is_reported_and_the_gap_warned(tmp_path):
    """Issue 33: `fedgan audit` with no PKI in place exited with "certs/ca/crl.pem
    not found" and reported nothing else."""
    from typer.testing import CliRunner

    from fedgan.cli import app

    _, runs, _ = _setup(tmp_path)
    empty = tmp_path / "no-certs"
    empty.mkdir()
    for certs in (empty, tmp_path / "absent"):
        report = audit_report.build(certs, default_run_config(), [], runs)
        assert "not found" in report["pki"]["problem"]
        assert any(w.startswith("no PKI checked") for w in report["warnings"])
        assert report["audit_log"]["intact"] and report["tls"]  # the rest is there
        assert "Not checked:" in audit_report.markdown(report)
    out = CliRunner().invoke(app, ["audit", "--certs", str(empty), "--runs", str(runs)])
    assert out.exit_code == 0, out.output
    assert "no PKI checked" in out.output and "## Secure aggregation" in out.output
