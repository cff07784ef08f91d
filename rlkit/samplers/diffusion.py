"""Diffusion inference with a given score: the OU forward process, the exact marginals of a Gaussian mixture under it,
and the two standard baselines, DDPM (reverse SDE) and DDIM (probability-flow ODE). RTK inference (Huang et al.,
arXiv 2405.16387) is in :mod:`rlkit.samplers.rtk`; the method page is ``docs/methods/rtk.md``.

Forward process (the one of the RTK paper): ``dX_t = -X_t dt + sqrt(2) dB_t``, so
``X_t = e^{-t} X_0 + sigma_t ξ`` with ``sigma_t^2 = 1 - e^{-2t}`` and ``p_t -> N(0, I)``. A score function is
``score_fn(x [n, d], t: float) -> [n, d]`` approximating ``∇ log p_t(x)``; every call counts as one score evaluation
(NFE) per chain. Samplers run from time ``T`` down to ``t_end`` (0, or a small early-stopping time for a learned score)
on the grid :func:`time_grid` and return a :class:`~rlkit.samplers.langevin.SampleResult` (``n_grad`` = NFE per chain).

Reverse-time schemes on a step ``t -> s`` (``s < t``, ``h = t - s``, ``y`` the current point, ``g = score_fn(y, t)``):

- DDPM, ``scheme="ei"`` (default): the exponential integrator of the reverse SDE
  ``dY = (Y + 2 ∇log p_{T-u}(Y)) du + sqrt(2) dB`` with the score frozen at the start of the step and the linear part
  integrated exactly: ``y' = e^h y + 2 (e^h - 1) g + sqrt(e^{2h} - 1) ξ``.
- DDPM, ``scheme="em"``: Euler–Maruyama of the same SDE, ``y' = y + h (y + 2 g) + sqrt(2h) ξ``.
- DDPM, ``scheme="ancestral"``: Ho et al.'s ancestral step with ``beta = 1 - e^{-2h}``,
  ``y' = (y + beta g) / sqrt(1 - beta) + sqrt(beta) ξ``.
- DDIM (deterministic, eta = 0): with ``a_t = e^{-t}`` and the noise estimate ``eps = -sigma_t g``, the clean estimate
  ``x0 = (y - sigma_t eps) / a_t`` is moved to ``y' = a_s x0 + sigma_s eps``; this is the exponential integrator of the
  probability-flow ODE ``dY = (Y + ∇log p_{T-u}(Y)) du`` in the noise parametrisation.

All four use one score evaluation per step, so NFE = ``n_steps``. The time grid is
``t_i = t_end + (T - t_end) (1 - i/N)^rho`` (``rho = 1``: uniform; ``rho > 1`` puts more steps near ``t_end``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlkit.samplers.langevin import SampleResult, make_generator
from rlkit.samplers.targets import GaussianMixture

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, float], Tensor]

__all__ = ["OUMixture", "ou_scale", "ou_var", "time_grid", "prior_sample", "ddpm", "ddim", "DDPM_SCHEMES"]

DDPM_SCHEMES = ("ei", "em", "ancestral")


def ou_scale(t: float) -> float:
    """``e^{-t}``: the mean factor of the OU transition from 0 to ``t``."""
    return math.exp(-t)


def ou_var(t: float) -> float:
    """``1 - e^{-2t}``: the variance of the OU transition from 0 to ``t``."""
    return -math.expm1(-2.0 * t)


def _check_time(name: str, t: float, lo: float = 0.0) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < lo:
        raise ValueError(f"{name} must be a finite number >= {lo}, got {t!r}")
    return float(t)


def _check_int(name: str, n: int, lo: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {n!r}")
    return n


def _check_x(x: Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [n_chains, d], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _score(score_fn: ScoreFn, x: Tensor, t: float) -> Tensor:
    s = score_fn(x, t)
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        raise ValueError(f"score_fn must return a tensor of the input's shape {tuple(x.shape)}, got "
                         f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
    return s


def time_grid(T: float, n_steps: int, t_end: float = 0.0, rho: float = 1.0) -> list[float]:
    """``n_steps + 1`` decreasing times from ``T`` to ``t_end``: ``t_i = t_end + (T - t_end)(1 - i/N)^rho``."""
    T = _check_time("T", T)
    t_end = _check_time("t_end", t_end)
    _check_int("n_steps", n_steps, 1)
    if not t_end < T:
        raise ValueError(f"t_end must be < T, got t_end={t_end} and T={T}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho must be a number > 0, got {rho!r}")
    ts = [t_end + (T - t_end) * (1.0 - i / n_steps) ** rho for i in range(n_steps + 1)]
    ts[0], ts[-1] = T, t_end
    return ts


def prior_sample(n: int, d: int, generator: torch.Generator | int | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` draws of N(0, I_d), the stationary law of the OU process (the usual start ``x_T``)."""
    _check_int("n", n, 1)
    _check_int("d", d, 1)
    return torch.randn(n, d, generator=make_generator(generator), dtype=dtype)


