"""The update path: Δ = local − global, FedAvg's weighted mean, order independence, refused
shapes."""

import numpy as np
import pytest

from fedgan.update import SiteUpdate, apply_delta, make_update, weighted_mean


def _arrays(rng, shapes):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_update_is_local_minus_global():
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (4,)]
    g_glob, d_glob, g_loc, d_loc = (_arrays(rng, shapes) for _ in range(4))
    upd = make_update(g_loc, d_loc, g_glob, d_glob, weight=7)
    assert upd.weight == 7
    for got, lo, gl in zip(upd.gen, g_loc, g_glob, strict=True):
        np.testing.assert_allclose(got, lo - gl)


def test_weighted_mean_is_fedavg():
    rng = np.random.default_rng(1)
    shapes = [(5, 5), (2,)]
    glob = _arrays(rng, shapes)
    locals_ = [(_arrays(rng, shapes), n) for n in (10, 30, 60)]
    updates = [make_update(lo, lo, glob, glob, n) for lo, n in locals_]
    mean_g, _ = weighted_mean(updates)
    new = apply_delta(glob, mean_g)
    expected = [sum(n * lo[i] for lo, n in locals_) / 100 for i in range(len(shapes))]
    for got, want in zip(new, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weighted_mean_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(2)
    ups = [SiteUpdate(_arrays(rng, [(50,)]), _arrays(rng, [(3,)]), w) for w in (1, 2, 3)]
    a = weighted_mean(ups)
    b = weighted_mean(list(reversed(ups)))
    np.testing.assert_array_equal(a[0][0], b[0][0])


def test_mismatched_shapes_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        weighted_mean(
            [
                SiteUpdate([np.zeros(2)], [np.zeros(1)], 1),
                SiteUpdate([np.zeros(3)], [np.zeros(1)], 1),
            ]
        )
    with pytest.raises(ValueError, match="positive"):
        SiteUpdate([np.zeros(2)], [np.zeros(1)], 0)
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([])
