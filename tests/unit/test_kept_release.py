"""The aggregate of a mean-embedding round, kept before G is fitted: read back
exactly, refused when it does not fit the run, and what a resume starts from."""

from __future__ import annotations

import numpy as np
import pytest

from fedgan.appbundle import default_run_config
from fedgan.outputs import KeptRelease, KeptReleaseError, RunOutputs, kept_rounds
from fedgan.run_config import ConfigError, RunSettings
from fedgan.server_app import _start

DIGEST = "ab" * 32


def _kept(server_round: int = 1, shape: tuple[int, int] = (3, 9)) -> KeptRelease:
    mean = np.random.default_rng(0).normal(size=shape)
    record = {"round": server_round, "sites": ["site-1", "site-2"], "examples": 61.0}
    received = [("site-1", 30.0, {"epsilon": 5.9}), ("site-2", 31.0, {"epsilon": 5.95})]
    return KeptRelease(server_round, mean, record, received, DIGEST)


def test_a_kept_sum_reads_back_exactly(tmp_path):
    out = RunOutputs(tmp_path)
    assert out.kept_release(1, DIGEST, (3, 9)) is None and kept_rounds(tmp_path) == []
    kept = _kept()
    path = out.keep_release(kept)
    assert path.name == "release_round_001.npz" and kept_rounds(tmp_path) == [1]
    back = out.kept_release(1, DIGEST, (3, 9))
    assert back is not None
    np.testing.assert_array_equal(back.mean, kept.mean)  # float64, bit for bit
    assert back.record == kept.record and back.received == kept.received


@pytest.mark.parametrize(
    ("digest", "shape"), [("cd" * 32, (3, 9)), (DIGEST, (3, 11)), (DIGEST, (5, 9))]
)
def test_a_sum_from_other_features_or_classes_is_refused(tmp_path, digest, shape):
    out = RunOutputs(tmp_path)
    out.keep_release(_kept())
    with pytest.raises(
        KeptReleaseError, match=r"release_round_001\.npz.*resume with the run's own"
    ):
        out.kept_release(1, digest, shape)


def test_an_unreadable_sum_is_named_and_left_in_place(tmp_path):
    out = RunOutputs(tmp_path)
    path = out.keep_release(_kept())
    path.write_bytes(path.read_bytes()[:100])  # torn by hand: writes are atomic
    with pytest.raises(KeptReleaseError, match=r"release_round_001\.npz cannot be read.*move it"):
        out.kept_release(1, DIGEST, (3, 9))
    assert path.stat().st_size == 100


def test_a_run_stopped_in_its_first_fit_resumes_at_round_one(tmp_path):
    cfg = default_run_config() | {
        "run-dir": str(tmp_path),
        "mechanism": "mean-embedding",
        "num-server-rounds": 1,
    }
    out = RunOutputs(tmp_path)
    out.keep_release(_kept())
    # Not over the kept sum without resume = true, as over a checkpoint...
    with pytest.raises(ConfigError, match=r"release_round_001\.npz exists; set resume = true"):
        _start(RunSettings.from_run_config(cfg), out)
    # ...and with it, round 1 again from G's seeded start (there is no checkpoint yet).
    cfg["resume"] = True
    gen, disc, first = _start(RunSettings.from_run_config(cfg), out)
    fresh, _, _ = _start(
        RunSettings.from_run_config(cfg | {"run-dir": str(tmp_path / "new"), "resume": False}),
        RunOutputs(tmp_path / "new"),
    )
    assert first == 1
    for a, b in zip(gen.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    # A later checkpoint wins: the kept round is then behind the run.
    out.save_checkpoint(gen, disc, 1)
    assert _start(RunSettings.from_run_config(cfg), out)[2] == 2
