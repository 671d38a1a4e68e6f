"""A site's approval of app bundles and its limits on run settings
(`fedgan.site.approval`), and the hook in Flower's ClientApp runtime that applies
them before a bundle is installed (`fedgan.site.runtime`)."""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path

import pytest
import tomli_w
from flwr.cli.build import build_fab_from_files
from typer.testing import CliRunner

from fedgan import wire
from fedgan.audit_log import AuditLog
from fedgan.cli import app
from fedgan.config.appbundle import app_config
from fedgan.site import approval, work_dir
from fedgan.site import runtime as site_runtime
from fedgan.site.approval import AppRefused, Limits, PolicyError, PolicyStore, SitePolicy

VERSION = approval.installed_version()


@pytest.fixture(autouse=True)
def _site_set_up(tmp_path):
    """Every test here works in a site's work dir, set up as `fedgan site
    init` does (an approval file is never created on first use)."""
    work_dir.init(tmp_path, "s1")


def _fab(
    extra: dict[str, bytes] | None = None,
    clientapp: str | None = None,
    dependencies: list[str] | None = None,
    optional: dict[str, list[str]] | None = None,
) -> bytes:
    config = app_config()
    if clientapp is not None:
        config["tool"]["flwr"]["app"]["components"]["clientapp"] = clientapp
    if dependencies is not None:
        config["project"]["dependencies"] = dependencies
    if optional is not None:
        config["project"]["optional-dependencies"] = optional
    files = {"pyproject.toml": tomli_w.dumps(config).encode(), **(extra or {})}
    return build_fab_from_files(files)[0]


def _policy(**kw) -> SitePolicy:
    return SitePolicy(versions=[VERSION], **kw)


def test_config_only_bundle_on_an_approved_version_is_admitted():
    fab = _fab()
    assert approval.admit_fab(_policy(), fab, "s1", VERSION) == approval.fab_sha256(fab)


@pytest.mark.parametrize(
    ("fab", "policy", "version", "why"),
    [
        (_fab({"client.py": b"print(1)"}), _policy(), VERSION, "carries files other than"),
        (_fab({"fedgan/__init__.py": b""}), _policy(), VERSION, "fedgan/__init__.py"),
        (_fab({"settings.yaml": b"a: 1"}), _policy(), VERSION, "settings.yaml"),
        (_fab(clientapp="os:system"), _policy(), VERSION, "names ClientApp 'os:system'"),
        (_fab(), _policy(), "9.9.9", "fedgan 9.9.9 installed here is not approved"),
        (_fab(), _policy(mode=approval.HASH_ONLY), VERSION, "hash-only policy"),
        (b"not a zip", _policy(), VERSION, "not a readable FAB"),
        (_fab(dependencies=["flwr", "evil-wheel==6.6.6"]), _policy(), VERSION, "(evil-wheel"),
        (_fab(optional={"x": ["torch-ext"]}), _policy(), VERSION, "declares dependencies"),
        (_fab(dependencies=["flwr @ https://x.test/f.whl"]), _policy(), VERSION, "flwr @"),
    ],
    ids=[
        *["python", "shadow-package", "data", "clientapp", "version", "hash-only", "garbage"],
        *["dependency", "optional-dependency", "flwr-from-a-url"],
    ],
)
def test_bundles_a_site_did_not_approve_are_refused(fab, policy, version, why):
    with pytest.raises(AppRefused, match="refused by site s1") as err:
        approval.admit_fab(policy, fab, "s1", version)
    assert why in str(err.value)


def test_hash_only_admits_exactly_the_approved_hash():
    fab = _fab()
    policy = _policy(mode=approval.HASH_ONLY, hashes=[approval.fab_sha256(fab)])
    assert approval.admit_fab(policy, fab, "s1", VERSION)
    changed = app_config()
    changed["tool"]["flwr"]["app"]["config"]["num-server-rounds"] = 999
    fab2 = build_fab_from_files({"pyproject.toml": tomli_w.dumps(changed).encode()})[0]
    with pytest.raises(AppRefused, match="not approved under this site's hash-only"):
        approval.admit_fab(policy, fab2, "s1", VERSION)


def test_refusal_survives_flowers_error_reply_format():
    refusal = AppRefused("st-olav", "the run targets ε 20; this site allows at most 8")
    # flwr 1.41's run_clientapp: str(type(ex)) + ":<'" + str(ex) + "'>"
    reason = str(type(refusal)) + ":<'" + str(refusal) + "'>"
    assert wire.parse_refusal(reason) == (
        "st-olav",
        "the run targets ε 20; this site allows at most 8",
    )
    assert wire.parse_refusal("<class 'ValueError'>:<'boom'>") is None


