"""Secure aggregation through the real mutual-TLS deployment, with a site
dying during the masked-input stage: the round completes and the model
moves by the mean of the two survivors' updates, within the bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedgan.demo import run_demo
from fedgan.dumps import load_dump
from tests.federations import small_federation
from tests.runs import learned_indices

pytestmark = pytest.mark.integration
SITES = ("site-1", "site-2", "site-3")


def test_a_site_killed_at_the_masked_input_stage_drops_out_of_the_sum(tmp_path):
    lines: list[str] = []
    run_dir = run_demo(
        small_federation(
            tmp_path,
            "dropout",
            sites=3,
            dump_updates=True,
            # t = 2 of 3 tolerates one dropout; the demo relaxes the sites'
            # default rule (⌊2n/3⌋ + 1 = 3) to allow it, and says so.
            extra_config={
                "noise-multiplier": 1.0,
                "batch-size": 4,
                "secagg-timeout": 20.0,
                "secagg-threshold": 2,
            },
            # site-3's ClientApp is SIGKILLed as the masked-input stage
            # reaches it, after the site has shared its keys.
            site_env={"site-3": {"FEDGAN_FAULT": "secagg_mask"}},
        ),
        say=lines.append,
    )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed"
    (m,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m["secagg"]["survivors"] == ["site-1", "site-2"]
    assert m["secagg"]["dropped"] == ["site-3"]
    assert m["secagg"]["threshold"] == 2
    assert m["secagg"]["failures"]["site-3"].startswith("secagg_mask")
    assert m["sites"] == ["site-1", "site-2"] and "skipped" not in m
    bound, value_range = m["secagg_error_bound"], m["secagg"]["value_range"]

    dumps = run_dir / "dumps" / "round_001"
    before, after = load_dump(dumps / "global_before.npz"), load_dump(dumps / "global_after.npz")
    sent = {
        s: load_dump(
            run_dir
            / "sites"
            / s
            / "dumps"
            / str(status["flower_run_id"])
            / "dumps"
            / "round_001"
            / "update.npz"
        )
        for s in SITES
    }
    survivors = [sent["site-1"], sent["site-2"]]
    learned = learned_indices(run_dir)
    err_2, err_3 = [], []
    for net in ("gen", "disc"):
        for i in learned[net]:
            base = before[net][i]
            expected = base + np.mean(
                [np.clip(u[net][i], -value_range, value_range) for u in survivors], axis=0
            )
            np.testing.assert_allclose(after[net][i], expected, rtol=0, atol=bound + 1e-6)
            with_3 = base + np.mean([u[net][i] for u in sent.values()], axis=0)
            err_2.append((after[net][i] - expected).ravel())
            err_3.append((after[net][i] - with_3).ravel())
    # site-3 trained too and its update differs: the model is much closer to
    # the survivors' mean than to the mean of all three.
    rms = lambda e: float(np.sqrt(np.mean(np.concatenate(e) ** 2)))  # noqa: E731
    assert rms(err_2) < rms(err_3) / 3
