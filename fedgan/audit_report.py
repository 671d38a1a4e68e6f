"""`fedgan audit`: what an auditor signs off, gathered from the files that
decide it (nginx configs, the PKI, the run config, the runs' metrics, the
audit log) and, with a probe, from a live TLS handshake. Plain data first
(`--json`); Markdown is a rendering of the same data."""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
from pathlib import Path
from typing import Any

from fedgan import pki
from fedgan.aggregator.run_store import latest_by_site, read_records
from fedgan.audit_log import AuditLog
from fedgan.deploy.commands import PRIVATE_ENV
from fedgan.secagg.params import min_modulus_bits

TEMPLATES = Path(__file__).parent / "deploy" / "templates"
EXPIRY_WARNING_DAYS = 30
EPSILON_WARNING = 10.0
SECAGG_PRIMITIVES = {
    "aead": "AES-256-GCM (96-bit random nonce; AD = run ‖ round ‖ stage ‖ sender ‖ receiver)",
    "key_agreement": "X25519, fresh pairs per site and round",
    "kdf": "HKDF-SHA256",
    "prg": "AES-256-CTR keyed by 256-bit seeds",
    "secret_sharing": "Shamir t-of-n over GF(2^521 - 1)",
    "signatures": "Ed25519, site keys certified by the consortium CA",
}


def tls_from_config(path: Path) -> dict[str, Any]:
    """The TLS directives of one nginx config (a rendered one, with the files
    it includes, or a template)."""
    text = Path(path).read_text(encoding="utf-8")
    for included in re.findall(r"^\s*include\s+([^;]+);", text, re.M):
        target = Path(included.strip())
        if target.is_file():
            text += "\n" + target.read_text(encoding="utf-8")

    def directive(name: str) -> list[str]:
        return [m.strip() for m in re.findall(rf"^\s*{name}\s+([^;]+);", text, re.M)]

    protocols = sorted({p for line in directive("ssl_protocols") for p in line.split()})
    proxy = sorted({p for line in directive("proxy_ssl_protocols") for p in line.split()})
    return {
        "file": str(path),
        "protocols": protocols,
        "upstream_protocols": proxy,
        "ciphers": directive("ssl_ciphers") or ["OpenSSL default TLS 1.3 suites"],
        "client_certificate": (directive("ssl_verify_client") or ["off"])[0],
        "crl": bool(directive("ssl_crl")),
        "upstream_verify": (directive("proxy_ssl_verify") or ["off"])[0],
    }


def probe(host_port: str, ca: Path, server_name: str = "localhost") -> dict[str, Any]:
    """Handshake with the endpoint as a client without certificate: the
    protocol and suite it negotiates, and whether it refuses TLS 1.2."""
    host, _, port = host_port.rpartition(":")
    out: dict[str, Any] = {"endpoint": host_port}

    def handshake(max_version: ssl.TLSVersion) -> tuple[str | None, str | None]:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.maximum_version = max_version
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else None

    try:
        out["negotiated"], out["cipher"] = handshake(ssl.TLSVersion.TLSv1_3)
    except (OSError, ssl.SSLError) as exc:
        out["error"] = f"handshake failed: {exc}"
        return out
    try:
        handshake(ssl.TLSVersion.TLSv1_2)
        out["tls12_refused"] = False
    except (OSError, ssl.SSLError):
        out["tls12_refused"] = True
    return out


def certificates(root: Path, now: dt.datetime) -> dict[str, Any]:
    paths = pki.PkiPaths(Path(root))
    crl = pki.load_crl(paths)
    ca = pki.load_cert(paths.ca_cert)
    files = [paths.ca_cert, paths.server_cert]
    for site in paths.site_ids():
        s = paths.site(site)
        files += [s.client_cert, s.sidecar_cert, s.signing_cert]
    certs = []
    for path in files:
        if not path.exists():
            continue
        info = pki.inspect_cert(path)
        cert = pki.load_cert(path)
        info["days_left"] = (cert.not_valid_after_utc - now).days
        info["revoked"] = (
            crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        )
        certs.append(info)
    return {
        "root": str(root),
        "crl": {
            "signed_by_ca": crl.is_signature_valid(ca.public_key()),
            "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
            "revoked_serials": [f"{r.serial_number:x}" for r in crl],
        },
        "certificates": certs,
    }


