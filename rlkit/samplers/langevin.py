"""Langevin-type kernels shared by the samplers: SGLD, MALA (optionally projected) and underdamped Langevin (ULD).

Conventions (every sampler in :mod:`rlkit.samplers`):

- the target is ``p(x) ∝ exp(-U(x))``; ``energy_fn(x) -> [n_chains]`` is U at a batch of points ``x [n_chains, d]`` and
  ``grad_fn(x) -> [n_chains, d]`` is its gradient (for SGLD it may be a stochastic estimate);
- a call runs ``n_chains`` independent chains in parallel from ``x0 [n_chains, d]`` and returns a :class:`SampleResult`;
- randomness comes from ``generator`` (a ``torch.Generator``, an ``int`` seed, or None for torch's global RNG), so
  the same seed gives the same chains;
- ``n_grad`` / ``n_energy`` count calls of ``grad_fn`` / ``energy_fn`` **per chain** (one call on the whole batch
  costs one evaluation for each chain);
- ``record_every = r > 0`` stores a copy of the chains after steps r, 2r, ... in ``trace`` (x0 is not stored).

Schemes (step h):

- SGLD / unadjusted Langevin:  ``x' = x - h ∇U(x) + sqrt(2h) ξ``.
- MALA: propose ``z = x - h ∇U(x) + sqrt(2h) ξ`` (then ``z = project(z)`` if given) and accept with probability
  ``min(1, exp(log_alpha))``, ``log_alpha = U(x) - U(z) - |x - z + h∇U(z)|² / (4h) + |z - x + h∇U(x)|² / (4h)``,
  chain by chain; a rejected chain stays where it is. With ``project`` the ratio is evaluated at the projected point
  with the Gaussian proposal density (the projection is meant to be rarely active, e.g. a large ball; it is then a
  safeguard and not part of the proposal density).
- ULD: ``dx = v dt``, ``dv = -∇U(x) dt - γ v dt + sqrt(2γ) dB`` (unit mass; stationary law ``exp(-U(x) - |v|²/2)``).
  One step freezes the gradient at the current point, ``g = ∇U(x_k)``, and integrates the remaining linear SDE exactly
  over [0, h] (the exponential integrator of Cheng, Chatterji, Bartlett and Jordan, 2018):
  ``v' = e^{-γh} v - (1 - e^{-γh})/γ · g + W_v``,
  ``x' = x + (1 - e^{-γh})/γ · v - (h - (1 - e^{-γh})/γ)/γ · g + W_x``,
  with ``(W_x, W_v)`` Gaussian, independent across coordinates, variances
  ``Var W_v = 1 - e^{-2γh}``, ``Var W_x = (2/γ)(h - 2(1 - e^{-γh})/γ + (1 - e^{-2γh})/(2γ))`` and covariance
  ``Cov(W_x, W_v) = (1 - e^{-γh})²/γ``. One gradient per step; the friction and noise are exact, the only error is the
  frozen gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
EnergyFn = Callable[[Tensor], Tensor]
GradFn = Callable[[Tensor], Tensor]

__all__ = ["SampleResult", "make_generator", "sgld", "mala", "mala_log_accept", "uld"]


@dataclass
class SampleResult:
    """What a sampler returns.

    ``samples [n_chains, d]``: the final states. ``n_grad`` / ``n_energy``: gradient (or score) / energy evaluations
    per chain. ``accept_rate``: the mean Metropolis acceptance over chains and steps (None for unadjusted samplers).
    ``trace``: snapshots ``[n_chains, d]`` taken every ``record_every`` steps (empty when not recorded).
    ``extra``: sampler-specific figures (e.g. the final velocities of ULD under ``"v"``)."""

    samples: Tensor
    n_grad: int
    n_energy: int = 0
    accept_rate: float | None = None
    trace: list[Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def make_generator(generator: torch.Generator | int | None,
                   device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` from a generator (returned as is), an int seed (a new generator on ``device``) or None."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(generator)
    return g


def _check_x0(x0: Tensor, name: str = "x0") -> None:
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"{name} must be a tensor [n_chains, d], got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if not x0.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x0.dtype}")


def _check_steps(n_steps: int, record_every: int) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 0:
        raise ValueError(f"record_every must be an int >= 0, got {record_every!r}")


def _positive(name: str, value: float) -> float:
    """``value`` as a float, or a one-line ValueError naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _step_tensor(step: float | Tensor, x0: Tensor, name: str = "step") -> Tensor | float:
    """A positive float, or a tensor [n_chains] (one step size per chain) reshaped to [n_chains, 1]."""
    if isinstance(step, torch.Tensor):
        if step.dim() == 0:
            step = float(step)
        else:
            if step.shape != (x0.shape[0],):
                raise ValueError(f"{name} as a tensor must have shape [n_chains]={x0.shape[0]}, "
                                 f"got {tuple(step.shape)}")
            if not bool((step > 0).all()):
                raise ValueError(f"{name} must be > 0")
            return step.to(x0).reshape(-1, 1)
    return _positive(name, step)


