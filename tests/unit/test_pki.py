"""The consortium PKI: chains, expiry, revocation, key file modes, certificate inspection."""

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedgan import pki
from fedgan.secagg.identity import SIGNING_EKU, ca_verifier
from fedgan.site import credentials


@pytest.fixture()
def certs(tmp_path):
    root = tmp_path / "certs"
    pki.init_ca(root, "Test Consortium")
    pki.issue_aggregator(root, ["aggregator.example.org"])
    pki.issue_site(root, "site-a")
    return root


def test_site_certificate_chains_to_the_consortium_ca(certs):
    paths = pki.PkiPaths(certs)
    site = paths.site("site-a")
    ca = pki.load_cert(paths.ca_cert)
    client = pki.load_cert(site.client_cert)
    pki.verify_client_cert(client, ca, crl=pki.load_crl(paths))
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "site-a"
    assert client.issuer == ca.subject


def test_certificate_from_another_ca_is_rejected(certs, tmp_path):
    other = tmp_path / "other"
    pki.init_ca(other, "Rogue")
    pki.issue_site(other, "site-a")
    ca = pki.load_cert(pki.PkiPaths(certs).ca_cert)
    rogue = pki.load_cert(pki.PkiPaths(other).site("site-a").client_cert)
    with pytest.raises(pki.CertificateRejected):
        pki.verify_client_cert(rogue, ca)


def test_expired_certificate_is_rejected(certs):
    paths = pki.PkiPaths(certs)
    ca = pki.load_cert(paths.ca_cert)
    client = pki.load_cert(paths.site("site-a").client_cert)
    after_expiry = client.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(pki.CertificateRejected):
        pki.verify_client_cert(client, ca, at=after_expiry)


def test_short_lived_certificate_expires_after_its_days(tmp_path):
    root = tmp_path / "c"
    pki.init_ca(root, "T")
    pki.issue_site(root, "s1", days=1)
    cert = pki.load_cert(pki.PkiPaths(root).site("s1").client_cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=1) <= lifetime <= dt.timedelta(days=1, minutes=10)


def test_revoked_site_is_in_the_crl_and_rejected(certs):
    paths = pki.PkiPaths(certs)
    client = pki.load_cert(paths.site("site-a").client_cert)
    sidecar = pki.load_cert(paths.site("site-a").sidecar_cert)
    signing = pki.load_cert(paths.site("site-a").signing_cert)
    assert not pki.is_revoked(certs, client)
    serials = pki.revoke_site(certs, "site-a")
    assert set(serials) == {client.serial_number, sidecar.serial_number, signing.serial_number}
    crl = pki.load_crl(paths)
    assert crl.get_revoked_certificate_by_serial_number(client.serial_number) is not None
    assert pki.is_revoked(certs, client)
    with pytest.raises(pki.CertificateRejected, match="revoked"):
        pki.verify_client_cert(client, pki.load_cert(paths.ca_cert), crl=crl)
    # Revoking twice keeps one entry per certificate.
    pki.revoke_site(certs, "site-a")
    assert len(list(pki.load_crl(paths))) == 3


