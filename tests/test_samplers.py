"""rlkit.samplers: Langevin kernels (SGLD, MALA, ULD), the stochastic proximal samplers, targets and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.samplers import (Gaussian, GaussianMixture, MixtureFiniteSum, cov_error, mala, mala_log_accept, mean_error,
                            mmd_rbf, proximal_sampler, sgld, sgld_minibatch, sliced_wasserstein, sps, tv_histogram, uld)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gauss2():
    return Gaussian([1.0, -2.0], [[2.0, 0.6], [0.6, 0.5]])


class GaussianSum:
    """A finite-sum Gaussian: f_i(x) = ½ (x - m_i)ᵀ P (x - m_i), so f = (1/n) Σ f_i = ½ (x - m̄)ᵀ P (x - m̄) + const."""

    def __init__(self, g: Gaussian, n: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(n, g.d, generator=gen, dtype=DT)
        self.m = m - m.mean(0) + g.mean
        self.P, self.n = g.precision, n

    def _w(self, x, idx):
        idx = idx[None].expand(x.shape[0], -1) if idx.dim() == 1 else idx
        w = torch.zeros(x.shape[0], self.n, dtype=x.dtype)
        return w.scatter_add_(1, idx, torch.full(idx.shape, 1 / idx.shape[1], dtype=x.dtype))

    def energy_batch(self, x, idx):
        w = self._w(x, idx)
        r = x[:, None, :] - self.m[None]
        return 0.5 * (w * ((r @ self.P) * r).sum(-1)).sum(-1)

    def grad_batch(self, x, idx):
        w = self._w(x, idx)
        return (x - w @ self.m) @ self.P


# ---------------------------------------------------------------------------------------------- Langevin kernels


def test_mala_log_accept_matches_hand_computation():
    # U(x) = x^4 / 4 in 1-D (not Gaussian, so a wrong sign or a missing term shows)
    U = lambda x: x.pow(4).sum(-1) / 4  # noqa: E731
    gU = lambda x: x.pow(3)  # noqa: E731
    x, z, h = 0.7, -0.3, 0.2
    gx, gz = x ** 3, z ** 3
    hand = (x ** 4 / 4 - z ** 4 / 4) - (x - z + h * gz) ** 2 / (4 * h) + (z - x + h * gx) ** 2 / (4 * h)
    got = mala_log_accept(torch.tensor([[x]], dtype=DT), torch.tensor([[z]], dtype=DT), U, gU, h)
    assert got.shape == (1,)
    assert float(got) == pytest.approx(hand, rel=1e-12)
    # reversibility: log a(x->z) = -log a(z->x)
    back = mala_log_accept(torch.tensor([[z]], dtype=DT), torch.tensor([[x]], dtype=DT), U, gU, h)
    assert float(back) == pytest.approx(-hand, rel=1e-12)


def test_mala_rejected_chains_stay_and_counts():
    g = _gauss2()
    x0 = torch.zeros(400, 2, dtype=DT)
    res = mala(g.energy, g.grad, x0, 0.5, 1, generator=3)  # a large step: many rejections
    moved = (res.samples != x0).any(1)
    assert torch.equal(moved, res.extra["accepted"].bool())
    assert 0.0 < res.accept_rate < 1.0
    assert res.accept_rate == pytest.approx(float(moved.double().mean()))
    assert (res.n_grad, res.n_energy) == (2, 2)
    # an infinite energy at every proposal: everything rejected
    inf_u = lambda x: torch.where((x == 0).all(1), 0.0, math.inf).to(x)  # noqa: E731
    res = mala(inf_u, lambda x: torch.zeros_like(x), x0, 0.1, 5, generator=0)
    assert torch.equal(res.samples, x0) and res.accept_rate == 0.0


def test_ula_matches_its_known_stationary_variance_and_mala_removes_the_bias():
    # 1-D N(0, s2): ULA with step h has stationary variance s2 / (1 - h / (2 s2)); MALA is exact at any step
    s2, h = 1.0, 0.5
    g = Gaussian([0.0], [[s2]])
    x0 = torch.zeros(20000, 1, dtype=DT)
    ula = sgld(g.grad, x0, h, 60, generator=0).samples
    assert float(ula.var()) == pytest.approx(s2 / (1 - h / (2 * s2)), rel=0.04)
    res = mala(g.energy, g.grad, x0, h, 60, generator=0)
    assert float(res.samples.var()) == pytest.approx(s2, rel=0.04)
    assert float(res.samples.mean()) == pytest.approx(0.0, abs=0.03)


@pytest.mark.parametrize("name", ["sgld", "mala", "uld"])
def test_kernels_converge_on_a_correlated_gaussian(name):
    g = _gauss2()
    x0 = torch.zeros(6000, 2, dtype=DT)
    if name == "sgld":
        res = sgld(g.grad, x0, 0.01, 700, generator=1)
    elif name == "mala":
        res = mala(g.energy, g.grad, x0, 0.15, 300, generator=1)
    else:
        res = uld(g.grad, x0, 0.05, 300, gamma=2.0, generator=1)
    s = res.samples
    assert mean_error(s, g.mean) < 0.08
    assert cov_error(s, g.cov) < 0.06
    assert res.n_grad == {"sgld": 700, "mala": 301, "uld": 300}[name]


def test_uld_velocity_is_stationary_and_step_is_exact_for_zero_force():
    # with zero force the position/velocity update is exact OU + integrated OU: check the moments after one step
    gamma, h = 1.5, 0.7
    x0 = torch.zeros(40000, 1, dtype=DT)
    v0 = torch.ones(40000, 1, dtype=DT)
    res = uld(lambda x: torch.zeros_like(x), x0, h, 1, gamma=gamma, v0=v0, generator=5)
    v, x = res.extra["v"][:, 0], res.samples[:, 0]
    e = math.exp(-gamma * h)
    assert float(v.mean()) == pytest.approx(e, abs=0.01)
    assert float(v.var()) == pytest.approx(1 - e * e, rel=0.03)
    assert float(x.mean()) == pytest.approx((1 - e) / gamma, abs=0.01)
    var_x = (2 / gamma) * (h - 2 * (1 - e) / gamma + (1 - e * e) / (2 * gamma))
    assert float(x.var()) == pytest.approx(var_x, rel=0.03)
    cov = float(((x - x.mean()) * (v - v.mean())).mean())
    assert cov == pytest.approx((1 - e) ** 2 / gamma, rel=0.05)


def test_seeds_reproduce():
    g = _gauss2()
    x0 = torch.zeros(50, 2, dtype=DT)
    for run in (lambda s: sgld(g.grad, x0, 0.1, 20, generator=s),
                lambda s: mala(g.energy, g.grad, x0, 0.1, 20, generator=s),
                lambda s: uld(g.grad, x0, 0.1, 20, generator=s)):
        a, b, c = run(7).samples, run(7).samples, run(8).samples
        assert torch.equal(a, b) and not torch.equal(a, c)
    t = MixtureFiniteSum(3, n=20, seed=1)
    x0 = torch.zeros(30, 3, dtype=DT)
    a = sps(t, x0, 0.1, 5, inner="mala", inner_steps=3, inner_step=0.03, batch_size=4, generator=2).samples
    b = sps(t, x0, 0.1, 5, inner="mala", inner_steps=3, inner_step=0.03, batch_size=4, generator=2).samples
    assert torch.equal(a, b)


def test_record_every_and_bad_inputs():
    g = _gauss2()
    x0 = torch.zeros(10, 2, dtype=DT)
    res = sgld(g.grad, x0, 0.1, 10, generator=0, record_every=5)
    assert len(res.trace) == 2 and torch.equal(res.trace[-1], res.samples)
    with pytest.raises(ValueError, match="x0"):
        sgld(g.grad, torch.zeros(3, dtype=DT), 0.1, 5)
    with pytest.raises(ValueError, match="step"):
        mala(g.energy, g.grad, x0, 0.0, 5)
    with pytest.raises(ValueError, match="grad_fn"):
        sgld(lambda x: x[:, :1], x0, 0.1, 2)
    with pytest.raises(ValueError, match="gamma"):
        uld(g.grad, x0, 0.1, 2, gamma=-1.0)
    t = MixtureFiniteSum(2, n=10)
    with pytest.raises(ValueError, match="batch_size"):
        sps(t, x0, 0.1, 2, inner_step=0.01, batch_size=11)
    with pytest.raises(ValueError, match="inner must be"):
        sps(t, x0, 0.1, 2, inner="hmc", inner_step=0.01)
    with pytest.raises(ValueError, match="rgo"):
        sps(t, x0, 0.1, 2, inner="exact")


# ------------------------------------------------------------------------------------------------------- SPS


def _prox_one_step_moments(g: Gaussian, x0: torch.Tensor, eta: float):
    """x1 = RGO(y), y ~ N(x0, ηI): mean C (P m + x0/η), covariance C + C C / η with C = (P + I/η)^{-1}."""
    mean, C = g.rgo_moments(x0[:1], eta)
    return mean[0], C + C @ C / eta


def test_exact_proximal_sampler_one_step_law_and_invariance():
    g, eta = _gauss2(), 0.4
    x0 = torch.tensor([[3.0, 1.0]], dtype=DT).expand(40000, 2).clone()
    res = sps(None, x0, eta, 1, inner="exact", rgo=g.rgo_sample, generator=0)
    m1, c1 = _prox_one_step_moments(g, x0, eta)
    assert mean_error(res.samples, m1) < 0.02
    assert cov_error(res.samples, c1) < 0.03
    # the target is invariant: start from exact samples, 5 steps, same moments
    res = proximal_sampler(g.rgo_sample, g.sample(40000, generator=1), eta, 5, generator=2)
    assert mean_error(res.samples, g.mean) < 0.03 and cov_error(res.samples, g.cov) < 0.03


@pytest.mark.parametrize("inner", ["mala", "sgld"])
def test_full_batch_sps_equals_the_proximal_sampler(inner):
    """With the full batch and a long, accurate inner loop, one SPS outer step has the law of the exact proximal
    sampler's step (closed form on a Gaussian), and after many steps the chains sit at the target."""
    g, eta = _gauss2(), 0.3
    t = GaussianSum(g)
    x0 = torch.tensor([[3.0, 1.0]], dtype=DT).expand(20000, 2).clone()
    step = 0.03 if inner == "mala" else 0.004
    steps = 40 if inner == "mala" else 300
    res = sps(t, x0, eta, 1, inner=inner, inner_steps=steps, inner_step=step, batch_size=None, init="y", generator=0)
    m1, c1 = _prox_one_step_moments(g, x0, eta)
    assert mean_error(res.samples, m1) < 0.03
    assert cov_error(res.samples, c1) < 0.05
    if inner == "mala":
        assert res.accept_rate > 0.9
        assert res.extra["grad_data"] == (steps + 1) * t.n and res.extra["grad_full"] == steps + 1
        res = sps(t, x0[:4000], eta, 100, inner="mala", inner_steps=5, inner_step=0.08, generator=1)
        assert mean_error(res.samples, g.mean) < 0.06 and cov_error(res.samples, g.cov) < 0.06