def _grad(grad_fn: GradFn, x: Tensor) -> Tensor:
    g = grad_fn(x)
    if not isinstance(g, torch.Tensor) or g.shape != x.shape:
        raise ValueError(f"grad_fn must return a tensor of the input's shape {tuple(x.shape)}, got "
                         f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    return g


def _energy(energy_fn: EnergyFn, x: Tensor) -> Tensor:
    u = energy_fn(x)
    if not isinstance(u, torch.Tensor) or u.shape != (x.shape[0],):
        raise ValueError(f"energy_fn must return a tensor [n_chains]={x.shape[0]}, got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    return u


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def sgld(grad_fn: GradFn, x0: Tensor, step: float | Tensor, n_steps: int,
         generator: torch.Generator | int | None = None, record_every: int = 0) -> SampleResult:
    """Stochastic-gradient (or unadjusted) Langevin: ``x' = x - step * grad_fn(x) + sqrt(2 step) ξ``.

    ``grad_fn`` may return a minibatch estimate of ∇U; each call counts as one gradient evaluation per chain (a caller
    that wants per-datum units scales it). ``step`` is a float or a tensor [n_chains]."""
    _check_x0(x0)
    _check_steps(n_steps, record_every)
    h = _step_tensor(step, x0)
    gen = make_generator(generator, x0.device)
    noise_scale = (2 * h) ** 0.5
    x = x0.clone()
    trace = []
    for k in range(1, n_steps + 1):
        x = x - h * _grad(grad_fn, x) + noise_scale * _randn(x, gen)
        if record_every and k % record_every == 0:
            trace.append(x.clone())
    return SampleResult(samples=x, n_grad=n_steps, n_energy=0, accept_rate=None, trace=trace)


def _log_accept(x: Tensor, z: Tensor, ux: Tensor, uz: Tensor, gx: Tensor, gz: Tensor, h: float | Tensor) -> Tensor:
    fwd = z - x + h * gx   # proposal x -> z: log q(z|x) = -|z - x + h gx|^2 / (4h)
    bwd = x - z + h * gz   # reverse z -> x
    h_flat = h if isinstance(h, float) else h.reshape(-1)
    return ux - uz - (bwd.pow(2).sum(-1) - fwd.pow(2).sum(-1)) / (4 * h_flat)


def mala_log_accept(x: Tensor, z: Tensor, energy_fn: EnergyFn, grad_fn: GradFn, step: float | Tensor) -> Tensor:
    """The MALA log acceptance ratio of moving each chain from ``x`` to ``z`` (both ``[n_chains, d]``):
    ``U(x) - U(z) - |x - z + h∇U(z)|²/(4h) + |z - x + h∇U(x)|²/(4h)``; returns ``[n_chains]`` (not clipped at 0)."""
    _check_x0(x, "x")
    _check_x0(z, "z")
    if x.shape != z.shape:
        raise ValueError(f"x and z must have the same shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    h = _step_tensor(step, x)
    return _log_accept(x, z, _energy(energy_fn, x), _energy(energy_fn, z), _grad(grad_fn, x), _grad(grad_fn, z), h)


def mala(energy_fn: EnergyFn, grad_fn: GradFn, x0: Tensor, step: float | Tensor, n_steps: int,
         generator: torch.Generator | int | None = None, project: Callable[[Tensor], Tensor] | None = None,
         record_every: int = 0) -> SampleResult:
    """Metropolis-adjusted Langevin, chain by chain (see the module text for the ratio and the optional projection).

    Costs: one energy and one gradient at ``x0`` plus one of each per proposal, so ``n_grad = n_energy = n_steps + 1``
    (0 when ``n_steps`` is 0). ``extra["accepted"]`` holds the per-chain number of accepted moves."""
    _check_x0(x0)
    _check_steps(n_steps, record_every)
    h = _step_tensor(step, x0)
    gen = make_generator(generator, x0.device)
    x = x0.clone()
    if n_steps == 0:
        return SampleResult(samples=x, n_grad=0, n_energy=0, accept_rate=None,
                            extra={"accepted": torch.zeros(x.shape[0], dtype=torch.long, device=x.device)})
    ux, gx = _energy(energy_fn, x), _grad(grad_fn, x)
    noise_scale = (2 * h) ** 0.5
    accepted = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    trace = []
    for k in range(1, n_steps + 1):
        z = x - h * gx + noise_scale * _randn(x, gen)
        if project is not None:
            z = project(z)
            if not isinstance(z, torch.Tensor) or z.shape != x.shape:
                raise ValueError(f"project must return a tensor of shape {tuple(x.shape)}")
        uz, gz = _energy(energy_fn, z), _grad(grad_fn, z)
        log_alpha = _log_accept(x, z, ux, uz, gx, gz, h)
        u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
        acc = torch.log(u) < log_alpha   # NaN log_alpha (e.g. an infinite energy) rejects
        x = torch.where(acc[:, None], z, x)
        ux = torch.where(acc, uz, ux)
        gx = torch.where(acc[:, None], gz, gx)
        accepted += acc.long()
        if record_every and k % record_every == 0:
            trace.append(x.clone())
    rate = float(accepted.sum()) / (n_steps * x.shape[0])
    return SampleResult(samples=x, n_grad=n_steps + 1, n_energy=n_steps + 1, accept_rate=rate, trace=trace,
                        extra={"accepted": accepted})


def _uld_coefficients(h: float | Tensor, gamma: float) -> dict:
    """Drift and noise coefficients of one exponential-integrator ULD step (module text)."""
    ht = torch.as_tensor(h, dtype=torch.float64)
    e1 = torch.exp(-gamma * ht)
    e2 = torch.exp(-2 * gamma * ht)
    a = (1 - e1) / gamma
    var_v = 1 - e2
    var_x = (2 / gamma) * (ht - 2 * (1 - e1) / gamma + (1 - e2) / (2 * gamma))
    cov = (1 - e1) ** 2 / gamma
    # Cholesky of [[var_x, cov], [cov, var_v]] with x first: W_x = l11 ξ1, W_v = l21 ξ1 + l22 ξ2
    l11 = torch.sqrt(var_x)
    l21 = cov / l11
    l22 = torch.sqrt(torch.clamp(var_v - l21 ** 2, min=0.0))
    return {"e1": e1, "a": a, "b": (ht - a) / gamma, "l11": l11, "l21": l21, "l22": l22}


def uld(grad_fn: GradFn, x0: Tensor, step: float | Tensor, n_steps: int, gamma: float = 2.0, v0: Tensor | None = None,
        generator: torch.Generator | int | None = None, record_every: int = 0) -> SampleResult:
    """Underdamped Langevin with the exponential integrator described in the module text (friction ``gamma``, unit
    mass). ``v0`` defaults to a draw from N(0, I) (the velocity's stationary law). Returns the positions in
    ``samples`` and the final velocities in ``extra["v"]``; ``n_grad = n_steps``."""
    _check_x0(x0)
    _check_steps(n_steps, record_every)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    h = _step_tensor(step, x0)
    gen = make_generator(generator, x0.device)
    x = x0.clone()
    if v0 is None:
        v = _randn(x, gen)
    else:
        if not isinstance(v0, torch.Tensor) or v0.shape != x0.shape:
            raise ValueError(f"v0 must be a tensor of x0's shape {tuple(x0.shape)}")
        v = v0.to(x0).clone()
    c = {k: t.to(x0) for k, t in _uld_coefficients(h, float(gamma)).items()}
    trace = []
    for k in range(1, n_steps + 1):
        g = _grad(grad_fn, x)
        xi1, xi2 = _randn(x, gen), _randn(x, gen)
        x_new = x + c["a"] * v - c["b"] * g + c["l11"] * xi1
        v = c["e1"] * v - c["a"] * g + c["l21"] * xi1 + c["l22"] * xi2
        x = x_new
        if record_every and k % record_every == 0:
            trace.append(x.clone())
    return SampleResult(samples=x, n_grad=n_steps, n_energy=0, accept_rate=None, trace=trace, extra={"v": v})
