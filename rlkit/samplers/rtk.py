"""Reverse-transition-kernel (RTK) inference for diffusion models: RTK-MALA and RTK-ULD (Huang, Zou, Dong, Zhang, Ma,
Zhang; "Reverse Transition Kernel: A Flexible Framework to Accelerate Diffusion Inference", NeurIPS 2024,
arXiv 2405.16387; no official code). Method page with the choices and measured figures: ``docs/methods/rtk.md``.

Setting: the OU forward process of :mod:`rlkit.samplers.diffusion`, ``X_t = e^{-t} X_0 + sqrt(1 - e^{-2t}) ξ``,
``f_t = -log p_t`` and a score ``score_fn(x, t) ≈ -∇f_t(x)``.

Algorithm 1 (inference with RTK). Cut ``[t_end, T]`` into ``K = n_segments`` segments of equal length
``eta = (T - t_end) / K`` and write ``a = e^{-eta}``, ``sigma2 = 1 - e^{-2 eta}``. Start from ``x_0 ~ N(0, I)`` (passed
in as ``x0``) and for ``k = 0 .. K-1`` draw ``x_{k+1}`` approximately from the reverse transition kernel

    q_k(z | x_k) ∝ exp(-g_k(z)),   g_k(z) = f_{t_{k+1}}(z) + |x_k - a z|^2 / (2 sigma2),   t_{k+1} = T - (k+1) eta,

whose gradient is ``∇g_k(z) = -score_fn(z, t_{k+1}) + a (a z - x_k) / sigma2`` (one score evaluation). If
``q_k`` is sampled exactly, ``x_k ~ p_{T - k eta}`` for every k, so the only errors are the start ``p_T ≈ N(0, I)``,
the score error and the inner sampler's error. The quadratic term makes ``g_k`` strongly convex when
``e^{2 eta} - 1 < 1/L`` (L the smoothness of f); the paper's experiments use five segments (RTK steps at
``t ∈ {0, 0.2T, ..., 0.8T}``) with the score evaluations spread evenly over them.

Start of the inner chain (``init``; the paper's choice is not confirmed here, see the method page):
``"prev"`` ``z_0 = x_k``; ``"scaled"`` ``z_0 = x_k / a`` (the maximiser of the quadratic term); ``"tweedie"`` the
posterior-mean estimate ``z_0 = (x_k + sigma2 * score_fn(x_k, t_k)) / a`` (one extra score evaluation per segment;
exact for the conditional mean when the segment is short); ``"ddpm"`` that mean plus ``sqrt(sigma2) ξ``, i.e. one
ancestral DDPM step over the whole segment, which the inner sampler then corrects (one extra evaluation).

Inner samplers (``inner_steps`` steps from ``z_0``):

- ``inner="mala"`` (Algorithm 2, MALA / projected MALA): step ``tau = inner_step * sigma2``; proposal
  ``z' = z - tau ∇g_k(z) + sqrt(2 tau) ξ``, projected onto the ball ``B(z_0, r)`` with
  ``r = ball_radius * sqrt(d * sigma2)`` (``ball_radius=None``: no projection), accepted with probability
  ``min(1, exp(-(g(z') - g(z)) - |z - z' + tau ∇g(z')|^2 / (4 tau) + |z' - z + tau ∇g(z)|^2 / (4 tau)))``.
  The energy difference ``g(z') - g(z)`` has an exact quadratic part; its ``f`` part is

  * with ``energy_fn(x, t) -> [n]`` (``f_t`` up to a constant in x; e.g. the exact mixture energy): exact, and the
    kernel is :func:`rlkit.samplers.langevin.mala` itself (``n_energy`` counts the energy calls);
  * otherwise (the usual case, a learned score has no energy) estimated from the score by the line integral
    ``f(z') - f(z) = -∫_0^1 score(z + u (z' - z)) · (z' - z) du`` with the Gauss–Lobatto rule with ``quad_points``
    interior nodes (0: trapezoid, 1: Simpson, 2 and 3: the 4- and 5-point Lobatto rules; exact for polynomial
    integrands of degree 1, 3, 5, 7). The end-point scores are the ones MALA needs anyway, so the estimate costs
    ``quad_points`` extra score evaluations per proposal; trapezoid is free and exact when f is quadratic.

- ``inner="uld"`` (Algorithm 3): underdamped Langevin on ``g_k`` with :func:`rlkit.samplers.langevin.uld` (exponential
  integrator, one score evaluation per step), step ``h = inner_step * sqrt(sigma2)`` and friction
  ``gamma / sqrt(sigma2)``, velocity drawn fresh from N(0, I) at every segment. The scaling is the same as running
  ULD with step ``inner_step`` and friction ``gamma`` in the coordinates ``u = z / sqrt(sigma2)``, in which ``q_k``
  has unit covariance when the data are N(0, I); it makes ``inner_step`` and ``gamma`` comparable across ``eta``.

Score evaluations per chain (``n_grad``; :func:`rtk_nfe`): MALA ``K (1 + S (1 + quad_points))`` (with
``energy_fn``: ``K (S + 1)`` and as many energy calls), ULD ``K S``, with ``S = inner_steps``; plus ``K`` for the
``"tweedie"`` and ``"ddpm"`` starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlkit.samplers.diffusion import ScoreFn, _check_time, _check_x, _score, ou_var, time_grid
from rlkit.samplers.langevin import SampleResult, _positive, make_generator, mala, uld

Tensor = torch.Tensor
EnergyTFn = Callable[[Tensor, float], Tensor]

__all__ = ["rtk", "rtk_nfe", "lobatto_rule", "INNER_SAMPLERS", "INITS"]

INNER_SAMPLERS = ("mala", "uld")
INITS = ("prev", "scaled", "tweedie", "ddpm")

# Gauss–Lobatto nodes and weights on [0, 1], keyed by the number of interior nodes (end points included in the rule).
_LOBATTO = {
    0: ([0.0, 1.0], [0.5, 0.5]),
    1: ([0.0, 0.5, 1.0], [1 / 6, 4 / 6, 1 / 6]),
    2: ([0.0, 0.5 - 0.5 / math.sqrt(5), 0.5 + 0.5 / math.sqrt(5), 1.0], [1 / 12, 5 / 12, 5 / 12, 1 / 12]),
    3: ([0.0, 0.5 - 0.5 * math.sqrt(3 / 7), 0.5, 0.5 + 0.5 * math.sqrt(3 / 7), 1.0],
        [1 / 20, 49 / 180, 32 / 90, 49 / 180, 1 / 20]),
}


def lobatto_rule(quad_points: int) -> tuple[list[float], list[float]]:
    """Nodes and weights on [0, 1] of the Gauss–Lobatto rule with ``quad_points`` interior nodes (0 to 3)."""
    if isinstance(quad_points, bool) or quad_points not in _LOBATTO:
        raise ValueError(f"quad_points must be 0, 1, 2 or 3 (interior Gauss-Lobatto nodes), got {quad_points!r}")
    return _LOBATTO[quad_points]


def rtk_nfe(n_segments: int, inner: str, inner_steps: int, quad_points: int = 0, exact_energy: bool = False,
            init: str = "prev") -> int:
    """Score evaluations per chain of one :func:`rtk` call (module text)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    extra = 1 if init in ("tweedie", "ddpm") else 0
    if inner == "mala":
        per = inner_steps + 1 if exact_energy else 1 + inner_steps * (1 + quad_points)
    elif inner == "uld":
        per = inner_steps
    else:
        raise ValueError(f"inner must be one of {INNER_SAMPLERS}, got {inner!r}")
    return n_segments * (per + extra)