def privacy_spent(runs: Path) -> dict[str, dict[str, float]]:
    """Per run folder, each site's latest ε and its budget."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(Path(runs).glob("*/metrics.jsonl")):
        records = read_records(path)
        eps = latest_by_site(records, "epsilon")
        budget = latest_by_site(records, "epsilon_budget")
        if eps:
            out[path.parent.name] = {
                site: {"epsilon": value, "budget": budget.get(site)}  # type: ignore[dict-item]
                for site, value in sorted(eps.items())
            }
    return out


def build(
    certs: Path | None,
    run_config: dict[str, Any],
    nginx_configs: list[Path],
    runs: Path | None,
    probe_endpoint: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    now = now or dt.datetime.now(dt.UTC)
    configs = nginx_configs or sorted(TEMPLATES.glob("*.conf.template"))
    report: dict[str, Any] = {
        "generated": now.isoformat(timespec="seconds"),
        "tls": [tls_from_config(p) for p in configs],
        "telemetry": dict(PRIVATE_ENV),
    }
    secagg = bool(run_config.get("secagg"))
    bits = int(run_config.get("secagg-bits", 12))
    report["secure_aggregation"] = {
        "enabled": secagg,
        "bits": bits,
        "threshold": int(run_config.get("secagg-threshold", 0)) or "floor(2n/3) + 1, > n/2, >= 2",
        "modulus": f"2^(bits + ceil(log2 n)), e.g. 2^{min_modulus_bits(bits, 3)} for 3 sites",
        **SECAGG_PRIMITIVES,
    }
    report["differential_privacy"] = {
        key: run_config.get(key)
        for key in (
            "dp",
            "mechanism",
            "target-epsilon",
            "noise-multiplier",
            "max-grad-norm",
            "delta",
            "accountant",
            "update-clip",
        )
    }
    if certs is not None:
        try:
            report["pki"] = certificates(certs, now)
        except pki.PkiError as exc:
            # Everything else is still worth reporting; the gap is a warning.
            report["pki"] = {"root": str(certs), "problem": str(exc)}
        if probe_endpoint and "problem" not in report["pki"]:
            report["probe"] = probe(probe_endpoint, pki.PkiPaths(certs).ca_cert)
    if runs is not None:
        report["privacy_spent"] = privacy_spent(runs)
        log = AuditLog(Path(runs) / "audit.jsonl")
        if log.path.exists():
            verdict = log.verify()
            report["audit_log"] = {
                "path": str(log.path),
                "intact": verdict.ok,
                "entries": verdict.entries,
                "problem": verdict.problem,
            }
    report["warnings"] = warnings(report)
    return report


def warnings(report: dict[str, Any]) -> list[str]:
    out = []
    for tls in report["tls"]:
        weak = [p for p in tls["protocols"] + tls["upstream_protocols"] if p != "TLSv1.3"]
        if weak:
            out.append(f"{tls['file']}: allows {', '.join(weak)} (below TLS 1.3)")
    if report.get("probe", {}).get("tls12_refused") is False:
        out.append(f"{report['probe']['endpoint']} accepted a TLS 1.2 handshake")
    for cert in report.get("pki", {}).get("certificates", []):
        if not cert["revoked"] and cert["days_left"] < EXPIRY_WARNING_DAYS:
            out.append(f"{cert['path']} expires in {cert['days_left']} days")
    if "problem" in report.get("pki", {}):
        out.append(
            f"no PKI checked ({report['pki']['problem']}): certificates, revocation and expiry "
            "are not in this report; pass the consortium's PKI with --certs"
        )
    crl = report.get("pki", {}).get("crl")
    if crl and not crl["signed_by_ca"]:
        out.append("the CRL is not signed by the consortium CA")
    if not report["secure_aggregation"]["enabled"]:
        out.append("secure aggregation is off: the aggregator sees each site's update")
    if not report["differential_privacy"].get("dp"):
        out.append("differential privacy is off")
    for run, sites in report.get("privacy_spent", {}).items():
        for site, spent in sites.items():
            if spent["budget"] is not None and spent["budget"] > EPSILON_WARNING:
                out.append(f"{run}: site {site} allows an ε budget of {spent['budget']:g} (> 10)")
    if report.get("audit_log", {}).get("intact") is False:
        out.append(f"audit log: {report['audit_log']['problem']}")
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# FedGAN audit ({report['generated']})", ""]
    lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"] or ["none"]] + [""]
    lines += [
        "## TLS in force",
        "",
        "| config | protocols | upstream | ciphers | client cert | CRL |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for t in report["tls"]:
        lines.append(
            f"| {'/'.join(Path(t['file']).parts[-2:])} | {' '.join(t['protocols']) or '-'} | "
            f"{' '.join(t['upstream_protocols']) or '-'} | {'; '.join(t['ciphers'])} | "
            f"{t['client_certificate']} | {'yes' if t['crl'] else 'no'} |"
        )
    if "probe" in report:
        p = report["probe"]
        lines += [
            "",
            f"Live handshake with {p['endpoint']}: "
            + (
                p.get("error")
                or f"{p['negotiated']} {p['cipher']}, TLS 1.2 "
                f"{'refused' if p['tls12_refused'] else 'ACCEPTED'}"
            ),
        ]
    if "problem" in report.get("pki", {}):
        lines += ["", "## Certificates", "", f"Not checked: {report['pki']['problem']}."]
    elif "pki" in report:
        crl = report["pki"]["crl"]
        lines += [
            "",
            "## Certificates",
            "",
            f"CRL next update {crl['next_update']}, {len(crl['revoked_serials'])} revoked.",
            "",
            "| subject | key | expires | days left | revoked |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for c in report["pki"]["certificates"]:
            lines.append(
                f"| {c['subject']} | {c['key']} | {c['not_after'][:10]} | {c['days_left']} | "
                f"{'REVOKED' if c['revoked'] else 'no'} |"
            )
    lines += ["", "## Secure aggregation", ""]
    lines += [f"- {k}: {v}" for k, v in report["secure_aggregation"].items()]
    lines += ["", "## Differential privacy", ""]
    lines += [f"- {k}: {v}" for k, v in report["differential_privacy"].items()]
    for run, sites in report.get("privacy_spent", {}).items():
        lines += ["", f"ε spent in {run}:", ""]
        lines += [f"- {s}: ε {v['epsilon']:.3f} of budget {v['budget']}" for s, v in sites.items()]
    lines += ["", "## Telemetry", ""] + [f"- {k}={v}" for k, v in report["telemetry"].items()]
    if "audit_log" in report:
        a = report["audit_log"]
        lines += [
            "",
            "## Audit log",
            "",
            f"{a['path']}: {a['entries']} entries, "
            + ("intact" if a["intact"] else f"BROKEN: {a['problem']}"),
        ]
    return "\n".join(lines) + "\n"
