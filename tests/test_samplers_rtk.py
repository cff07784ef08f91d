"""Diffusion inference: OU mixture marginals, DDPM / DDIM, RTK-MALA / RTK-ULD, the learned score (issue 21 part 2)."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.samplers.diffusion import OUMixture, ddim, ddpm, ou_var, time_grid
from rlkit.samplers.rtk import lobatto_rule, rtk, rtk_nfe
from rlkit.samplers.score_net import train_score_net

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gaussian() -> OUMixture:
    """One non-isotropic, off-centre Gaussian: every p_t is Gaussian with known mean and covariance."""
    return OUMixture(torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[[0.5, 0.2], [0.2, 0.3]]], dtype=F64))


def mixture() -> OUMixture:
    return OUMixture(torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=F64),
                     torch.tensor([0.3, 0.2, 0.5], dtype=F64), weights=[0.5, 0.3, 0.2])


class Counter:
    """A score function that counts its calls (one call = one evaluation per chain)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def moments_close(x, mean, cov, tol_mean, tol_cov):
    assert (x.mean(0) - mean).abs().max() < tol_mean, (x.mean(0), mean)
    assert (torch.cov(x.T) - cov).abs().max() < tol_cov, (torch.cov(x.T), cov)


# ---------------------------------------------------------------- OU mixture and time grid

def test_mixture_score_is_gradient_of_log_density_and_samples_match():
    mix = mixture()
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for t in (0.0, 0.05, 0.7, 3.0):
        (g,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
        assert torch.allclose(g, mix.score(x.detach(), t), atol=1e-10)
        assert torch.allclose(mix.energy(x.detach(), t), -mix.log_prob(x.detach(), t))
    g = gaussian()
    m, C = g.params_at(0.4)
    assert torch.allclose(m[0], math.exp(-0.4) * torch.tensor([1.0, -2.0], dtype=F64))
    assert torch.allclose(C[0], math.exp(-0.8) * torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
                          + ou_var(0.4) * torch.eye(2, dtype=F64))
    moments_close(g.sample(40000, 0.4, generator=1), m[0], C[0], 0.02, 0.02)
    with pytest.raises(ValueError, match="columns"):
        mix.score(torch.zeros(3, 3), 0.1)


def test_time_grid():
    ts = time_grid(4.0, 8, t_end=0.001, rho=3.0)
    assert len(ts) == 9 and ts[0] == 4.0 and ts[-1] == 0.001
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-2] - ts[-1] < ts[0] - ts[1]   # rho > 1: finer near t_end
    assert time_grid(2.0, 4) == [2.0, 1.5, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="t_end must be < T"):
        time_grid(1.0, 4, t_end=1.0)


# ---------------------------------------------------------------- DDPM / DDIM

@pytest.mark.parametrize("scheme", ["ei", "ancestral", "em", "ddim"])
def test_ddpm_ddim_converge_on_gaussian(scheme):
    g = gaussian()
    T = 4.0
    x_T = g.sample(4000, T, generator=3)
    m0, C0 = g.params_at(0.0)

    def run(n):
        if scheme == "ddim":
            return ddim(g.score, x_T, T, n, rho=2.0)
        return ddpm(g.score, x_T, T, n, rho=2.0, scheme=scheme, generator=4)

    def cov_err(res):
        return float((torch.cov(res.samples.T) - C0[0]).abs().max())

    coarse, fine = run(6), run(250)
    assert fine.n_grad == 250 and coarse.n_grad == 6
    assert cov_err(fine) < cov_err(coarse)
    moments_close(fine.samples, m0[0], C0[0], 0.04, 0.04)


def test_ddim_is_deterministic_and_ddpm_seeds_reproduce():
    g = gaussian()
    x_T = g.sample(50, 3.0, generator=0)
    assert torch.equal(ddim(g.score, x_T, 3.0, 10).samples, ddim(g.score, x_T, 3.0, 10).samples)
    a = ddpm(g.score, x_T, 3.0, 10, generator=5).samples
    assert torch.equal(a, ddpm(g.score, x_T, 3.0, 10, generator=5).samples)
    assert not torch.equal(a, ddpm(g.score, x_T, 3.0, 10, generator=6).samples)
    res = ddpm(g.score, x_T, 3.0, 10, generator=5, record_every=5)
    assert len(res.trace) == 2 and torch.equal(res.trace[-1], res.samples)
    with pytest.raises(ValueError, match="scheme"):
        ddpm(g.score, x_T, 3.0, 10, scheme="heun")


