"""The `fedgan` command as an operator types it (a real subprocess)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedgan import pki
from fedgan.site import credentials


def fedgan(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fedgan.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_pki_lifecycle(tmp_path):
    certs = str(tmp_path / "certs")
    assert (
        fedgan(
            "pki", "init", "--consortium", "Acme Hospitals", "--out", certs, "--no-passphrase"
        ).returncode
        == 0
    )
    r = fedgan("pki", "issue-aggregator", "--san", "agg.example.org", "--out", certs)
    assert r.returncode == 0, r.stderr
    assert fedgan("pki", "issue-site", "site-a", "--out", certs).returncode == 0
    r = fedgan("pki", "inspect", f"{certs}/aggregator/server.crt", "--json")
    info = json.loads(r.stdout)
    assert {"agg.example.org", "localhost", "127.0.0.1"} <= set(info["sans"])
    r = fedgan("pki", "inspect", f"{certs}/sites/site-a/client.crt")
    assert "CN=site-a" in r.stdout and "sha256_fingerprint" in r.stdout
    r = fedgan("pki", "revoke", "site-a", "--out", certs)
    assert r.returncode == 0 and "revoked site-a" in r.stdout


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["pki", "issue-site", "site-a", "--out", "{tmp}/none"], "fedgan pki init"),
        (["pki", "inspect", "{tmp}/missing.crt"], "missing.crt not found"),
        (["pki", "revoke", "ghost", "--out", "{tmp}/c"], "no site 'ghost'"),
        (["silo", "synth", "{tmp}/s", "--kind", "xray"], "unknown silo kind"),
        (["demo", "--kind", "xray"], "--kind 'xray' is not supported"),
        (["evaluate", "{tmp}", "--real", "{tmp}", "--classifier-seeds", "0"], "use 1 or more"),
    ],
)
def test_bad_input_gets_one_line_naming_the_fix(tmp_path, args, expect):
    if args[:2] == ["pki", "revoke"]:
        fedgan("pki", "init", "--consortium", "C", "--out", str(tmp_path / "c"), "--no-passphrase")
    r = fedgan(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgan: ") and expect in lines[0], r.stderr


def test_existing_keys_are_kept_without_force(tmp_path):
    certs = str(tmp_path / "certs")
    fedgan("pki", "init", "--consortium", "C", "--out", certs, "--no-passphrase")
    key = (tmp_path / "certs" / "ca" / "ca.key").read_bytes()
    r = fedgan("pki", "init", "--consortium", "C", "--out", certs, "--no-passphrase")
    assert r.returncode == 1 and "--force" in r.stderr
    assert (tmp_path / "certs" / "ca" / "ca.key").read_bytes() == key


def test_key_ceremony_keys_born_at_the_site_and_a_passphrase_on_the_ca(tmp_path):
    """Issue 32, item 1: the site makes its own keys; the CA (encrypted key)
    signs requests; neither the CA's folder nor the site kit holds a private
    key of the site, and the certificates certify the site's own keys."""
    certs, site_dir = tmp_path / "ca-host", tmp_path / "hospital" / "certs"
    r = fedgan("pki", "init", "--consortium", "C", "--out", str(certs))
    assert r.returncode == 1 and "FEDGAN_CA_PASSPHRASE" in r.stderr  # no silent plain key
    secret = {"FEDGAN_CA_PASSPHRASE": "a long passphrase for the ceremony"}
    assert (
        fedgan("pki", "init", "--consortium", "C", "--out", str(certs), env=secret).returncode == 0
    )
    assert b"ENCRYPTED PRIVATE KEY" in (certs / "ca" / "ca.key").read_bytes()
    r = fedgan("site", "keys", "st-olav", "--out", str(site_dir))
    assert r.returncode == 0, r.stderr
    digests = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("request ")]
    assert len(digests) == 4
    r = fedgan("pki", "sign", str(site_dir / "requests"), "--out", str(certs))
    assert r.returncode == 1 and "is encrypted; set FEDGAN_CA_PASSPHRASE" in r.stderr
    r = fedgan("pki", "sign", str(site_dir / "requests"), "--out", str(certs), env=secret)
    assert r.returncode == 0, r.stderr
    assert all(d in r.stdout for d in digests)  # what the officers compare
    assert fedgan("pki", "membership", "--out", str(certs), env=secret).returncode == 0
    r = fedgan("site-kit", "st-olav", "--certs", str(certs), "--out", str(tmp_path / "dist"))
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "dist" / "fedgan-site-st-olav.tar.gz") as kit:
        names = {Path(n).name for n in kit.getnames()}
        kit_bytes = b"".join(kit.extractfile(m).read() for m in kit.getmembers() if m.isfile())
    assert {"client.crt", "signing.crt", "membership.json", "crl.pem"} <= names
    assert not names & {"client.key", "sidecar.key", "node_key", "signing.key"}
    assert b"PRIVATE KEY" not in kit_bytes
    held = [p for p in (certs / "sites").rglob("*") if p.is_file()]
    assert held and all(b"PRIVATE KEY" not in p.read_bytes() for p in held)
    # The certificates certify the keys the site holds.
    signer = credentials.load_signer(
        site_dir / "signing.key", certs / "sites" / "st-olav" / "signing.crt", "st-olav"
    )
    assert signer.site_id == "st-olav"
    client_key = serialization.load_pem_private_key((site_dir / "client.key").read_bytes(), None)
    client_crt = pki.load_cert(certs / "sites" / "st-olav" / "client.crt")
    assert client_crt.public_key() == client_key.public_key()
    # A request altered in transit is refused.
    csr = site_dir / "requests" / "client.csr"
    csr.write_text(csr.read_text().replace("A", "B", 1))
    r = fedgan(
        "pki", "sign", str(site_dir / "requests"), "--out", str(certs), "--force", env=secret
    )
    assert r.returncode == 1 and "client.csr" in r.stderr


