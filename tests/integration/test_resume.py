"""FedProx with a fraction of sites per round, then a resume: the run goes on
from its checkpoint with the same ledgers and round numbers."""

from __future__ import annotations

import json

import pytest
import torch

from fedgan.demo import DemoOptions, run_demo
from fedgan.privacy.ledger import PrivacyLedger
from tests.federations import small_federation

pytestmark = pytest.mark.integration


def test_fedprox_sampling_checkpoint_and_resume(tmp_path):
    opts = small_federation(
        tmp_path,
        "resumable",
        sites=3,
        rounds=2,
        images_per_site=12,
        extra_config={
            "strategy": "fedprox",
            "prox-mu": 0.1,
            "fraction-sites": 0.5,
            "noise-multiplier": 2.0,
            "batch-size": 4,
            "mode-seeking": 1.0,  # G's extra term, through real SuperNodes
        },
    )
    run_dir = run_demo(opts, say=lambda _: None)
    first = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert first["round"] == 2
    assert set(first) == {"spec", "gen", "disc", "round", "metrics_line"}
    lines: list[str] = []
    run_demo(DemoOptions(resume=run_dir, rounds=3), say=lines.append)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["sites_sampled"] == 2 and r["sites_available"] == 3 for r in rounds)
    # The term is reported apart from G's loss, before and after the resume.
    assert all(r["mode_seeking_loss"] > 0 for r in rounds)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"] == 3
    # The resumed run prints only its new round.
    assert [x.split()[1] for x in lines if x.startswith("round ")] == ["3/3"]
    assert "mode-seeking" in next(x for x in lines if x.startswith("round "))
    trained = []
    for site in ("site-1", "site-2", "site-3"):
        spends = PrivacyLedger.in_work_dir(run_dir / "sites" / site).spends()
        assert {s.run for s in spends} <= {"resumable"}  # one run name across the resume
        rounds_spent = [s.round for s in spends]
        assert len(rounds_spent) == len(set(rounds_spent))
        trained += rounds_spent
    assert sorted(trained) == [1, 1, 2, 2, 3, 3]  # 2 of 3 sites per round
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["rounds"] == 3
