"""Diffusion math and samplers: schedule, DDPM == DDIM(eta=1), per-sample seeding, self-conditioning at sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.families.msdm.data import to_uint8
from models.msdm.diffusion import DiffusionConfig, GaussianDiffusion, sample


def test_scaled_linear_schedule_endpoints():
    d = GaussianDiffusion()
    assert d.T == 1000
    assert d.betas[0].item() == pytest.approx(0.002) and d.betas[-1].item() == pytest.approx(0.02)
    sq = d.betas.sqrt()
    assert torch.allclose(sq[1:] - sq[:-1], (sq[1] - sq[0]).expand(999), atol=1e-9)  # linear in sqrt(beta)
    assert GaussianDiffusion(DiffusionConfig(schedule="cosine")).alphas_cumprod[-1] < 1e-3
    with pytest.raises(ValueError):
        GaussianDiffusion(DiffusionConfig(schedule="quadratic"))


def test_q_sample_and_predict_x0_are_inverse():
    d = GaussianDiffusion()
    x0, eps = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(d.predict_x0(d.q_sample(x0, t, eps), t, eps), x0, atol=1e-3)


def test_timesteps_are_spaced_and_end_at_zero():
    ts = GaussianDiffusion().timesteps(150)
    assert len(ts) == 150 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)


def _eps_fn(record=None):
    # A fixed smooth "model": epsilon estimate depends on x_t, t and the self-condition input.
    def fn(x, t, x0_prev):
        if record is not None:
            record.append((x.clone(), None if x0_prev is None else x0_prev.clone()))
        return 0.5 * torch.tanh(x) + 0.01 * (t.float() / 1000)[:, None, None, None] + \
            (0.1 * x0_prev if x0_prev is not None else 0)
    return fn


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_ddpm_equals_ddim_with_eta_one():
    d = GaussianDiffusion()
    a = sample(d, _eps_fn(), (2, 4, 4), _gens([1, 2]), steps=20, sampler="ddpm")
    b = sample(d, _eps_fn(), (2, 4, 4), _gens([1, 2]), steps=20, sampler="ddim", eta=1.0)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # same process, two float32 formulas
    c = sample(d, _eps_fn(), (2, 4, 4), _gens([1, 2]), steps=20, sampler="ddim", eta=0.0)
    assert not torch.allclose(a, c, atol=1e-2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_each_sample_depends_only_on_its_own_seed(sampler):
    d = GaussianDiffusion()
    batch = sample(d, _eps_fn(), (2, 4, 4), _gens([5, 6, 7]), steps=10, sampler=sampler, eta=0.5)
    for k, s in enumerate([5, 6, 7]):
        alone = sample(d, _eps_fn(), (2, 4, 4), _gens([s]), steps=10, sampler=sampler, eta=0.5)
        assert torch.equal(alone[0], batch[k])
    again = sample(d, _eps_fn(), (2, 4, 4), _gens([5, 6, 7]), steps=10, sampler=sampler, eta=0.5)
    assert torch.equal(again, batch)


def test_sampling_feeds_previous_x0_estimate():
    d = GaussianDiffusion()
    rec = []
    sample(d, _eps_fn(rec), (2, 4, 4), _gens([0]), steps=5, sampler="ddpm")
    ts = d.timesteps(5)
    assert torch.equal(rec[0][1], torch.zeros_like(rec[0][1]))  # first step: zeros
    for i in range(1, 5):
        x_prev, sc_prev = rec[i - 1]
        eps = _eps_fn()(x_prev, torch.tensor([ts[i - 1]]), sc_prev)
        expected = d.predict_x0(x_prev, torch.tensor([ts[i - 1]]), eps)
        assert torch.allclose(rec[i][1], expected, atol=1e-5)  # the estimate, not x_t
        assert not torch.allclose(rec[i][1], rec[i][0])


def test_to_uint8_clamps_without_stretching():
    x = torch.full((1, 3, 2, 2), -0.5)
    x[0, :, 0, 0] = 0.5
    x[0, :, 1, 1] = 3.0  # out of range -> clamped, not rescaling the rest
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    assert out[0, 0, 0, 0] == 191 and out[0, 0, 1, 0] == 64 and out[0, 1, 1, 0] == 255
