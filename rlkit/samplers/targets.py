"""Test targets with energies, gradients and exact samples.

- :class:`Gaussian`: ``N(mean, cov)``; also the closed-form restricted Gaussian oracle (RGO) of the proximal sampler.
- :class:`GaussianMixture`: a weighted mixture of full-covariance Gaussians.
- :class:`MixtureFiniteSum`: a non-log-concave finite sum ``f = (1/n) Σ_i f_i`` in any dimension, with minibatch
  energies and gradients and exact samples (rejection sampling; see the class text).

Energies are ``U(x) = -log p(x)`` up to an additive constant; batches are ``x [n_chains, d]``."""

from __future__ import annotations

import math

import torch

from rlkit.samplers.langevin import make_generator

Tensor = torch.Tensor

__all__ = ["Gaussian", "GaussianMixture", "MixtureFiniteSum", "log_cosh"]


def log_cosh(u: Tensor) -> Tensor:
    """``log cosh(u)`` without overflow: ``|u| + log1p(exp(-2|u|)) - log 2``."""
    a = u.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


def _as_matrix(cov, d: int, dtype) -> Tensor:
    cov = torch.as_tensor(cov, dtype=dtype)
    if cov.dim() == 0:
        return cov * torch.eye(d, dtype=dtype)
    if cov.dim() == 1:
        return torch.diag(cov)
    return cov


class Gaussian:
    """``N(mean, cov)``; ``cov`` a full matrix [d, d], a vector of variances [d] or a scalar variance."""

    def __init__(self, mean, cov=1.0, dtype=torch.float64):
        self.mean = torch.as_tensor(mean, dtype=dtype).reshape(-1)
        self.d = self.mean.numel()
        self.cov = _as_matrix(cov, self.d, dtype)
        if self.cov.shape != (self.d, self.d):
            raise ValueError(f"cov must be [d, d] = [{self.d}, {self.d}], got {tuple(self.cov.shape)}")
        self.chol = torch.linalg.cholesky(self.cov)  # raises if cov is not positive definite
        self.precision = torch.cholesky_inverse(self.chol)

    def energy(self, x: Tensor) -> Tensor:
        r = x - self.mean.to(x)
        return 0.5 * ((r @ self.precision.to(x)) * r).sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) @ self.precision.to(x)

    def sample(self, n: int, generator=None) -> Tensor:
        g = make_generator(generator)
        z = torch.randn(n, self.d, generator=g, dtype=self.mean.dtype)
        return self.mean + z @ self.chol.T

    def rgo_moments(self, y: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """Mean [n, d] and covariance [d, d] of the RGO ``π(x | y) ∝ exp(-U(x) - |x - y|²/(2η))``:
        covariance ``(P + I/η)^{-1}``, mean ``cov (P m + y/η)`` (P the precision, m the mean)."""
        eye = torch.eye(self.d, dtype=self.precision.dtype)
        cov = torch.linalg.inv(self.precision + eye / eta)
        cov = 0.5 * (cov + cov.T)
        mean = (self.mean @ self.precision + y.to(cov) / eta) @ cov
        return mean, cov

    def rgo_sample(self, y: Tensor, eta: float, generator=None) -> Tensor:
        """An exact draw from the RGO at each row of ``y`` (the backward step of the ideal proximal sampler)."""
        mean, cov = self.rgo_moments(y, eta)
        z = torch.randn(y.shape, generator=make_generator(generator, y.device), dtype=cov.dtype)
        return (mean + z @ torch.linalg.cholesky(cov).T).to(y)


class GaussianMixture:
    """``Σ_k w_k N(means[k], covs[k])``; ``covs`` [K, d, d], [K, d] (diagonal), [K] or a scalar (isotropic)."""

    def __init__(self, means, covs=1.0, weights=None, dtype=torch.float64):
        self.means = torch.as_tensor(means, dtype=dtype)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, d], got {tuple(self.means.shape)}")
        K, d = self.means.shape
        self.d = d
        covs = torch.as_tensor(covs, dtype=dtype)
        if covs.dim() == 0:
            covs = covs.expand(K)
        if covs.dim() == 1:
            covs = covs[:, None, None] * torch.eye(d, dtype=dtype)
        elif covs.dim() == 2:
            covs = torch.diag_embed(covs)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must give K={K} matrices [d, d], got {tuple(covs.shape)}")
        self.covs = covs
        w = torch.full((K,), 1.0 / K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if w.shape != (K,) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be K={K} non-negative numbers with a positive sum")
        self.weights = w / w.sum()
        self.chols = torch.linalg.cholesky(covs)
        self.precisions = torch.cholesky_inverse(self.chols)
        self._log_norm = (torch.log(self.weights) - torch.log(torch.diagonal(self.chols, dim1=-2, dim2=-1)).sum(-1)
                          - 0.5 * d * math.log(2 * math.pi))

    def _component_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = x[:, None, :] - self.means.to(x)                        # [n, K, d]
        pr = torch.einsum("nkd,kde->nke", r, self.precisions.to(x))  # P_k r
        logp = self._log_norm.to(x) - 0.5 * (pr * r).sum(-1)          # [n, K]
        return logp, pr

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self._component_terms(x)[0], dim=1)

    def energy(self, x: Tensor) -> Tensor:
        return -self.log_prob(x)

    def grad(self, x: Tensor) -> Tensor:
        logp, pr = self._component_terms(x)
        resp = torch.softmax(logp, dim=1)
        return (resp[:, :, None] * pr).sum(1)

    def sample(self, n: int, generator=None) -> Tensor:
        g = make_generator(generator)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.d, generator=g, dtype=self.means.dtype)
        return self.means[k] + torch.einsum("nde,ne->nd", self.chols[k], z)


