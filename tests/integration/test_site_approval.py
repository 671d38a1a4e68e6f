"""A hospital runs only the code and settings it approved, in a real 3-site
federation (SuperLink, edge, sidecars, SuperNodes with FedGAN's ClientApp
runtime):

1. the config-only bundle: site-1 (hash-only policy, hash not approved) and
   site-3 (requires σ ≥ 5, the run asks for 1) refuse it with their reasons,
   the run goes on with site-2 alone and the two are left out of round 2;
2. a bundle with an added Python file, whose ClientApp would write a marker
   file at import, is refused by every site before any of it runs: the
   marker never appears, and the run stops, naming each refusal.
"""

from __future__ import annotations

import json
import textwrap
import tomllib

import pytest
import tomli_w

from fedgan import pki
from fedgan.audit_log import AuditLog
from fedgan.config.appbundle import default_run_config, fab_sha256, stage_app_dir, write_run_config
from fedgan.deploy.local import LocalFederation, SiteSpec
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.progress import format_round
from fedgan.silo.synth import synth_silo
from fedgan.site.approval import PolicyStore

pytestmark = pytest.mark.integration

SMALL = {
    "image-size": 16,
    "width": 8,
    "latent-dim": 16,
    "local-steps": 2,
    "batch-size": 4,
    "noise-multiplier": 1.0,
    "secagg": False,  # a secure sum of one site's update is refused; this is about approval
    "min-sites": 3,
    "round-timeout": 300.0,
}


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("approval")
    certs = root / "certs"
    pki.init_ca(certs, "Approval")
    pki.issue_aggregator(certs)
    sites = []
    for i in (1, 2, 3):
        pki.issue_site(certs, f"site-{i}")
        silo = synth_silo(root / f"silo-{i}", "fundus", 12, seed=i, size=16)
        sites.append(SiteSpec(f"site-{i}", silo, "fundus"))
    fed = LocalFederation(root / "fed", certs, sites)
    # Each hospital's own choice, made before it joins: these runs are
    # about approval, and a secure sum of one site's update is refused.
    for site in sites:
        PolicyStore(fed.site_work_dir(site.site_id), site.site_id).update(
            require_secure_aggregation=False
        )
    PolicyStore(fed.site_work_dir("site-1"), "site-1").update(mode="hash-only")
    PolicyStore(fed.site_work_dir("site-3"), "site-3").update(min_noise_multiplier=5.0)
    with fed:
        fed.start()
        yield fed, root


def test_sites_refuse_what_they_did_not_approve_and_the_run_goes_on(federation):
    fed, root = federation
    app_dir = stage_app_dir(root / "app-ok")
    digest = fab_sha256(app_dir)
    config = default_run_config() | SMALL | {"num-server-rounds": 2, "run-dir": str(root / "ok")}
    fed.run(app_dir, write_run_config(root / "ok.toml", config), timeout=900)

    rounds = [json.loads(x) for x in (root / "ok" / "metrics.jsonl").read_text().splitlines()]
    first, second = rounds
    assert first["sites"] == ["site-2"] and first["sites_failed"] == 0
    assert set(first["refused"]) == {"site-1", "site-3"}
    assert f"app bundle {digest} is not approved" in first["refused"]["site-1"]
    assert "fedgan site approve " + digest in first["refused"]["site-1"]
    assert (
        "noise multiplier 1.000; this site requires at least 5.000" in (first["refused"]["site-3"])
    )
    assert second["sites"] == ["site-2"] and second["sites_sampled"] == 1
    assert "refused" not in second
    # The operator's view of round 1 names both refusals with their reasons.
    lines = format_round(first, 2)
    assert any(line.startswith("  site-1 refused: app bundle") for line in lines)
    assert any(line.startswith("  site-3 refused: the run would train") for line in lines)
    # Audit lines: at each refusing site, and at the aggregator.
    for site, why in (("site-1", "hash-only"), ("site-3", "noise multiplier")):
        log = AuditLog(fed.site_work_dir(site) / "audit.jsonl")
        assert log.verify().ok
        refused = [e for e in _events(log.path) if e["event"] == "refused"]
        assert refused and why in refused[0]["reason"] and refused[0]["site"] == site
    assert not [
        e for e in _events(fed.site_work_dir("site-2") / "audit.jsonl") if e["event"] == "refused"
    ]
    agg = [e for e in _events(root / "audit.jsonl") if e["event"] == "site_refused"]
    assert {(e["site"], e["round"]) for e in agg} == {("site-1", 1), ("site-3", 1)}
    # Site-3 refused before its ledger recorded a spend; site-2 spent twice.
    assert PrivacyLedger.in_work_dir(fed.site_work_dir("site-3")).spends() == []
    assert len(PrivacyLedger.in_work_dir(fed.site_work_dir("site-2")).spends()) == 2


