"""A real mean-embedding federation: 2 sites through edge and sidecars, each
releasing once through secure aggregation; the aggregator fits G to the sum.
Then a site evaluates it and the operator writes the report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedgan.demo import DemoOptions, run_demo
from fedgan.dumps import load_dump
from fedgan.privacy.ledger import PrivacyLedger
from fedgan.silo.synth import synth_silo
from tests.federations import small_federation
from tests.runs import FEDGAN, evaluate_as_site_1

pytestmark = pytest.mark.integration
SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    opts = small_federation(
        tmp_path_factory.mktemp("runs"),
        "me",
        images_per_site=30,
        local_steps=None,
        dump_updates=True,
        extra_config={
            "mechanism": "mean-embedding",
            "classes": "0,1,2,3,4",
            "embedding-features": 500,
            "embedding-fit-steps": 60,
            "target-epsilon": 6.0,
        },
    )
    lines: list[str] = []
    return run_demo(opts, say=lines.append), lines


def test_sites_release_once_and_the_aggregator_fits_to_the_secure_sum(released_run):
    run_dir, lines = released_run
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert any("G fit to the releases" in line for line in lines), lines
    assert "  fitting G to the releases: step 60/60" in "\n".join(lines)
    (m,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m["mechanism"] == "mean-embedding" and m["sites"] == list(SITES)
    assert m["secagg"]["survivors"] == list(SITES)
    assert m["g_loss"] < m["fit_loss_first"] and "d_loss" not in m
    # The noisy class counts of the sum add up to about the 60 images.
    assert list(m["class_counts"]) == ["0", "1", "2", "3", "4"]
    assert abs(sum(m["class_counts"].values()) - 60) < 30
    rare = [c for c, f in m["class_noise_figure"].items() if f > 1]
    assert rare and all(f"  class {c}: about" in "\n".join(lines) for c in rare)
    flower_run = json.loads((run_dir / "status.json").read_text())["flower_run_id"]
    sent = [
        load_dump(
            run_dir / "sites" / s / "dumps" / str(flower_run) / "dumps" / "round_001" / "update.npz"
        )
        for s in SITES
    ]
    # What each site sent is its release over its count: 5 classes × (2·500 + 1).
    assert [u["release"][0].shape for u in sent] == [(5, 1001)] * 2
    assert all("gen" not in u and "disc" not in u for u in sent)  # no model update is sent
    weights = [float(u["weight"][0]) for u in sent]
    # Each weight is the site's noisy count, a whole number near its 30
    # images, and the record's `examples` is their sum: no exact silo size.
    assert all(w == round(w) and abs(w - 30) < 30 for w in weights)
    assert m["examples"] == pytest.approx(sum(weights))
    value_range, bound = m["secagg"]["value_range"], m["secagg_error_bound"]
    # Under secure aggregation every site's release counts equally.
    expected = np.mean([np.clip(u["release"][0], -value_range, value_range) for u in sent], axis=0)
    (aggregate,) = load_dump(run_dir / "dumps" / "round_001" / "release_mean.npz")["release"]
    np.testing.assert_allclose(aggregate, expected, rtol=0, atol=bound + 1e-6)
    # The releases carry noise: two sites' class-fraction columns differ from
    # the exact fractions, and from each other.
    assert not np.array_equal(sent[0]["release"][0][:, -1], sent[1]["release"][0][:, -1])
    for s in SITES:
        (spend,) = PrivacyLedger.in_work_dir(run_dir / "sites" / s).spends()
        assert (spend.mechanism, spend.steps, spend.sample_rate) == ("mean-embedding", 1, 1.0)
        assert spend.epsilon_after == pytest.approx(m["epsilon"][s])
        assert 5.9 <= spend.epsilon_after <= 6.0
    assert (run_dir / "generator.pt").exists()
    assert (run_dir / "samples_round_001.png").read_bytes().startswith(b"\x89PNG")


def test_a_site_evaluates_it_without_the_untrained_discriminator(released_run, tmp_path):
    run_dir, _ = released_run
    held = synth_silo(tmp_path / "held", "fundus", 20, seed=5, size=16)
    done = evaluate_as_site_1(run_dir, held, 64)
    assert done.returncode == 0, done.stderr
    assert "one classifier" in done.stdout  # --classifier-seeds 1
    result = json.loads((run_dir / "evaluation" / "site-1.json").read_text())
    assert 0 <= result["privacy"]["mia_generator_auc"] <= 1
    assert "mia_discriminator_auc" not in result["privacy"]
    assert "realism" not in result["quality"]
    report = subprocess.run(
        [FEDGAN, "report", str(run_dir)], capture_output=True, text=True, check=True, timeout=120
    )
    html = Path(report.stdout.split()[-1]).read_text()
    assert "released once a noisy summary" in html and "site-1" in html


class _OperatorStops(Exception):
    pass


def test_an_aggregator_stopped_while_fitting_resumes_without_a_second_spend(tmp_path):
    """The sites spend when they release; the fit takes minutes. Stopped in
    the fit, the demo tears everything down; resumed, the aggregator fits G to
    the sum it kept and asks no site again, so every ledger holds one spend."""
    opts = small_federation(
        tmp_path,
        "stopped",
        images_per_site=30,
        local_steps=None,
        extra_config={
            "mechanism": "mean-embedding",
            "classes": "0,1,2,3,4",
            "embedding-features": 500,
            "embedding-fit-steps": 3000,  # ~100 s: the test stops it at step 300
            "target-epsilon": 6.0,
        },
    )

    def stop_in_the_fit(line: str) -> None:
        if "fitting G to the releases: step" in line:
            raise _OperatorStops(line)

    with pytest.raises(_OperatorStops):
        run_demo(opts, say=stop_in_the_fit)
    run_dir = tmp_path / "stopped"
    assert (run_dir / "release_round_001.npz").exists()
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.jsonl").exists()
    ledgers = {s: PrivacyLedger.in_work_dir(run_dir / "sites" / s) for s in SITES}
    spent = {s: ledger.spends() for s, ledger in ledgers.items()}
    assert all(len(spends) == 1 for spends in spent.values())

    lines: list[str] = []
    # The fit saved its state at step 300 (every tenth), before the line that stopped it.
    assert (run_dir / "fit_round_001.pt").exists()
    resumed = DemoOptions(resume=run_dir, rounds=1, extra_config={"embedding-fit-steps": 400})
    run_demo(resumed, say=lines.append)
    assert any("kept sum" in line for line in (run_dir / "logs" / "flwr-run.log").open())
    (m,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m["release_kept"] is True and m["sites"] == list(SITES)
    # It went on from the saved step (300, or a later tenth had the stop lagged).
    assert m["fit_resumed_at"] >= 300 and m["fit_resumed_at"] % 300 == 0
    assert m["fit_steps"] == max(400, m["fit_resumed_at"])
    assert not (run_dir / "fit_round_001.pt").exists()  # the checkpoint holds G now
    assert m["secagg"]["survivors"] == list(SITES)  # the stopped run's record, carried over
    assert all(ledger.spends() == spent[s] for s, ledger in ledgers.items())  # no second spend
    events = [json.loads(x)["event"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events.index("release_kept") < events.index("release_reused")
    assert events.count("site_joined") == 2  # recorded once, when the round's line was written
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "generator.pt").exists()
    assert "no hospital released twice" in (run_dir / "report.html").read_text()