def test_full_batch_sps_sgld_is_the_proximal_loop_with_ula_inside():
    """Same generator, same draws: SPS-SGLD with the full batch is exactly y ~ N(x, η), then ULA on g from x."""
    g, eta, tau, S = _gauss2(), 0.2, 0.05, 3
    t = GaussianSum(g)
    x0 = torch.randn(7, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    got = sps(t, x0, eta, 4, inner="sgld", inner_steps=S, inner_step=tau, generator=11).samples
    gen = torch.Generator().manual_seed(11)
    x = x0.clone()
    for _ in range(4):
        y = x + math.sqrt(eta) * torch.randn(x.shape, generator=gen, dtype=DT)
        z = x
        for _ in range(S):
            noise = torch.randn(z.shape, generator=gen, dtype=DT)
            z = z - tau * (g.grad(z) + (z - y) / eta) + math.sqrt(2 * tau) * noise
        x = z
    assert torch.allclose(got, x, atol=1e-12)


def test_minibatch_samplers_reach_the_mixture_target_and_count_per_datum():
    t = MixtureFiniteSum(2, n=50, sep=2.0, noise=1.0, seed=3)
    ref = t.sample(20000, generator=0)
    x0 = torch.randn(1500, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    floor = tv_histogram(t.sample(1500, generator=9), ref, bins=16)
    runs = {
        "sgld": sgld_minibatch(t, x0, 0.02, 600, batch_size=5, generator=2),
        "sps_sgld": sps(t, x0, 0.1, 150, inner="sgld", inner_steps=4, inner_step=0.025, batch_size=5, generator=2),
        "sps_mala": sps(t, x0, 0.1, 120, inner="mala", inner_steps=4, inner_step=0.03, batch_size=5, generator=2),
    }
    for name, res in runs.items():
        tv = tv_histogram(res.samples, ref, bins=16)
        assert tv < floor + 0.06, (name, tv, floor)
    assert runs["sgld"].extra["grad_data"] == 600 * 5
    assert runs["sps_sgld"].extra["grad_data"] == 150 * 4 * 5 and runs["sps_sgld"].n_grad == 600
    assert runs["sps_mala"].extra["grad_data"] == 120 * 5 * 5 and runs["sps_mala"].n_energy == 600
    assert runs["sps_mala"].extra["grad_full"] == pytest.approx(120 * 5 * 5 / 50)
    # a start far from the target is still far after 0 useful work: the metric is not blind
    assert tv_histogram(x0 + 6.0, ref, bins=16) > 0.9


# ---------------------------------------------------------------------------------------------------- targets


def test_mixture_finite_sum_gradients_and_minibatches():
    t = MixtureFiniteSum(4, n=12, seed=0)
    x = torch.randn(6, 4, dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(t.energy(x).sum(), x)
    assert torch.allclose(gx, t.grad(x), atol=1e-12)
    x = x.detach()
    full = torch.arange(12)
    assert torch.allclose(t.grad_batch(x, full), t.grad(x), atol=1e-12)
    assert torch.allclose(t.energy_batch(x, full) - t.energy(x), torch.zeros(6, dtype=DT), atol=1e-12)
    # a single datum per minibatch, averaged over all data, is the full gradient (unbiased minibatches)
    singles = torch.stack([t.grad_batch(x, torch.tensor([i])) for i in range(12)]).mean(0)
    assert torch.allclose(singles, t.grad(x), atol=1e-12)
    # per-datum gradient of the minibatch energy matches autograd
    idx = torch.randint(0, 12, (6, 3), generator=torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad(t.energy_batch(xr, idx).sum(), xr)
    assert torch.allclose(gb, t.grad_batch(x, idx), atol=1e-12)
    # minibatches are noisier than the full gradient (the c_i perturbations)
    assert not torch.allclose(t.grad_batch(x, idx), t.grad(x), atol=1e-3)


def test_mixture_finite_sum_exact_samples_match_the_density():
    """Rejection samples against the density integrated on a grid (d = 2)."""
    t = MixtureFiniteSum(2, n=30, sep=2.5, spread=1.0, seed=4)
    s = t.sample(60000, generator=0)
    lo, hi, bins = -7.0, 7.0, 28
    e = (torch.arange(bins * 8, dtype=DT) + 0.5) / (bins * 8) * (hi - lo) + lo
    X, Y = torch.meshgrid(e, e, indexing="ij")
    logp = -t.energy(torch.stack([X.flatten(), Y.flatten()], 1)).reshape(bins * 8, bins * 8)
    p = torch.softmax(logp.flatten(), 0).reshape(bins, 8, bins, 8).sum((1, 3))
    code = (((s - lo) / (hi - lo) * bins).floor().long().clamp(0, bins - 1) * torch.tensor([bins, 1])).sum(1)
    q = torch.bincount(code, minlength=bins * bins).double() / s.shape[0]
    assert 0.5 * float((p.flatten() - q).abs().sum()) < 0.035
    assert float((s @ t.direction > 0).double().mean()) == pytest.approx(0.5, abs=0.01)  # symmetric wells


def test_gaussian_mixture_energy_grad_and_samples():
    gm = GaussianMixture([[0.0, 0.0], [4.0, 1.0]], covs=[[1.0, 0.5], [0.3, 0.3]], weights=[0.3, 0.7])
    x = torch.randn(5, 2, dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(gm.energy(x).sum(), x)
    assert torch.allclose(gx, gm.grad(x), atol=1e-10)
    s = gm.sample(40000, generator=0)
    mean = 0.3 * torch.tensor([0.0, 0.0]) + 0.7 * torch.tensor([4.0, 1.0])
    assert mean_error(s, mean) < 0.03
    # the density integrates to one (grid)
    e = torch.linspace(-6, 10, 400, dtype=DT)
    X, Y = torch.meshgrid(e, e, indexing="ij")
    mass = gm.log_prob(torch.stack([X.flatten(), Y.flatten()], 1)).exp().sum() * (e[1] - e[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_on_known_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 2, dtype=DT, generator=gen)
    assert tv_histogram(x, x) == 0.0
    assert tv_histogram(x[:, 0], x[:, 0] + 100.0) == pytest.approx(1.0)
    assert tv_histogram(x[:, :1], x[:, :1] + 100.0, range_=(-5, 5)) == pytest.approx(1.0, abs=0.01)
    # two 1-D Gaussians N(0,1), N(1,1): true TV = 2 Φ(1/2) - 1 = 0.3829
    a = torch.randn(200000, dtype=DT, generator=gen)
    b = torch.randn(200000, dtype=DT, generator=gen) + 1.0
    assert tv_histogram(a, b, bins=60, range_=(-5, 6)) == pytest.approx(0.3829, abs=0.01)
    # sliced W2 of a shift δ, sample sets identical up to the shift: exactly |δ| / sqrt(d) over uniform directions;
    # with given directions, exactly the root mean square of θ·δ
    y = torch.randn(500, 4, dtype=DT, generator=gen)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=DT)
    dirs = torch.eye(4, dtype=DT)
    assert sliced_wasserstein(y, y + delta, directions=dirs) == pytest.approx(float(delta.pow(2).mean().sqrt()))
    assert sliced_wasserstein(y, y + delta, n_proj=4000, generator=0) == pytest.approx(
        float(delta.norm()) / 2, rel=0.05)
    assert sliced_wasserstein(y, y[torch.randperm(500, generator=gen)]) == pytest.approx(0.0, abs=1e-12)
    # unequal sizes: a sample against itself repeated twice is at distance 0
    assert sliced_wasserstein(y, torch.cat([y, y])) == pytest.approx(0.0, abs=1e-12)
    # MMD: zero on identical sets, grows with the shift
    assert mmd_rbf(y, y) == pytest.approx(0.0, abs=1e-7)
    assert mmd_rbf(y, y + 0.3) < mmd_rbf(y, y + 1.0) < mmd_rbf(y, y + 3.0)
    # moments
    assert mean_error(y + delta, delta) == pytest.approx(float(y.mean(0).norm()))
    assert cov_error(y, torch.cov(y.T)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        tv_histogram(y, y)