def test_a_bundle_carrying_code_is_refused_before_any_of_it_runs(federation):
    fed, root = federation
    marker = root / "evil-ran"
    app_dir = root / "app-evil"
    stage_app_dir(app_dir)
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "evil_client:app"
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    (app_dir / "evil_client.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path

            import fedgan.site.client_app

            Path({str(marker)!r}).write_text("imported")
            app = fedgan.site.client_app.app
            """
        )
    )
    config = default_run_config() | SMALL | {"num-server-rounds": 1, "run-dir": str(root / "evil")}
    fed.run(app_dir, write_run_config(root / "evil.toml", config), timeout=600)

    assert not marker.exists(), "the bundle's code ran at a site"
    (record,) = [json.loads(x) for x in (root / "evil" / "metrics.jsonl").read_text().splitlines()]
    assert record["sites"] == [] and set(record["refused"]) == {"site-1", "site-2", "site-3"}
    for site, why in record["refused"].items():
        assert "carries files other than configuration (evil_client.py)" in why, site
        events = _events(fed.site_work_dir(site) / "audit.jsonl")
        assert any("evil_client.py" in e.get("reason", "") for e in events), site
    status = json.loads((root / "evil" / "status.json").read_text())
    assert status["status"] == "failed" and "no site will take part" in status["reason"]
    # What the operator's `flwr run --stream` (and so `fedgan run`) showed.
    log = (fed.logs / "flwr-run.log").read_text()
    assert "site site-2 refused: app bundle" in log
    assert "fedgan: no site will take part any more" in log


def test_a_run_starts_from_a_pretrained_init_that_sites_pin_or_refuse(federation):
    """`fedgan pretrain` on a stand-in public set, `model.init` in
    federation.yaml, and a real round: site-1 pins the init's weights hash
    and trains from it (its ClientApp checked round 1's model against the
    hash), site-3 pins another and refuses before any spend."""
    import hashlib
    import subprocess
    import sys

    from fedgan.config import federation as federation_yaml
    from fedgan.model_init import load_init

    fed, root = federation
    public = synth_silo(root / "public", "fundus", 24, seed=42, size=16, profile="public")
    spec_yaml = root / "init-federation.yaml"
    spec_yaml.write_text(
        "model:\n  image_size: 16\n  width: 8\n  latent_dim: 16\n  init: init.pt\n"
    )
    init_path = root / "init.pt"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgan.cli",
            "pretrain",
            "--data",
            str(public),
            "--out",
            str(init_path),
            "--config",
            str(spec_yaml),
            "--steps",
            "4",
            "--batch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    init = load_init(init_path)
    assert f"weights sha256  {init.weights_sha256}" in out and "stand-in public set" in out
    assert init_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    PolicyStore(fed.site_work_dir("site-1"), "site-1").update(
        mode="config-only", init_hashes=[init.weights_sha256]
    )
    PolicyStore(fed.site_work_dir("site-3"), "site-3").update(
        min_noise_multiplier=0.0, init_hashes=["ab" * 32]
    )
    config = default_run_config() | SMALL | federation_yaml.load(spec_yaml)
    config |= {"num-server-rounds": 1, "run-dir": str(root / "from-init"), "min-sites": 3}
    fed.run(stage_app_dir(root / "app-init"), write_run_config(root / "init.toml", config))

    run = root / "from-init"
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["sites"] == ["site-1", "site-2"], record
    assert "not one this site pins" in record["refused"]["site-3"]
    recorded = json.loads((run / "run-config.json").read_text())["model-init-record"]
    assert recorded["weights_sha256"] == init.weights_sha256
    assert recorded["file_sha256"] == hashlib.sha256(init_path.read_bytes()).hexdigest()
    assert recorded["data"]["stand_in"] is True
    started = [e for e in _events(root / "audit.jsonl") if e["event"] == "run_started"][-1]
    assert started["model_init"]["weights_sha256"] == init.weights_sha256
    ledger = fed.site_work_dir("site-3") / "privacy-ledger.jsonl"
    assert not ledger.exists() or "from-init" not in ledger.read_text()
    from fedgan.report import starting_point

    assert init.file_sha256 in starting_point(run) and "stand-in" in starting_point(run)
