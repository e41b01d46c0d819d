"""Bootstrap intervals and paired comparisons (harness.stats) on synthetic Gaussian features of known separation."""

import numpy as np
import pytest
import torch

from harness import stats

D = 32
ESTIMATORS = [stats.FID(), stats.KID(), stats.PRC()]


def gauss(n, shift=0.0, seed=0, d=D):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def test_fid_identity_matches_torch_fidelity_both_branches():
    """The replicate formula with unit weights is torch-fidelity's FID (n < d: n×n SVD; n > d: d×d eigh)."""
    for n, d in ((40, 64), (300, 16)):
        g, r = gauss(n, 0.3, 1, d), gauss(n + 7, 0.0, 2, d)
        point = stats.FID().point(g, r)["fid"]
        same = stats.fid_weighted(stats.FID().prepare(g, r), np.ones(n), np.ones(n + 7))
        assert same == pytest.approx(point, rel=1e-6)
        # weights = explicit duplication
        w = np.arange(n) % 3.0
        dup = stats.FID().point(np.repeat(g, w.astype(int), axis=0), r)["fid"]
        assert stats.fid_weighted(stats.FID().prepare(g, r), w, np.ones(n + 7)) == pytest.approx(dup, rel=1e-6)


def test_kid_and_prc_replicates_with_unit_weights_are_torch_fidelity():
    from torch_fidelity.metric_kid import mmd2

    g, r = gauss(120, 0.2, 3), gauss(120, 0.0, 4)
    s = stats.KID().prepare(g, r)
    ones = np.ones(120)
    assert stats.mmd2_weighted(s["gg"], s["gr"], s["rr"], ones, ones) == pytest.approx(
        mmd2(s["gg"], s["gr"], s["rr"]), rel=1e-9)
    assert stats.KID(subsets=1, subset_size=120).point(g, r)["kid"] == pytest.approx(
        mmd2(s["gg"], s["gr"], s["rr"]), rel=1e-9)
    prc = stats.PRC()
    rep, point = prc.replicate(prc.prepare(g, r), ones, ones), prc.point(g, r)
    for k in ("precision", "recall", "f1"):
        assert rep[k] == pytest.approx(point[k], abs=1e-6)
    assert point["f1"] == pytest.approx(stats.f_score(point["precision"], point["recall"]), abs=1e-6)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_intervals_contain_point_and_shrink_with_n(est):
    small = stats.bootstrap(est, gauss(60, 0.5, 5), gauss(60, 0.0, 6), n_boot=60, seed=1)
    large = stats.bootstrap(est, gauss(480, 0.5, 7), gauss(480, 0.0, 8), n_boot=60, seed=1)
    for name in est.names:
        for iv in (small[name], large[name]):
            assert iv.low <= iv.value <= iv.high, (name, iv)
            assert iv.high > iv.low
        assert large[name].high - large[name].low < small[name].high - small[name].low, name


def test_bootstrap_is_seeded():
    g, r = gauss(80, 0.4, 9), gauss(80, 0.0, 10)
    a = stats.bootstrap(stats.FID(), g, r, n_boot=30, seed=3)
    assert a == stats.bootstrap(stats.FID(), g, r, n_boot=30, seed=3)
    assert a != stats.bootstrap(stats.FID(), g, r, n_boot=30, seed=4)
    # torch tensors are accepted like arrays
    assert stats.bootstrap(stats.FID(), torch.from_numpy(g), torch.from_numpy(r), n_boot=30, seed=3) == a


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_compare_identical_indistinguishable_different_not(est):
    real = gauss(200, 0.0, 11)
    a = gauss(200, 0.0, 12)
    same = stats.compare(est, a, a.copy(), real, n_boot=50)
    for c in same.values():
        assert c.paired and c.diff == 0 and c.indistinguishable
    # Two independent draws of the same distribution: no evidence of a difference.
    twin = stats.compare(est, a, gauss(200, 0.0, 13), real, n_boot=50)
    assert all(c.indistinguishable for c in twin.values()), twin
    # A clearly shifted model is told apart, in the right direction.
    far = stats.compare(est, a, gauss(200, 1.0, 14), real, n_boot=50)
    for name, c in far.items():
        assert not c.indistinguishable, c
        assert (c.diff < 0) if name in ("fid", "kid") else (c.diff > 0), c
        assert c.low <= c.diff <= c.high


def test_compare_unpaired_sizes_and_bad_input():
    real = gauss(100, 0.0, 15)
    c = stats.compare(stats.FID(), gauss(100, 0.0, 16), gauss(70, 0.0, 17), real, n_boot=20)["fid"]
    assert not c.paired
    with pytest.raises(ValueError):
        stats.compare(stats.FID(), gauss(10, d=4), gauss(10, d=5), gauss(10, d=4))
    with pytest.raises(ValueError):
        stats.bootstrap(stats.FID(), gauss(10), gauss(10), n_boot=0)


def test_given_points_are_used_not_recomputed(monkeypatch):
    g, r = gauss(50, 0.3, 18), gauss(50, 0.0, 19)
    ref = stats.bootstrap(stats.FID(), g, r, n_boot=20)["fid"]

    def boom(self, gen, real):
        raise AssertionError("point recomputed")

    monkeypatch.setattr(stats.FID, "point", boom)
    got = stats.bootstrap(stats.FID(), g, r, n_boot=20, point={"fid": ref.value})["fid"]
    assert got == ref
    c = stats.compare(stats.FID(), g, g, r, n_boot=10, points=({"fid": ref.value}, {"fid": ref.value}))["fid"]
    assert c.diff == 0 and c.indistinguishable
