"""Stochastic proximal samplers (SPS-SGLD, SPS-MALA; Huang, Zou, Dong, Ma, Zhang, ICML 2024, arXiv 2405.16734) and
the minibatch SGLD baseline, for finite-sum targets ``p*(x) ∝ exp(-f(x))``, ``f = (1/n) Σ_i f_i``.

The target object (e.g. :class:`rlkit.samplers.targets.MixtureFiniteSum`) gives ``n``, ``d`` and the minibatch
estimates ``energy_batch(x, idx) -> [n_chains]`` and ``grad_batch(x, idx) -> [n_chains, d]`` (the mean of f_i / ∇f_i
over ``idx [n_chains, b]``, one minibatch per chain, or ``idx [b]`` shared by all chains; the full batch is
passed as ``arange(n)``).

Proximal sampler (Lee, Shen and Tian, 2021): a Gibbs sampler on ``π(x, y) ∝ exp(-f(x) - |x - y|²/(2η))``, whose
x-marginal is p*. One outer iteration k:

1. forward: ``y_k ~ N(x_k, η I)``;
2. backward (the restricted Gaussian oracle, RGO): ``x_{k+1} ~ π(x | y_k) ∝ exp(-g(x))``,
   ``g(x) = f_b(x) + |x - y_k|²/(2η)`` with a minibatch energy f_b in place of f (SPS).

When ``η < 1/L`` the RGO target is strongly log-concave (curvature at least ``1/η - L``) even if f is not, so a few
inner steps approximate it:

- ``inner="sgld"`` (SPS-SGLD): S steps ``z ← z - τ(∇f_{b_s}(z) + (z - y_k)/η) + sqrt(2τ) ξ``, a fresh minibatch b_s at
  every inner step;
- ``inner="mala"`` (SPS-MALA): S MALA steps on g with one minibatch b_k drawn per outer iteration and held fixed in
  the inner loop (so the Metropolis ratio targets one fixed density, ``exp(-f_{b_k}(z) - |z - y_k|²/(2η))``);
- ``inner="exact"``: a user-supplied exact RGO sampler (full batch only); this is the ideal proximal sampler, used to
  test the loop and as a reference.

Choices the paper's text available to us does not pin down (see docs/methods/samplers.md): the inner chain starts at
``x_k`` (``init="x"``, default) or at ``y_k`` (``init="y"``); minibatches are drawn uniformly with replacement,
independently per chain; the sample is the inner chain's last state.

Cost accounting (``SampleResult``): ``n_grad`` / ``n_energy`` count minibatch oracle calls per chain (one call on a
minibatch of b data = one evaluation), and ``extra`` adds ``grad_data`` / ``energy_data`` (per-datum evaluations:
b per call, or n for a full-batch call) and ``grad_full`` / ``energy_full`` (the same divided by n: full-gradient
equivalents). The bench compares samplers in per-datum gradient evaluations. ``extra["grad_data_per_step"]`` is the
per-datum cost of one recorded step (outer iteration for SPS, step for SGLD), so ``trace[j]`` was taken after
``(j + 1) * record_every * grad_data_per_step`` per-datum gradients per chain."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from rlkit.samplers.langevin import SampleResult, _check_steps, _check_x0, _positive, make_generator, mala, sgld

Tensor = torch.Tensor

__all__ = ["FiniteSum", "sps", "sgld_minibatch", "proximal_sampler", "draw_batch"]


class FiniteSum(Protocol):
    n: int

    def energy_batch(self, x: Tensor, idx: Tensor) -> Tensor: ...

    def grad_batch(self, x: Tensor, idx: Tensor) -> Tensor: ...


def _check_target(target, need_energy: bool) -> int:
    n = getattr(target, "n", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("target must have an int attribute n >= 1 (the number of terms f_i)")
    if not callable(getattr(target, "grad_batch", None)):
        raise ValueError("target must have grad_batch(x, idx) -> [n_chains, d]")
    if need_energy and not callable(getattr(target, "energy_batch", None)):
        raise ValueError("target must have energy_batch(x, idx) -> [n_chains] for the MALA inner loop")
    return n


def _check_batch(batch_size: int | None, n: int) -> int:
    if batch_size is None:
        return n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, n={n}] or None (full batch), got {batch_size!r}")
    return batch_size


def draw_batch(n_chains: int, n: int, b: int, generator: torch.Generator | None, device="cpu") -> Tensor | None:
    """A minibatch per chain, ``[n_chains, b]`` indices drawn uniformly with replacement; None for the full batch
    (``b == n``: every term, no sampling)."""
    if b == n:
        return None
    return torch.randint(0, n, (n_chains, b), generator=generator, device=device)


def _full_idx(n: int, device) -> Tensor:
    return torch.arange(n, device=device)


def sgld_minibatch(target: FiniteSum, x0: Tensor, step: float, n_steps: int, batch_size: int | None = None,
                   generator: torch.Generator | int | None = None, record_every: int = 0) -> SampleResult:
    """SGLD on ``f = (1/n) Σ f_i`` with a fresh minibatch of ``batch_size`` per chain at every step (None: full
    gradient, i.e. the unadjusted Langevin algorithm). Cost units as in the module text."""
    _check_x0(x0)
    n = _check_target(target, need_energy=False)
    b = _check_batch(batch_size, n)
    gen = make_generator(generator, x0.device)
    full = _full_idx(n, x0.device)

    def grad_fn(x):
        idx = draw_batch(x.shape[0], n, b, gen, x.device)
        return target.grad_batch(x, full if idx is None else idx)

    res = sgld(grad_fn, x0, step, n_steps, generator=gen, record_every=record_every)
    res.extra.update(grad_data=res.n_grad * b, grad_full=res.n_grad * b / n, energy_data=0, energy_full=0.0,
                     grad_data_per_step=b)
    return res


def proximal_sampler(rgo: Callable[[Tensor, float, torch.Generator | None], Tensor], x0: Tensor, eta: float,
                     n_outer: int, generator: torch.Generator | int | None = None,
                     record_every: int = 0) -> SampleResult:
    """The ideal proximal sampler: ``y ~ N(x, η I)``, then ``x = rgo(y, η, generator)`` (an exact RGO draw, e.g.
    :meth:`rlkit.samplers.targets.Gaussian.rgo_sample`). ``n_grad`` is 0: an exact oracle is not counted."""
    _check_x0(x0)
    _check_steps(n_outer, record_every)
    eta = _positive("eta", eta)
    gen = make_generator(generator, x0.device)
    x, trace = x0.clone(), []
    for k in range(1, n_outer + 1):
        y = x + math.sqrt(eta) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x = rgo(y, eta, gen)
        if record_every and k % record_every == 0:
            trace.append(x.clone())
    return SampleResult(samples=x, n_grad=0, n_energy=0, accept_rate=None, trace=trace,
                        extra={"grad_data": 0, "grad_full": 0.0, "energy_data": 0, "energy_full": 0.0,
                               "grad_data_per_step": 0})


def sps(target: FiniteSum | None, x0: Tensor, eta: float, n_outer: int, inner: str = "sgld", inner_steps: int = 10,
        inner_step: float | None = None, batch_size: int | None = None, init: str = "x",
        generator: torch.Generator | int | None = None, record_every: int = 0,
        rgo: Callable[[Tensor, float, torch.Generator | None], Tensor] | None = None) -> SampleResult:
    """The stochastic proximal sampler (module text): ``n_outer`` outer iterations with step ``eta``; the backward
    step runs ``inner_steps`` steps of size ``inner_step`` of ``inner`` ("sgld", "mala" or "exact", the latter with
    ``rgo(y, eta, generator)``) from ``init`` ("x": the current x_k; "y": y_k), on minibatches of ``batch_size``
    (None: the full batch). ``accept_rate`` is the inner MALA acceptance (None otherwise);
    ``extra["accept_per_chain"]`` the per-chain acceptance."""
    _check_x0(x0)
    _check_steps(n_outer, record_every)
    eta = _positive("eta", eta)
    if inner not in ("sgld", "mala", "exact"):
        raise ValueError(f"inner must be 'sgld', 'mala' or 'exact', got {inner!r}")
    if init not in ("x", "y"):
        raise ValueError(f"init must be 'x' or 'y', got {init!r}")
    gen = make_generator(generator, x0.device)
    if inner == "exact":
        if rgo is None:
            raise ValueError("inner='exact' needs rgo(y, eta, generator), an exact RGO sampler")
        if batch_size is not None and target is not None and batch_size != target.n:
            raise ValueError("inner='exact' works with the full batch only (batch_size None)")
        return proximal_sampler(rgo, x0, eta, n_outer, generator=gen, record_every=record_every)
    n = _check_target(target, need_energy=inner == "mala")
    b = _check_batch(batch_size, n)
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
    tau = _positive("inner_step", inner_step)
    n_chains = x0.shape[0]
    full = _full_idx(n, x0.device)
    x, trace = x0.clone(), []
    calls_grad = calls_energy = 0
    accepted = torch.zeros(n_chains, dtype=torch.long, device=x0.device)
    proposals = 0
    for k in range(1, n_outer + 1):
        y = x + math.sqrt(eta) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        z0 = x if init == "x" else y
        if inner == "sgld":
            def grad_g(z, y=y):
                idx = draw_batch(n_chains, n, b, gen, z.device)
                return target.grad_batch(z, full if idx is None else idx) + (z - y) / eta

            res = sgld(grad_g, z0, tau, inner_steps, generator=gen)
        else:
            idx_k = draw_batch(n_chains, n, b, gen, x.device)
            idx_k = full if idx_k is None else idx_k

            def energy_g(z, y=y, idx=idx_k):
                return target.energy_batch(z, idx) + (z - y).pow(2).sum(-1) / (2 * eta)

            def grad_g(z, y=y, idx=idx_k):
                return target.grad_batch(z, idx) + (z - y) / eta

            res = mala(energy_g, grad_g, z0, tau, inner_steps, generator=gen)
            accepted += res.extra["accepted"]
            proposals += inner_steps
        calls_grad += res.n_grad
        calls_energy += res.n_energy
        x = res.samples
        if record_every and k % record_every == 0:
            trace.append(x.clone())
    per_outer_grad = (inner_steps + (1 if inner == "mala" else 0)) * b
    out = SampleResult(samples=x, n_grad=calls_grad, n_energy=calls_energy,
                       accept_rate=(float(accepted.sum()) / (proposals * n_chains)) if proposals else None,
                       trace=trace)
    out.extra.update(grad_data=calls_grad * b, grad_full=calls_grad * b / n, energy_data=calls_energy * b,
                     energy_full=calls_energy * b / n, grad_data_per_step=per_outer_grad)
    if inner == "mala":
        out.extra["accept_per_chain"] = accepted.double() / max(proposals, 1)
    return out