def test_private_keys_are_0600_and_certificates_public(certs):
    paths = pki.PkiPaths(certs)
    site = paths.site("site-a")
    for key in (paths.ca_key, paths.server_key, site.client_key, site.sidecar_key, site.node_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (paths.ca_cert, paths.server_cert, site.client_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert


def test_keys_are_never_overwritten_without_force(certs):
    site = pki.PkiPaths(certs).site("site-a")
    before = site.client_key.read_bytes(), site.node_key.read_bytes()
    with pytest.raises(pki.PkiError, match="--force"):
        pki.issue_site(certs, "site-a")
    assert (site.client_key.read_bytes(), site.node_key.read_bytes()) == before
    with pytest.raises(pki.PkiError, match="--force"):
        pki.init_ca(certs, "Again")
    pki.issue_site(certs, "site-a", force=True)
    assert site.client_key.read_bytes() != before[0]


def test_aggregator_sans_always_include_loopback(certs):
    info = pki.inspect_cert(pki.PkiPaths(certs).server_cert)
    assert {"aggregator.example.org", "localhost", "127.0.0.1"} <= set(info["sans"])


def test_keys_are_ecdsa_p384_and_node_key_is_openssh(certs):
    paths = pki.PkiPaths(certs)
    info = pki.inspect_cert(paths.site("site-a").client_cert)
    assert info["key"] == "EC secp384r1 (384 bit)"
    assert info["signature_hash"] == "sha384"
    node_key = paths.site("site-a").node_key.read_bytes()
    loaded = serialization.load_ssh_private_key(node_key, password=None)
    assert loaded.curve.name == "secp384r1"
    assert paths.site("site-a").node_pub.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_inspect_reports_fingerprint_and_validity(certs):
    info = pki.inspect_cert(pki.PkiPaths(certs).ca_cert)
    assert info["is_ca"] is True
    assert len(info["sha256_fingerprint"].split(":")) == 32
    assert info["subject"] == info["issuer"]


def test_invalid_site_id_is_refused(certs):
    with pytest.raises(pki.PkiError, match="site id"):
        pki.issue_site(certs, "../etc")


def test_issue_before_init_names_the_fix(tmp_path):
    with pytest.raises(pki.PkiError, match="fedgan pki init"):
        pki.issue_site(tmp_path / "none", "site-a")


def test_crl_refresh_keeps_entries_and_extends_expiry(certs):
    pki.revoke_site(certs, "site-a", days=1)
    crl = pki.refresh_crl(certs, days=60)
    assert len(list(crl)) == 3
    assert crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=59)


def test_site_signing_key_is_certified_ed25519_and_revocable(certs):
    paths = pki.PkiPaths(certs)
    site = paths.site("site-a")
    assert stat.S_IMODE(site.signing_key.stat().st_mode) == 0o600
    signer = credentials.load_signer(site.signing_key, site.signing_cert, "site-a")
    usages = list(
        pki.load_cert(site.signing_cert)
        .extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        .value
    )
    assert usages == [SIGNING_EKU]  # not a TLS client certificate
    work = certs / "work"
    pki.write_membership(certs)
    kit_list = certs / "kit-membership.json"  # the site's copy, from before the revocation
    kit_list.write_bytes(paths.membership.read_bytes())
    verify = credentials.load_verifier(paths.ca_cert, paths.crl, kit_list, work)
    verify("site-a", signer.cert_pem, b"keys", signer.sign(b"keys"))
    with pytest.raises(pki.FedGanError, match="bad signature"):
        verify("site-a", signer.cert_pem, b"other keys", signer.sign(b"keys"))
    with pytest.raises(pki.FedGanError, match="not this site"):
        verify("site-b", signer.cert_pem, b"keys", signer.sign(b"keys"))
    pki.revoke_site(certs, "site-a")
    with pytest.raises(pki.FedGanError, match="revoked"):
        credentials.load_verifier(paths.ca_cert, paths.crl, kit_list, work)(
            "site-a", signer.cert_pem, b"k", signer.sign(b"k")
        )
    # The list the revocation re-signed no longer names the site.
    with pytest.raises(pki.FedGanError, match="not in the consortium's membership list"):
        credentials.load_verifier(paths.ca_cert, paths.crl, paths.membership, work)(
            "site-a", signer.cert_pem, b"k", signer.sign(b"k")
        )
    with pytest.raises(pki.PkiError, match="does not certify"):
        pki.issue_site(certs, "site-b")
        credentials.load_signer(site.signing_key, paths.site("site-b").signing_cert, "site-a")


def test_a_site_adopts_only_newer_ca_signed_crls_from_the_round_setup(certs, tmp_path):
    """The kit's CRL predates a revocation; the aggregator brings the newer
    one with the round setup. An older or foreign CRL changes nothing."""
    paths = pki.PkiPaths(certs)
    kit_crl = tmp_path / "kit-crl.pem"
    kit_crl.write_bytes(paths.crl.read_bytes())
    work = tmp_path / "work"
    site = paths.site("site-a")
    signer = credentials.load_signer(site.signing_key, site.signing_cert, "site-a")
    pki.write_membership(certs)
    kit_list = tmp_path / "kit-membership.json"
    kit_list.write_bytes(paths.membership.read_bytes())
    credentials.load_verifier(paths.ca_cert, kit_crl, kit_list, work)(
        "site-a", signer.cert_pem, b"k", signer.sign(b"k")
    )
    pki.revoke_site(certs, "site-a")
    newer = paths.crl.read_bytes()
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, "Rogue")
    assert not credentials.adopt_crl(
        paths.ca_cert, kit_crl, work, (rogue / "ca/crl.pem").read_bytes()
    )
    assert not credentials.adopt_crl(paths.ca_cert, kit_crl, work, b"not a crl")
    assert credentials.adopt_crl(paths.ca_cert, kit_crl, work, newer)
    assert not credentials.adopt_crl(paths.ca_cert, kit_crl, work, kit_crl.read_bytes())  # older
    with pytest.raises(pki.FedGanError, match="revoked"):
        credentials.load_verifier(paths.ca_cert, kit_crl, kit_list, work)(
            "site-a", signer.cert_pem, b"k", signer.sign(b"k")
        )