# ---------------------------------------------------------------- RTK

@pytest.mark.parametrize("inner,kw", [("mala", dict(inner_step=0.5, inner_steps=30)),
                                      ("uld", dict(inner_step=0.05, inner_steps=100))])
def test_rtk_exact_score_gives_exact_marginals_on_gaussian(inner, kw):
    """Started from exact p_T draws, every segment's output follows p_{t_k} (mean and covariance)."""
    g = gaussian()
    T, K = 2.0, 4
    x0 = g.sample(4000, T, generator=11)
    res = rtk(g.score, x0, T, K, inner=inner, generator=12, record_every=1, **kw)
    assert len(res.trace) == K and torch.equal(res.trace[-1], res.samples)
    for k, xs in enumerate(res.trace):
        m, C = g.params_at(res.extra["times"][k + 1])
        moments_close(xs, m[0], C[0], 0.05, 0.05)
    if inner == "mala":
        assert 0.5 < res.accept_rate < 1.0


def test_rtk_mala_score_only_equals_exact_energy_mala_on_gaussian():
    """For a Gaussian, f_t is quadratic and the trapezoid line integral of the score is its exact energy difference,
    so the score-only RTK-MALA must reproduce, draw for draw, the run with the exact energy, which goes through
    rlkit.samplers.langevin.mala."""
    g = gaussian()
    x0 = g.sample(500, 2.0, generator=1)
    with_energy = rtk(g.score, x0, 2.0, 3, inner_steps=8, energy_fn=g.energy, generator=2)
    score_only = rtk(g.score, x0, 2.0, 3, inner_steps=8, generator=2)
    assert torch.allclose(score_only.samples, with_energy.samples, atol=1e-9)
    assert score_only.accept_rate == with_energy.accept_rate
    assert with_energy.n_energy == 3 * 9 and score_only.n_energy == 0


