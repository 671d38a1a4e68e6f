"""A real federation: 2 sites, 2 rounds through edge and sidecars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedgan import pki
from fedgan.deploy.local import LocalFederation
from fedgan.deploy.process import ProcessFailed
from fedgan.dumps import load_dump
from tests.proc import pids_in_groups
from tests.runs import learned_indices

pytestmark = pytest.mark.integration


def test_run_completes_with_outputs(finished_run):
    run_dir, lines = finished_run
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    for r in (1, 2):
        png = run_dir / f"samples_round_{r:03d}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["sites"] == ["site-1", "site-2"] and m["sites_failed"] == 0 for m in metrics)
    assert all(
        np.isfinite(m["g_loss"]) and np.isfinite(m["d_loss"]) and m["seconds"] > 0 for m in metrics
    )
    assert (run_dir / "generator.pt").stat().st_size > 0
    assert any(line.startswith("round 2/2") for line in lines)
    # It started from G and D pretrained on the stand-in public set, and says so.
    assert any(line.startswith("init          pretraining on a stand-in") for line in lines)
    init = json.loads((run_dir / "run-config.json").read_text())["model-init-record"]
    assert init["data"]["stand_in"] is True and init["steps"] == 3
    # site-1 evaluated it against the model it started from and the held-out images.
    assert any(line.startswith("  start         domain-FID") for line in lines)
    assert any(line.startswith("  privacy") for line in lines)
    # The demo writes the report; `fedgan report` rewrites it the same way.
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Secure aggregation was on" in page
    assert "Started from a model pretrained without DP on a stand-in public set" in page
    assert init["weights_sha256"] in page and "<h2>Evaluation</h2>" in page
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgan.cli",
            "report",
            str(run_dir),
            "--out",
            str(run_dir / "r.html"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0 and (run_dir / "r.html").read_text() == page


def test_global_model_is_the_securely_aggregated_mean_of_what_sites_sent(finished_run):
    """Secure aggregation is on by default: the server only ever held the sum,
    and the model moved by the mean of the sites' clipped updates to within
    the quantization bound the server reports."""
    run_dir, _ = finished_run
    flower_run = json.loads((run_dir / "status.json").read_text())["flower_run_id"]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learned = learned_indices(run_dir)
    for r in (1, 2):
        m = metrics[r - 1]
        assert m["secagg"]["survivors"] == ["site-1", "site-2"] and m["secagg"]["dropped"] == []
        bound, value_range = m["secagg_error_bound"], m["secagg"]["value_range"]
        assert 0 < bound < value_range / 100
        before = load_dump(run_dir / "dumps" / f"round_{r:03d}" / "global_before.npz")
        after = load_dump(run_dir / "dumps" / f"round_{r:03d}" / "global_after.npz")
        sent = [
            load_dump(
                run_dir
                / "sites"
                / s
                / "dumps"
                / str(flower_run)
                / "dumps"
                / f"round_{r:03d}"
                / "update.npz"
            )
            for s in ("site-1", "site-2")
        ]
        weights = [float(u["weight"][0]) for u in sent]
        assert weights == [1.0, 1.0]  # each counts once: no image count leaves a site
        # The sites' own numbers came inside the mask: their means only.
        assert "noise_figure" not in m and ("noise_figure_mean" in m) == ("epsilon" in m)
        assert all(np.isfinite(m[k]) for k in ("g_loss", "d_loss", "update_norm"))
        values = sum(a.size for net in ("gen", "disc") for a in before[net])
        for net in ("gen", "disc"):
            for i in learned[net]:
                base = before[net][i]
                clipped = [np.clip(u[net][i], -value_range, value_range) for u in sent]
                expected = base + sum(w * c for w, c in zip(weights, clipped, strict=True)) / sum(
                    weights
                )
                np.testing.assert_allclose(after[net][i], expected, rtol=0, atol=bound + 1e-6)
        # 12-bit values summed modulo 2^13 travel as uint16: 2 bytes a value,
        # plus keys, shares and signatures.
        for site_bytes in m["update_bytes"].values():
            assert 2 * values < site_bytes < 2 * values + 20_000
        # The sites really trained: their updates differ and are non-zero.
        for net in ("gen", "disc"):
            assert any(np.abs(u[net][0]).max() > 0 for u in sent)
        assert not np.array_equal(sent[0]["disc"][0], sent[1]["disc"][0])


def test_deployment_map_and_no_process_left(finished_run):
    run_dir, _ = finished_run
    deployment = json.loads((run_dir / "deployment.json").read_text())
    roles = [p["name"] for p in deployment["processes"]]
    assert roles == [
        "superlink",
        "edge",
        "sidecar-site-1",
        "clientapp-site-1",  # the site's warm ClientApp runtime
        "supernode-site-1",
        "sidecar-site-2",
        "clientapp-site-2",
        "supernode-site-2",
    ]
    assert all(p["address"] for p in deployment["processes"])
    warm = [p for p in deployment["processes"] if p["name"].startswith("clientapp-")]
    assert all(p["address"].startswith("unix:") and not p["files"] for p in warm)  # no keys
    assert all(p["files"] for p in deployment["processes"] if p not in warm)
    edge = next(p for p in deployment["processes"] if p["name"] == "edge")
    assert edge["files"]["crl"].endswith("crl.pem")
    assert pids_in_groups({p["pid"] for p in deployment["processes"]}) == []
    # FLWR_HOME lives inside the run folder, never in the user's home.
    assert (run_dir / "operator" / "flwr-home" / "config.toml").exists()


def test_sigterm_to_demo_stops_every_process(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedgan.cli",
            "demo",
            "--no-pretrain",
            "--no-evaluate",
            "--sites",
            "1",
            "--rounds",
            "50",
            "--image-size",
            "16",
            "--images-per-site",
            "8",
            "--out",
            str(tmp_path),
            "--run-id",
            "sig",
            "--config",
            "secagg=false",
            "--config",
            "batch-size=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deployment = tmp_path / "sig" / "deployment.json"
    deadline = time.monotonic() + 120
    while not deployment.exists():
        assert demo.poll() is None, demo.stdout.read().decode()
        assert time.monotonic() < deadline, "deployment.json never appeared"
        time.sleep(0.5)
    processes = json.loads(deployment.read_text())["processes"]
    pids = {p["pid"] for p in processes}
    assert pids_in_groups(pids)
    # Issue 34: the SuperLink and the SuperNode (and the SuperExec each
    # spawns with its environment) poll for tasks every 0.25 s, not Flower's 1 s.
    for p in processes:
        if p["name"].startswith(("superlink", "supernode")):
            environ = Path(f"/proc/{p['pid']}/environ").read_bytes().split(b"\0")
            assert b"FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.25" in environ, p["name"]
    demo.send_signal(signal.SIGTERM)
    out = demo.communicate(timeout=60)[0].decode()
    assert demo.returncode == 130, out
    assert "stopped" in out
    assert pids_in_groups(pids) == []


def test_a_process_that_fails_to_start_is_named_with_its_log(tmp_path):
    certs = tmp_path / "certs"
    pki.init_ca(certs, "T")
    pki.issue_aggregator(certs)
    pki.PkiPaths(certs).server_key.write_text("not a key\n")
    fed = LocalFederation(tmp_path / "run", certs, [], start_timeout=30)
    with fed, pytest.raises(ProcessFailed) as info:
        fed.start()
    message = str(info.value)
    assert message.startswith("superlink (flower-superlink")
    assert "Last lines of" in message and "superlink.log" in message
    assert pids_in_groups({p.pid for p in fed.group.processes}) == []


def test_audit_log_records_the_run_and_detects_tampering(finished_run, tmp_path):
    run_dir, _ = finished_run
    log = run_dir.parent / "audit.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events if e.get("run") == run_dir.name]
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed"
    joined = sorted(e["site"] for e in events if e["event"] == "site_joined")
    assert joined == ["site-1", "site-2"]
    ok = subprocess.run(
        [sys.executable, "-m", "fedgan.cli", "audit", "verify-log", str(log)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and f"{len(events)} entries, chain intact" in ok.stdout
    copy = tmp_path / "audit.jsonl"
    lines = log.read_text().splitlines()
    copy.write_text("\n".join([lines[0].replace("run_started", "run_startex"), *lines[1:]]) + "\n")
    (tmp_path / "audit.jsonl.head").write_text((log.parent / "audit.jsonl.head").read_text())
    bad = subprocess.run(
        [sys.executable, "-m", "fedgan.cli", "audit", "verify-log", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "line 2 does not follow line 1" in bad.stderr