def test_a_site_without_a_current_crl_verifies_nobody(certs, tmp_path):
    paths = pki.PkiPaths(certs)
    with pytest.raises(
        pki.PkiError, match="not found: secure aggregation needs the consortium CRL"
    ):
        credentials.load_verifier(
            paths.ca_cert, tmp_path / "missing.pem", tmp_path / "list.json", tmp_path
        )
    pki.refresh_crl(certs, days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    with pytest.raises(pki.FedGanError, match="the CRL expired at"):
        ca_verifier(pki.load_cert(paths.ca_cert), crl, membership=None, now=lambda: later)


def test_membership_list_is_signed_versioned_and_adopted_only_when_newer(certs, tmp_path):
    paths = pki.PkiPaths(certs)
    first = pki.write_membership(certs, colluding=1)
    assert first.version == 1 and set(first.sites) == {"site-a"} and first.colluding == 1
    kit_list = tmp_path / "kit.json"
    kit_list.write_bytes(paths.membership.read_bytes())
    work = tmp_path / "work"
    site_b = pki.issue_site(certs, "site-b")
    signer = credentials.load_signer(site_b.signing_key, site_b.signing_cert, "site-b")
    # A certified site that joined after the kit's list: not in a roster yet.
    with pytest.raises(pki.FedGanError, match="site-b is not in the consortium's membership"):
        credentials.load_verifier(paths.ca_cert, paths.crl, kit_list, work)(
            "site-b", signer.cert_pem, b"k", signer.sign(b"k")
        )
    second = pki.write_membership(certs, colluding=1)
    assert second.version == 2 and set(second.sites) == {"site-a", "site-b"}
    newer = paths.membership.read_bytes()
    # A list another CA signed, an edited one, and garbage are ignored.
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, "Test Consortium")
    pki.issue_site(rogue, "site-b")
    pki.write_membership(rogue)
    forged = (rogue / "ca" / "membership.json").read_bytes()
    edited = newer.replace(b'"version": 2', b'"version": 9')
    for offered in (forged, edited, b"{}", b""):
        assert not credentials.adopt_membership(paths.ca_cert, kit_list, work, offered)
    assert credentials.adopt_membership(paths.ca_cert, kit_list, work, newer)
    assert not credentials.adopt_membership(paths.ca_cert, kit_list, work, kit_list.read_bytes())
    credentials.load_verifier(paths.ca_cert, paths.crl, kit_list, work)(
        "site-b", signer.cert_pem, b"k", signer.sign(b"k")
    )
    # A certificate the CA issued later in site-b's name is not the listed one.
    pki.issue_site(certs, "site-b", force=True)
    again = pki.PkiPaths(certs).site("site-b")
    impostor = credentials.load_signer(again.signing_key, again.signing_cert, "site-b")
    with pytest.raises(pki.FedGanError, match="not the one membership list version 2 names"):
        credentials.load_verifier(paths.ca_cert, paths.crl, kit_list, work)(
            "site-b", impostor.cert_pem, b"k", impostor.sign(b"k")
        )


def test_the_ca_decides_a_sites_names_and_never_certifies_beside_its_own_keys(certs, tmp_path):
    """A site asks for a sidecar certificate in the aggregator's names (to
    pose as the edge to other sites): the CA ignores the request's names.
    And a site directory holding keys the CA made is not certified again."""
    site_dir = tmp_path / "hospital"
    requests = pki.site_keys(site_dir, "st-olav")
    key = serialization.load_pem_private_key((site_dir / "sidecar.key").read_bytes(), None)
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "st-olav-sidecar")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("superlink"), x509.DNSName("edge")]),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    requests.sidecar_csr.write_bytes(greedy.public_bytes(serialization.Encoding.PEM))
    site = pki.sign_requests(certs, requests.dir)
    sans = pki.inspect_cert(site.sidecar_cert)["sans"]
    assert "superlink" not in sans and "edge" not in sans and "st-olav-sidecar" in sans
    pki.issue_site(certs, "site-z")
    other = pki.site_keys(tmp_path / "z", "site-z")
    with pytest.raises(pki.PkiError, match="holds private keys the CA made"):
        pki.sign_requests(certs, other.dir, force=True)


def test_a_kept_crl_or_list_that_no_longer_verifies_stops_the_site(certs, tmp_path):
    paths = pki.PkiPaths(certs)
    pki.write_membership(certs)
    work = tmp_path / "work"
    work.mkdir()
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, "Test Consortium")
    (work / credentials.ADOPTED_CRL).write_bytes((rogue / "ca" / "crl.pem").read_bytes())
    with pytest.raises(pki.PkiError, match=r"crl\.pem is not signed by the consortium CA"):
        credentials.load_verifier(paths.ca_cert, paths.crl, paths.membership, work)
    (work / credentials.ADOPTED_CRL).unlink()
    (work / credentials.ADOPTED_MEMBERSHIP).write_bytes(b'{"membership": {}, "signature": ""}')
    with pytest.raises(pki.PkiError, match=r"membership\.json"):
        credentials.load_verifier(paths.ca_cert, paths.crl, paths.membership, work)


def test_the_edge_bindings_follow_issue_and_revoke(certs):
    """Each unrevoked site's client certificate bound to its own node key, as
    the SuperNode sends it; `fedgan pki bindings` rewrites the file."""
    from typer.testing import CliRunner

    from fedgan.cli import app

    paths = pki.PkiPaths(certs)
    bound = paths.node_bindings.read_text()
    site = paths.site("site-a")
    own = pki.node_binding(pki.load_cert(site.client_cert), site.node_pub.read_bytes())
    assert f'"{own}" 1;' in bound
    paths.node_bindings.unlink()
    out = CliRunner().invoke(app, ["pki", "bindings", "--out", str(certs)])
    assert out.exit_code == 0 and "sites bound" in out.output
    assert paths.node_bindings.read_text() == bound
    pki.revoke_site(certs, "site-a")
    assert own not in paths.node_bindings.read_text()
