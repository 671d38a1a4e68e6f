"""The round timeline (`fedgan.timeline`, read by `bench/round_overhead.py`)
from real processes: the ServerApp and every ClientApp process of a secure
run mark their steps in one file, and each round reads back whole."""

from __future__ import annotations

import pytest

from fedgan import timeline

pytestmark = pytest.mark.integration

STAGES = ["secagg_advertise", "secagg_share", "train", "secagg_confirm", "secagg_unmask"]


def test_every_stage_of_every_round_is_timed_at_both_ends(finished_run):
    run_dir, _ = finished_run
    marks = timeline.read(run_dir.parent / "timeline.jsonl")
    rounds = timeline.rounds(marks)
    assert [r.round for r in rounds] == [1, 2]
    # Round 2's keys and shares came during round 1's confirm and unmask
    # exchanges (issue 34): three messages.
    assert [s.kind for s in rounds[0].stages] == STAGES
    assert [s.kind for s in rounds[1].stages] == STAGES[2:]
    for r in rounds:
        # Both sites' ClientApp processes were found for every stage, each
        # with all five parts (process start from /proc included).
        assert all(s.sites == 2 and len(s.parts) == 5 for s in r.stages), r.stages
        assert all(v >= -0.05 for s in r.stages for v in s.parts.values()), r.stages
        assert set(r.train) == {"silo", "admit", "steps", "update", "mask"}
        assert 0 < r.train["steps"] < r.wall
        # The stages run one after another inside the round.
        assert sum(s.wall for s in r.stages) + r.between <= r.wall + 0.01
        assert {"publish", "keep"} <= set(r.server)
    # Nothing but names, ids, groups and times: no value of an update.
    allowed = {"t", "pid", "event", "kind", "group", "n", "node", "round", "stage", "site"}
    assert {k for m in marks for k in m} <= allowed | {"started"}