def _ball_projection(center: Tensor, radius: float) -> tuple[Callable[[Tensor], Tensor], list[int]]:
    """Euclidean projection onto B(center_i, radius) chain by chain, and a one-item list counting projected chains."""
    hits = [0]

    def project(z: Tensor) -> Tensor:
        delta = z - center
        norm = delta.norm(dim=1, keepdim=True)
        outside = norm > radius
        hits[0] += int(outside.sum())
        scale = torch.where(outside, radius / norm.clamp_min(1e-30), torch.ones_like(norm))
        return center + delta * scale

    return project, hits


def _mala_energy_difference(score_t: Callable[[Tensor], Tensor], quad: Callable[[Tensor], Tensor],
                            quad_grad: Callable[[Tensor], Tensor], z0: Tensor, tau: float, n_steps: int,
                            quad_points: int, project: Callable[[Tensor], Tensor] | None,
                            gen: torch.Generator | None) -> tuple[Tensor, int, int]:
    """MALA on ``g = f + quad`` with ``∇f = -score_t`` and the ``f`` difference estimated by a Lobatto line integral
    of the score (module text). Returns the final chains, the score evaluations per chain and the accepted moves.

    This is a thin wrapper beside :func:`rlkit.samplers.langevin.mala`, which takes an absolute energy: here only
    differences are available, and they are cheapest when estimated along the segment between the current point and
    the proposal, re-using the two end-point scores MALA computes anyway."""
    nodes, weights = lobatto_rule(quad_points)
    z = z0.clone()
    s_z = score_t(z)
    g_z = -s_z + quad_grad(z)
    q_z = quad(z)
    n_eval = 1
    accepted = 0
    noise = math.sqrt(2 * tau)
    for _ in range(n_steps):
        prop = z - tau * g_z + noise * torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
        if project is not None:
            prop = project(prop)
        s_p = score_t(prop)
        n_eval += 1
        delta = prop - z
        integral = weights[0] * (s_z * delta).sum(1) + weights[-1] * (s_p * delta).sum(1)
        for u, w in zip(nodes[1:-1], weights[1:-1]):
            integral = integral + w * (score_t(z + u * delta) * delta).sum(1)
            n_eval += 1
        q_p = quad(prop)
        g_p = -s_p + quad_grad(prop)
        d_energy = -integral + (q_p - q_z)
        fwd = prop - z + tau * g_z
        bwd = z - prop + tau * g_p
        log_alpha = -d_energy - (bwd.pow(2).sum(1) - fwd.pow(2).sum(1)) / (4 * tau)
        u01 = torch.rand(z.shape[0], generator=gen, device=z.device, dtype=z.dtype)
        acc = torch.log(u01) < log_alpha
        z = torch.where(acc[:, None], prop, z)
        s_z = torch.where(acc[:, None], s_p, s_z)
        g_z = torch.where(acc[:, None], g_p, g_z)
        q_z = torch.where(acc, q_p, q_z)
        accepted += int(acc.sum())
    return z, n_eval, accepted


