"""The aggregate of a mean-embedding round, kept before G is fitted: read back
exactly, refused when it does not fit the run, and what a resume starts from;
the fit's own saved state, which a resumed fit goes on from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgan.aggregator.run import start as _start
from fedgan.aggregator.run_store import KeptRelease, KeptReleaseError, RunOutputs, kept_rounds
from fedgan.config.appbundle import default_run_config
from fedgan.config.run import ConfigError, RunSettings
from fedgan.gan.models import GanSpec, Generator
from fedgan.privacy.embedding_fit import FitState, fit_generator
from fedgan.privacy.mean_embedding import FeatureMap, Target, release

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


def _fit_inputs() -> tuple[Generator, FeatureMap, Target]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=g) * 2 - 1
    phi = FeatureMap(pixels=256, features=50, length_scale=0.6, seed=0)
    target = Target.from_sum(release(phi, x, torch.arange(40) % 2, 2, 0.0))
    torch.manual_seed(0)
    return (
        Generator(GanSpec(image_size=16, channels=1, latent_dim=4, width=4, num_classes=2)),
        phi,
        target,
    )


def test_a_stopped_fit_resumed_from_its_state_ends_where_an_unbroken_one_does(tmp_path):
    gen, phi, target = _fit_inputs()
    whole = fit_generator(gen, phi, target, steps=12, lr=1e-2, per_class=8)
    states: list[FitState] = []
    first, _, _ = _fit_inputs()
    fit_generator(
        first, phi, target, steps=12, lr=1e-2, per_class=8, save=states.append, save_every=5
    )
    assert [s.step for s in states] == [5, 10]  # none at the last step: the checkpoint has it
    # Through the run folder, as a resumed aggregator reads it.
    out = RunOutputs(tmp_path)
    out.save_fit_state(1, states[0], phi.digest())
    saved, why = out.load_fit_state(1, phi.digest())
    assert why == "" and saved is not None and saved.step == 5
    resumed, _, _ = _fit_inputs()  # a fresh G, as after a restart: the state overrides it
    fit = fit_generator(resumed, phi, target, steps=12, lr=1e-2, per_class=8, resume=saved)
    assert fit.resumed_at == 5 and fit.steps == 12
    assert (fit.loss, fit.first_loss) == (whole.loss, whole.first_loss)
    for a, b in zip(gen.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_fit_state_that_cannot_be_used_is_named_and_costs_only_its_steps(tmp_path):
    gen, phi, target = _fit_inputs()
    states: list[FitState] = []
    fit_generator(gen, phi, target, steps=3, lr=1e-2, per_class=8, save=states.append, save_every=1)
    out = RunOutputs(tmp_path)
    assert out.load_fit_state(1, phi.digest()) == (None, "")
    out.save_fit_state(1, states[-1], phi.digest())
    assert out.load_fit_state(1, "ef" * 32) == (
        None,
        "fit_round_001.pt was fitted with other random features",
    )
    path = out.fit_state_path(1)
    path.write_bytes(path.read_bytes()[:64])
    state, why = out.load_fit_state(1, phi.digest())
    assert state is None and why.startswith("fit_round_001.pt cannot be read")
    out.drop_fit_state(1)
    assert not path.exists()