def ddpm(score_fn: ScoreFn, x_T: Tensor, T: float, n_steps: int, *, t_end: float = 0.0, rho: float = 1.0,
         scheme: str = "ei", generator: torch.Generator | int | None = None, record_every: int = 0) -> SampleResult:
    """DDPM: ``n_steps`` steps of a discretised reverse SDE from ``x_T`` at time ``T`` down to ``t_end`` (schemes
    ``"ei"`` / ``"em"`` / ``"ancestral"``, grid exponent ``rho``: module text). ``n_grad`` = ``n_steps`` (one score
    evaluation per step and chain); ``record_every = r`` keeps the chains after steps r, 2r, ... in ``trace``."""
    _check_x(x_T, "x_T")
    if scheme not in DDPM_SCHEMES:
        raise ValueError(f"scheme must be one of {DDPM_SCHEMES}, got {scheme!r}")
    _check_int("record_every", record_every, 0)
    ts = time_grid(T, n_steps, t_end, rho)
    gen = make_generator(generator, x_T.device)
    y = x_T.clone()
    trace = []
    for i in range(n_steps):
        t, s = ts[i], ts[i + 1]
        h = t - s
        g = _score(score_fn, y, t)
        xi = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
        if scheme == "ei":
            y = math.exp(h) * y + 2.0 * math.expm1(h) * g + math.sqrt(math.expm1(2.0 * h)) * xi
        elif scheme == "em":
            y = y + h * (y + 2.0 * g) + math.sqrt(2.0 * h) * xi
        else:
            beta = -math.expm1(-2.0 * h)
            y = (y + beta * g) / math.sqrt(1.0 - beta) + math.sqrt(beta) * xi
        if record_every and (i + 1) % record_every == 0:
            trace.append(y.clone())
    return SampleResult(samples=y, n_grad=n_steps, n_energy=0, accept_rate=None, trace=trace,
                        extra={"times": ts, "scheme": scheme})


def ddim(score_fn: ScoreFn, x_T: Tensor, T: float, n_steps: int, *, t_end: float = 0.0, rho: float = 1.0,
         record_every: int = 0) -> SampleResult:
    """DDIM (eta = 0): ``n_steps`` deterministic steps of the probability-flow ODE from ``x_T`` at ``T`` to ``t_end``
    (module text). ``n_grad`` = ``n_steps``."""
    _check_x(x_T, "x_T")
    _check_int("record_every", record_every, 0)
    ts = time_grid(T, n_steps, t_end, rho)
    y = x_T.clone()
    trace = []
    for i in range(n_steps):
        t, s = ts[i], ts[i + 1]
        g = _score(score_fn, y, t)
        sig_t, sig_s = math.sqrt(ou_var(t)), math.sqrt(ou_var(s))
        eps = -sig_t * g
        x0 = (y - sig_t * eps) / ou_scale(t)
        y = ou_scale(s) * x0 + sig_s * eps
        if record_every and (i + 1) % record_every == 0:
            trace.append(y.clone())
    return SampleResult(samples=y, n_grad=n_steps, n_energy=0, accept_rate=None, trace=trace, extra={"times": ts})


class OUMixture:
    """A Gaussian mixture ``p_0 = Σ_k w_k N(mu_k, C_k)`` pushed through the OU process: in closed form
    ``p_t = Σ_k w_k N(e^{-t} mu_k, e^{-2t} C_k + (1 - e^{-2t}) I)``, so its density, energy ``f_t = -log p_t``, score
    and exact samples are available at every ``t >= 0`` (the exact-score test bed of the RTK paper's experiments).

    ``means [K, d]``, ``covs``: ``[K, d, d]``, ``[K, d]`` (diagonal), ``[K]`` or a float (isotropic), ``weights [K]``
    (normalised; None: equal), as for :class:`~rlkit.samplers.targets.GaussianMixture`. Each ``p_t`` is such a
    mixture (:meth:`marginal`, cached per t); computations run in ``dtype`` (float64 by default) and results come back
    in the input's dtype."""

    def __init__(self, means: Tensor, covs: Tensor | float = 1.0, weights: Tensor | list[float] | None = None,
                 dtype: torch.dtype = torch.float64):
        self.base = GaussianMixture(means, covs, weights, dtype=dtype)
        if not bool((torch.linalg.eigvalsh(self.base.covs) > 0).all()):
            raise ValueError("covs must be positive definite")
        self.dim = self.base.d
        self._cache: dict[float, GaussianMixture] = {}

    def marginal(self, t: float) -> GaussianMixture:
        """``p_t`` as a :class:`~rlkit.samplers.targets.GaussianMixture`."""
        t = _check_time("t", t)
        if t not in self._cache:
            if len(self._cache) > 512:
                self._cache.clear()
            a, v = ou_scale(t), ou_var(t)
            eye = torch.eye(self.dim, dtype=self.base.means.dtype)
            self._cache[t] = GaussianMixture(a * self.base.means, a * a * self.base.covs + v * eye,
                                             self.base.weights, dtype=self.base.means.dtype)
        return self._cache[t]

    def params_at(self, t: float) -> tuple[Tensor, Tensor]:
        """Means ``[K, d]`` and covariances ``[K, d, d]`` of the components of ``p_t``."""
        m = self.marginal(t)
        return m.means, m.covs

    def _x(self, x: Tensor) -> Tensor:
        _check_x(x, "x")
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have d={self.dim} columns, got {x.shape[1]}")
        return x.to(self.base.means.dtype)

    def log_prob(self, x: Tensor, t: float = 0.0) -> Tensor:
        """``log p_t(x)`` ``[n]``."""
        return self.marginal(t).log_prob(self._x(x)).to(x.dtype)

    def energy(self, x: Tensor, t: float = 0.0) -> Tensor:
        """``f_t(x) = -log p_t(x)`` ``[n]``."""
        return -self.log_prob(x, t)

    def score(self, x: Tensor, t: float = 0.0) -> Tensor:
        """``∇ log p_t(x)`` ``[n, d]`` (the exact score)."""
        return (-self.marginal(t).grad(self._x(x))).to(x.dtype)

    def sample(self, n: int, t: float = 0.0, generator: torch.Generator | int | None = None) -> Tensor:
        """``n`` exact draws from ``p_t`` ``[n, d]`` (in ``dtype``)."""
        _check_int("n", n, 1)
        return self.marginal(t).sample(n, generator=make_generator(generator))