def test_silo_synth(tmp_path):
    r = fedgan("silo", "synth", str(tmp_path / "s"), "--kind", "dicom", "--n", "3", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").rglob("*.dcm"))) == 3


def test_silo_check_reports_and_exits_1_when_nothing_is_usable(tmp_path):
    silo = tmp_path / "s"
    assert (
        fedgan("silo", "synth", str(silo), "--kind", "dicom", "--n", "3", "--size", "32").returncode
        == 0
    )
    (silo / "notes.txt").write_text("not an image")
    r = fedgan("silo", "check", str(silo), "--kind", "dicom", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 3 and report["modalities"] == {"CT": 3}
    assert report["skipped"] == [{"path": "notes.txt", "reason": "not a DICOM file"}]
    r = fedgan("silo", "check", str(silo), "--kind", "dicom", "--modality", "MR")
    assert r.returncode == 1
    assert "filtered out: Modality CT not in MR" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("fedgan: ")


def test_silo_split_writes_sites(tmp_path):
    fedgan("silo", "synth", str(tmp_path / "src"), "--kind", "fundus", "--n", "20", "--size", "32")
    r = fedgan(
        "silo",
        "split",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
        "--sites",
        "2",
        "--alpha",
        "1.0",
        "--seed",
        "3",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("images") == 2
    assert r.stdout.count("+ attributes.csv") == 2
    assert (tmp_path / "out" / "site-2" / "labels.csv").exists()


def test_evaluate_names_missing_inception_weights_before_any_work(tmp_path):
    # The run does not even exist: the weights are checked first, in one line.
    args = ["evaluate", str(tmp_path / "no-run"), "--real", str(tmp_path)]
    result = fedgan(*args, "--inception-weights", "absent.pth", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("fedgan: --inception-weights absent.pth not found")
    assert len(result.stderr.strip().splitlines()) == 1