def rtk(score_fn: ScoreFn, x0: Tensor, T: float, n_segments: int, inner: str = "mala", inner_steps: int = 10,
        inner_step: float = 0.5, *, t_end: float = 0.0, energy_fn: EnergyTFn | None = None, gamma: float = 2.0,
        quad_points: int = 0, ball_radius: float | None = 5.0, init: str = "prev", rho: float = 1.0,
        generator: torch.Generator | int | None = None, record_every: int = 0) -> SampleResult:
    """RTK inference (Algorithm 1 with the MALA or ULD inner sampler; module text for every symbol).

    ``x0 [n_chains, d]``: the start at time ``T`` (usually N(0, I) draws). ``inner_step``: the MALA step in units of
    ``sigma2 = 1 - e^{-2 eta}``, or the ULD step in units of ``sqrt(sigma2)``. ``record_every = r`` keeps the chains
    after segments r, 2r, ... in ``trace`` (segment k ends at ``times[k]``). ``rho = 1`` (default): the paper's equal
    segments; ``rho > 1`` (an rlkit extension, not in the paper): the segment ends follow
    :func:`rlkit.samplers.diffusion.time_grid`, shorter segments near ``t_end``. ``n_grad``: score evaluations per
    chain; ``accept_rate``: MALA's mean acceptance (None for ULD); ``extra``: ``eta`` (the K segment lengths),
    ``times`` (the K + 1 segment end times), ``accept_per_segment``, ``projected`` (the fraction of MALA proposals
    the ball projection moved)."""
    _check_x(x0, "x0")
    T = _check_time("T", T)
    t_end = _check_time("t_end", t_end)
    if not t_end < T:
        raise ValueError(f"t_end must be < T, got t_end={t_end} and T={T}")
    for name, v, lo in (("n_segments", n_segments, 1), ("inner_steps", inner_steps, 1),
                        ("record_every", record_every, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if inner not in INNER_SAMPLERS:
        raise ValueError(f"inner must be one of {INNER_SAMPLERS}, got {inner!r}")
    inner_step = _positive("inner_step", inner_step)
    gamma = _positive("gamma", gamma)
    lobatto_rule(quad_points)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (module text), got {init!r}")
    if ball_radius is not None:
        ball_radius = _positive("ball_radius", ball_radius)
    if energy_fn is not None and inner != "mala":
        raise ValueError("energy_fn is used only by inner='mala' (ULD needs the score alone); drop it")
    if energy_fn is not None and quad_points:
        raise ValueError("quad_points sets the score quadrature used when no energy_fn is given; with energy_fn "
                         "the energy difference is exact, so leave quad_points at 0")

    n, d = x0.shape
    times = time_grid(T, n_segments, t_end, rho)
    etas = [times[k] - times[k + 1] for k in range(n_segments)]
    gen = make_generator(generator, x0.device)
    x = x0.clone()
    n_grad = n_energy = 0
    acc_total = steps_total = projected = proposals = 0
    accept_per_segment: list[float | None] = []
    trace = []
    for k in range(n_segments):
        t, eta = times[k + 1], etas[k]
        a, sigma2 = math.exp(-eta), ou_var(eta)
        x_prev = x

        def quad(z: Tensor, x_prev: Tensor = x_prev, a: float = a, sigma2: float = sigma2) -> Tensor:
            return (x_prev - a * z).pow(2).sum(1) / (2 * sigma2)

        def quad_grad(z: Tensor, x_prev: Tensor = x_prev, a: float = a, sigma2: float = sigma2) -> Tensor:
            return a * (a * z - x_prev) / sigma2

        def score_t(z: Tensor, t: float = t) -> Tensor:
            return _score(score_fn, z, t)

        def grad_g(z: Tensor) -> Tensor:
            return -score_t(z) + quad_grad(z)

        if init == "prev":
            z0 = x_prev
        elif init == "scaled":
            z0 = x_prev / a
        else:
            guess = (x_prev + sigma2 * _score(score_fn, x_prev, times[k])) / a
            n_grad += 1
            z0 = guess if init == "tweedie" else guess + math.sqrt(sigma2) * torch.randn(
                x_prev.shape, generator=gen, device=x_prev.device, dtype=x_prev.dtype)
        if inner == "uld":
            sig = math.sqrt(sigma2)
            res = uld(grad_g, z0, inner_step * sig, inner_steps, gamma=gamma / sig, generator=gen)
            x, n_grad = res.samples, n_grad + res.n_grad
            accept_per_segment.append(None)
        else:
            tau = inner_step * sigma2
            if ball_radius is None:
                project, hits = None, [0]
            else:
                project, hits = _ball_projection(z0, ball_radius * math.sqrt(d * sigma2))
            if energy_fn is not None:
                def energy_g(z: Tensor, t: float = t, quad: Callable[[Tensor], Tensor] = quad) -> Tensor:
                    return energy_fn(z, t) + quad(z)

                res = mala(energy_g, grad_g, z0, tau, inner_steps, generator=gen, project=project)
                x, n_grad, n_energy = res.samples, n_grad + res.n_grad, n_energy + res.n_energy
                acc = int(res.extra["accepted"].sum())
            else:
                x, evals, acc = _mala_energy_difference(score_t, quad, quad_grad, z0, tau, inner_steps, quad_points,
                                                        project, gen)
                n_grad += evals
            acc_total += acc
            steps_total += inner_steps * n
            projected += hits[0]
            proposals += inner_steps * n
            accept_per_segment.append(acc / (inner_steps * n))
        if record_every and (k + 1) % record_every == 0:
            trace.append(x.clone())
    accept_rate = acc_total / steps_total if inner == "mala" else None
    extra = {"eta": etas, "times": times, "accept_per_segment": accept_per_segment,
             "projected": projected / proposals if proposals else 0.0}
    return SampleResult(samples=x, n_grad=n_grad, n_energy=n_energy, accept_rate=accept_rate, trace=trace, extra=extra)