@pytest.mark.parametrize(
    ("limits", "run", "why"),
    [
        (Limits(), {"dp": False}, "turns differential privacy off"),
        (Limits(min_noise_multiplier=1.0), {"noise_multiplier": 0.7}, "at least 1.000"),
        (Limits(max_target_epsilon=4), {"target_epsilon": 8.0}, "at most 4"),
        (Limits(), {"secure_aggregation": False}, "no secure aggregation; this site requires"),
    ],
)
def test_runs_weaker_than_the_sites_limits_are_refused(limits, run, why):
    settings = {
        "dp": True,
        "noise_multiplier": 1.2,
        "target_epsilon": 3.0,
        "secure_aggregation": True,
    } | run
    with pytest.raises(AppRefused, match=why):
        approval.check_run(limits, "s1", **settings)


def test_runs_within_the_limits_pass():
    limits = Limits(min_noise_multiplier=1.0, max_target_epsilon=4, require_secure_aggregation=True)
    approval.check_run(
        limits, "s1", dp=True, noise_multiplier=1.0, target_epsilon=4.0, secure_aggregation=True
    )
    approval.check_run(
        Limits(require_dp=False, require_secure_aggregation=False),
        "s1",
        dp=False,
        noise_multiplier=None,
        target_epsilon=0,
        secure_aggregation=False,
    )


def test_policy_file_is_created_approving_the_installed_version_and_changes_are_audited(tmp_path):
    store = PolicyStore(tmp_path, "s1")
    policy = store.load()  # made by the site's setup (the fixture)
    assert policy.mode == approval.CONFIG_ONLY and policy.versions == [VERSION]
    digest = "ab" * 32
    store.approve(fab_hash=digest.upper())
    store.update(mode=approval.HASH_ONLY, min_noise_multiplier=0.9)
    store.revoke(version=VERSION)
    reloaded = PolicyStore(tmp_path).load()
    assert reloaded.hashes == [digest] and reloaded.versions == []
    assert reloaded.mode == approval.HASH_ONLY and reloaded.limits.min_noise_multiplier == 0.9
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.verify().ok
    events = [json.loads(x)["event"] for x in log.path.read_text().splitlines()]
    assert events == ["policy_created", "ledger_created", "approved", "policy_changed", "revoked"]


def test_a_missing_policy_file_is_refused_not_recreated_with_defaults(tmp_path):
    """Issue 33: a deleted approval.json was recreated on the next round, so
    whoever could delete it reset the site's limits."""
    store = PolicyStore(tmp_path, "s1")
    store.update(min_noise_multiplier=2.0)
    store.path.unlink()
    with pytest.raises(PolicyError, match=r"approval\.json is missing: .*`fedgan site init`"):
        store.load()
    assert not store.path.exists()
    # The site's own act, audited, writes the default limits back.
    done = work_dir.init(tmp_path, "s1")
    assert any("approval.json" in line for line in done)
    assert store.load().limits == Limits()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{not json", "not a valid approval file"),
        ('{"mode": "anything-goes"}', "mode 'anything-goes'"),
        ('{"mode": "hash-only", "hashes": ["123"]}', "not a SHA-256"),
        ('{"mode": "config-only", "limits": {"min_noise_multiplier": -1}}', "min_noise"),
        ('{"mode": "config-only", "limits": {"unknown": 1}}', "not a valid approval file"),
    ],
)
def test_a_bad_policy_file_is_named_and_left_as_it_is(tmp_path, text, named):
    (tmp_path / approval.POLICY_FILE).write_text(text)
    with pytest.raises(PolicyError, match=named) as err:
        PolicyStore(tmp_path).approve(version="1.0")
    assert str(tmp_path / approval.POLICY_FILE) in str(err.value)
    assert (tmp_path / approval.POLICY_FILE).read_text() == text


def test_revoking_what_is_not_approved_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="not approved"):
        PolicyStore(tmp_path).revoke(fab_hash="cd" * 32)


# -- the hook in Flower's runtime --------------------------------------------------


def _fake_runtime(tmp_path: Path, fab: bytes):
    installed: list[bytes] = []
    context = types.SimpleNamespace(node_config={"site-id": "s1", "work-dir": str(tmp_path)})
    run = types.SimpleNamespace(run_id=42)
    runtime = types.SimpleNamespace(
        pull_task_input=lambda client: ("msg", context, run, types.SimpleNamespace(content=fab)),
        install_from_fab=lambda content, **kw: installed.append(content),
    )
    return runtime, installed


def _as_flower_calls_it(runtime) -> None:
    _msg, _ctx, _run, fab = runtime.pull_task_input(object())
    runtime.install_from_fab(fab.content, skip_prompt=True)


def test_hook_refuses_before_install_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(site_runtime, "admitted_fab", None)
    runtime, installed = _fake_runtime(tmp_path, _fab({"evil.py": b"import os"}))
    site_runtime._hook(runtime)
    with pytest.raises(AppRefused, match=r"evil\.py"):
        _as_flower_calls_it(runtime)
    assert installed == [] and site_runtime.admitted_fab is None
    (event,) = [
        json.loads(x)
        for x in (tmp_path / "audit.jsonl").read_text().splitlines()
        if '"refused"' in x
    ]
    assert event["run"] == "42" and event["site"] == "s1" and "evil.py" in event["reason"]