class MixtureFiniteSum:
    """A non-log-concave finite sum ``f(x) = (1/n) Σ_i f_i(x)``, ``p*(x) ∝ exp(-f(x))``, with

        ``f_i(x) = -log( ½ N(x; a_i, I) + ½ N(x; -a_i, I) ) + c_i·x  (+ const)  = |x|²/2 - log cosh(a_i·x) + c_i·x``.

    The first term is the negative log-likelihood of a datum ``a_i`` under a symmetric two-component mixture with
    location x (so ``exp(-f)`` is the posterior of x, flat prior, tempered by 1/n); ``c_i`` are zero-mean linear
    perturbations (``Σ c_i = 0`` exactly) that leave ``f`` unchanged and only set how noisy minibatch gradients are.
    Data: ``a_i = μ + spread · ε_i / sqrt(d)`` with ``|μ| = sep`` along a random unit direction; ``c_i`` i.i.d.
    ``N(0, noise² I)``, then centred. With ``sep > 1`` the target is a double well along μ (non-log-concave) and
    Gaussian N(0, 1) across it; it is symmetric, ``p*(x) = p*(-x)``.

    Exact samples: ``exp(-|x|²/2) Π_i cosh(a_i·x)^{1/n} ≤ exp(-|x|²/2) (1/n) Σ_i cosh(a_i·x)`` (geometric <= arithmetic
    mean), and the right side is a mixture of ``N(±a_i, I)`` with weights ``∝ exp(|a_i|²/2)``; rejection sampling from
    that mixture, accepting with probability geometric/arithmetic mean of ``cosh(a_i·x)``, is exact."""

    def __init__(self, d: int, n: int = 100, sep: float = 2.5, spread: float = 1.0, noise: float = 2.0,
                 seed: int = 0, dtype=torch.float64):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an int >= 1, got {d!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if sep < 0 or spread < 0 or noise < 0:
            raise ValueError("sep, spread and noise must be >= 0")
        g = make_generator(seed)
        u = torch.randn(d, generator=g, dtype=dtype)
        self.direction = u / u.norm()
        self.mu = sep * self.direction
        self.a = self.mu + spread * torch.randn(n, d, generator=g, dtype=dtype) / math.sqrt(d)
        c = noise * torch.randn(n, d, generator=g, dtype=dtype)
        self.c = c - c.mean(0) if n > 1 else torch.zeros_like(c)
        self.d, self.n = d, n
        self.sep, self.spread, self.noise = sep, spread, noise
        self._cache: dict = {}

    def _data(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``a`` and ``c`` in x's dtype and device (cached: the samplers call this every step)."""
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = (self.a.to(x), self.c.to(x))
        return self._cache[key]

    # full-sum energy and gradient (the linear terms cancel exactly and are left out)
    def energy(self, x: Tensor) -> Tensor:
        a, _ = self._data(x)
        return 0.5 * x.pow(2).sum(-1) - log_cosh(x @ a.T).mean(-1)

    def grad(self, x: Tensor) -> Tensor:
        a, _ = self._data(x)
        return x - torch.tanh(x @ a.T) @ a / self.n

    # minibatch estimates: idx [n_chains, b] (one minibatch per chain) or [b] (shared by all chains). The per-chain
    # weights W [n_chains, n] (W[k, i] = multiplicity of i in chain k's minibatch / b) turn the minibatch means into
    # two dense matrix products, faster than gathering a[idx] when n is moderate.
    def _weights(self, x: Tensor, idx: Tensor) -> Tensor:
        if idx.dim() == 1:
            idx = idx[None, :].expand(x.shape[0], -1)
        if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
            raise ValueError(f"idx must be [n_chains, b] or [b], got {tuple(idx.shape)} for {x.shape[0]} chains")
        w = torch.zeros(x.shape[0], self.n, dtype=x.dtype, device=x.device)
        return w.scatter_add_(1, idx, torch.full(idx.shape, 1.0 / idx.shape[1], dtype=x.dtype, device=x.device))

    def energy_batch(self, x: Tensor, idx: Tensor) -> Tensor:
        a, c = self._data(x)
        w = self._weights(x, idx)
        return 0.5 * x.pow(2).sum(-1) - (w * log_cosh(x @ a.T)).sum(-1) + (x * (w @ c)).sum(-1)

    def grad_batch(self, x: Tensor, idx: Tensor) -> Tensor:
        a, c = self._data(x)
        w = self._weights(x, idx)
        return x + w @ c - (w * torch.tanh(x @ a.T)) @ a

    def sample(self, m: int, generator=None) -> Tensor:
        """``m`` exact draws (rejection sampling; see the class text)."""
        g = make_generator(generator)
        logw = 0.5 * self.a.pow(2).sum(-1)
        w = torch.softmax(logw, 0)
        out, have = [], 0
        while have < m:
            k = max(2 * (m - have), 256)
            i = torch.multinomial(w, k, replacement=True, generator=g)
            sign = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).to(self.a.dtype)
            x = sign[:, None] * self.a[i] + torch.randn(k, self.d, generator=g, dtype=self.a.dtype)
            lc = log_cosh(x @ self.a.T)
            log_acc = lc.mean(-1) - (torch.logsumexp(lc, -1) - math.log(self.n))
            keep = torch.log(torch.rand(k, generator=g, dtype=self.a.dtype)) < log_acc
            out.append(x[keep])
            have += int(keep.sum())
        return torch.cat(out)[:m]

    def smoothness(self) -> float:
        """The Lipschitz constant of every ∇f_i (and of ∇f): the Hessian of f_i is ``I - sech²(a_i·x) a_i a_iᵀ``, whose
        eigenvalues lie in ``[1 - |a_i|², 1]``, so ``L = max(1, max_i |a_i|² - 1)``."""
        return max(1.0, float(self.a.pow(2).sum(-1).max()) - 1.0)