def test_rtk_mala_quadrature_approaches_exact_energy_on_mixture():
    """On a mixture (f not quadratic) the score-only chains follow the exact-energy chains (same random numbers) more
    and more often as Lobatto nodes are added: only accept/reject decisions near the threshold can differ."""
    mix = mixture()
    x0 = torch.randn(500, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = rtk(mix.score, x0, 2.0, 3, inner_steps=8, inner_step=1.0, energy_fn=mix.energy, generator=2).samples
    differ = []
    for q in (0, 1, 3):
        est = rtk(mix.score, x0, 2.0, 3, inner_steps=8, inner_step=1.0, quad_points=q, generator=2).samples
        differ.append(float((est != exact).any(1).double().mean()))
    assert differ[0] > differ[1] > differ[2] and differ[2] < 0.1, differ


def test_lobatto_energy_difference_converges_on_mixture():
    mix = mixture()
    gen = torch.Generator().manual_seed(0)
    z, zp = torch.randn(200, 2, dtype=F64, generator=gen), torch.randn(200, 2, dtype=F64, generator=gen)
    exact = mix.energy(zp, 0.3) - mix.energy(z, 0.3)
    errs = []
    for m in range(4):
        nodes, weights = lobatto_rule(m)
        assert abs(sum(weights) - 1) < 1e-12 and nodes[0] == 0.0 and nodes[-1] == 1.0
        est = -sum(w * (mix.score(z + u * (zp - z), 0.3) * (zp - z)).sum(1) for u, w in zip(nodes, weights))
        errs.append(float((est - exact).abs().mean()))
    assert errs[3] < errs[1] < errs[0] and errs[3] < 0.05 * errs[0]
    with pytest.raises(ValueError, match="quad_points"):
        lobatto_rule(4)


@pytest.mark.parametrize("inner,kw", [("mala", dict()), ("mala", dict(quad_points=2)), ("mala", dict(init="tweedie")),
                                      ("uld", dict()), ("uld", dict(init="ddpm"))])
def test_rtk_nfe_counting(inner, kw):
    mix = mixture()
    score = Counter(mix.score)
    x0 = torch.randn(20, 2, dtype=F64)
    res = rtk(score, x0, 3.0, 5, inner=inner, inner_steps=4, generator=0, **kw)
    assert res.n_grad == score.calls == rtk_nfe(5, inner, 4, **kw)
    assert rtk_nfe(5, "mala", 4) == 5 * 5 and rtk_nfe(5, "mala", 4, quad_points=2) == 5 * 13
    assert rtk_nfe(5, "uld", 4) == 20 and rtk_nfe(5, "uld", 4, init="tweedie") == 25
    score.calls = 0
    assert ddpm(score, x0, 3.0, 7, generator=0).n_grad == score.calls == 7
    score.calls = 0
    assert ddim(score, x0, 3.0, 9).n_grad == score.calls == 9


@pytest.mark.parametrize("inner", ["mala", "uld"])
def test_rtk_seeds_reproduce(inner):
    mix = mixture()
    x0 = torch.randn(30, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = rtk(mix.score, x0, 3.0, 3, inner=inner, inner_steps=5, generator=7).samples
    assert torch.equal(a, rtk(mix.score, x0, 3.0, 3, inner=inner, inner_steps=5, generator=7).samples)
    assert not torch.equal(a, rtk(mix.score, x0, 3.0, 3, inner=inner, inner_steps=5, generator=8).samples)


def test_rtk_ball_projection_keeps_chains_in_the_ball():
    mix = mixture()
    x0 = torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    res = rtk(mix.score, x0, 1.0, 1, inner_steps=20, inner_step=1.0, ball_radius=0.2, generator=1)
    r = 0.2 * math.sqrt(2 * ou_var(1.0))
    assert float((res.samples - x0).norm(dim=1).max()) <= r + 1e-9
    assert res.extra["projected"] > 0.5
    free = rtk(mix.score, x0, 1.0, 1, inner_steps=20, inner_step=1.0, ball_radius=None, generator=1)
    assert float((free.samples - x0).norm(dim=1).max()) > r and free.extra["projected"] == 0.0


def test_rtk_bad_inputs():
    mix = mixture()
    x0 = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="inner must be"):
        rtk(mix.score, x0, 1.0, 2, inner="hmc")
    with pytest.raises(ValueError, match="energy_fn is used only"):
        rtk(mix.score, x0, 1.0, 2, inner="uld", energy_fn=mix.energy)
    with pytest.raises(ValueError, match="quad_points"):
        rtk(mix.score, x0, 1.0, 2, quad_points=7)
    with pytest.raises(ValueError, match="init must be"):
        rtk(mix.score, x0, 1.0, 2, init="zero")
    with pytest.raises(ValueError, match="n_segments"):
        rtk(mix.score, x0, 1.0, 0)
    with pytest.raises(ValueError, match="score_fn must return"):
        rtk(lambda x, t: x[:, :1], x0, 1.0, 2)


# ---------------------------------------------------------------- learned score

def test_score_net_learns_the_score_and_is_seeded():
    g = OUMixture(torch.tensor([[1.5, -1.0]], dtype=F64), 0.25)
    data = g.sample(4000, 0.0, generator=0)
    a = train_score_net(data, T=3.0, steps=200, batch_size=128, hidden=32, depth=2, seed=3)
    b = train_score_net(data, T=3.0, steps=200, batch_size=128, hidden=32, depth=2, seed=3)
    assert a.losses == b.losses and a.steps == 200 and len(a.losses) == 2
    assert a.losses[-1] < a.losses[0]
    for t in (0.3, 1.0):
        x = g.sample(2000, t, generator=5)
        exact = g.score(x, t)
        rel = float((a(x, t) - exact).norm(dim=1).mean() / exact.norm(dim=1).mean())
        assert rel < 0.25, (t, rel)
    assert a(x.float(), 0.5).dtype == torch.float32
    with pytest.raises(ValueError, match="samples must be"):
        train_score_net(torch.zeros(5))