def test_hook_installs_an_admitted_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(site_runtime, "admitted_fab", None)
    fab = _fab()
    runtime, installed = _fake_runtime(tmp_path, fab)
    site_runtime._hook(runtime)
    _as_flower_calls_it(runtime)
    assert installed == [fab] and site_runtime.admitted_fab == approval.fab_sha256(fab)


def test_hook_refuses_to_start_on_a_flower_without_those_steps():
    with pytest.raises(SystemExit, match="install_from_fab"):
        site_runtime._hook(types.SimpleNamespace(pull_task_input=None))


def test_flowers_runtime_pulls_then_installs_then_loads():
    """The order the hook relies on, in the installed Flower."""
    from flwr.supernode.runtime import run_clientapp

    source = inspect.getsource(run_clientapp.run_clientapp)
    pull = source.index("pull_task_input(")
    install = source.index("install_from_fab(")
    load = source.index("load_client_app_fn(")
    assert pull < install < load


def test_clientapp_refuses_in_a_runtime_that_did_not_check(tmp_path, monkeypatch):
    from fedgan.site import client_app

    monkeypatch.setattr(site_runtime, "admitted_fab", None)
    context = types.SimpleNamespace(
        node_config={"site-id": "s1", "data-dir": "/x", "kind": "fundus", "work-dir": str(tmp_path)}
    )
    msg = types.SimpleNamespace(metadata=types.SimpleNamespace(run_id=7))
    with pytest.raises(AppRefused, match="does not check app bundles"):
        client_app.train(msg, context)


# -- the CLI ----------------------------------------------------------------------


def test_site_cli_prints_and_changes_the_policy(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["site", "policy", "--work-dir", str(tmp_path)])
    assert out.exit_code == 0 and "config-only" in out.output and VERSION in out.output
    digest = "ef" * 32
    out = runner.invoke(
        app,
        [
            "site",
            "policy",
            "--work-dir",
            str(tmp_path),
            "--mode",
            "hash-only",
            "--max-epsilon",
            "4",
            "--min-noise",
            "0.8",
            "--require-secagg",
        ],
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["site", "approve", digest, "--work-dir", str(tmp_path)])
    assert out.exit_code == 0 and digest in out.output
    policy = PolicyStore(tmp_path).load()
    assert policy.mode == "hash-only" and policy.hashes == [digest]
    assert policy.limits == Limits(True, 0.8, 4.0, True)
    out = runner.invoke(app, ["site", "revoke", digest, "--work-dir", str(tmp_path)])
    assert out.exit_code == 0 and PolicyStore(tmp_path).load().hashes == []


def test_site_cli_pins_and_refuses_inits_and_limits_the_noise_figure(tmp_path):
    runner = CliRunner()

    def policy(*args: str):
        return runner.invoke(app, ["site", "policy", "--work-dir", str(tmp_path), *args])

    a, b = "ab" * 32, "cd" * 32
    out = policy("--allow-init", a, "--allow-init", b.upper(), "--max-noise-figure", "30")
    assert out.exit_code == 0, out.output
    assert f"pretrained inits   {a}, {b}" in out.output and "max noise figure   30" in out.output
    out = policy("--forget-init", a, "--max-noise-figure", "none", "--refuse-init")
    assert out.exit_code == 0 and "pretrained inits   refused" in out.output
    limits = PolicyStore(tmp_path).load().limits
    assert limits.init_hashes == [b] and limits.refuse_init and limits.max_noise_figure is None
    for args, named in (
        (("--forget-init", a), f"--forget-init {a}: not pinned"),
        (("--max-noise-figure", "lots"), "--max-noise-figure 'lots': give a number or 'none'"),
        (("--allow-init", "xyz"), "is not a SHA-256"),
    ):
        out = policy(*args)
        assert out.exit_code != 0 and named in out.output + str(out.exception), args
    assert PolicyStore(tmp_path).load().limits == limits  # nothing changed by a refused flag


def test_a_policy_written_before_secure_aggregation_was_required_now_requires_it(tmp_path):
    """The old code wrote `require_secure_aggregation: false` (its default)
    into every site's approval.json; that was never the site's choice."""
    store = PolicyStore(tmp_path, "s1")
    old = store.load()
    doc = json.loads(old.to_json())
    doc["limits"] = {"require_dp": True, "require_secure_aggregation": False}
    store.path.write_text(json.dumps(doc))
    assert store.current().limits.require_secure_aggregation is True
    assert store.load().limits.require_secure_aggregation is True
    events = [json.loads(line) for line in store.audit.path.read_text().splitlines()]
    assert events[-1]["event"] == "policy_upgraded"
    # Saved in the new form: a site's later --allow-no-secagg is its own choice.
    store.update(require_secure_aggregation=False)
    assert store.load().limits.require_secure_aggregation is False
