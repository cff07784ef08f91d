"""Sample-quality metrics: histogram total variation (1-D / 2-D), sliced Wasserstein, MMD, mean and covariance errors.

Every function compares samples ``x [N, d]`` (what a sampler produced) with reference samples ``y [M, d]`` (exact
draws from the target) or with exact moments. All are plug-in estimates, so they carry a sampling-noise floor that
shrinks with N and M: compare samplers at the same N, and read differences below the floor (measure it by comparing
two independent exact sample sets, :func:`noise_floor`) as ties."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlkit.samplers.langevin import make_generator

Tensor = torch.Tensor

__all__ = ["tv_histogram", "sliced_wasserstein", "mmd_rbf", "mean_error", "cov_error", "noise_floor"]


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor")
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [N, d] with N > 0, got {tuple(x.shape)}")
    return x.double()


def tv_histogram(x: Tensor, y: Tensor, bins: int = 50, range_: tuple | None = None, tail: float = 0.001) -> float:
    """Total variation ``½ Σ |p_j - q_j|`` between the histograms of ``x`` and ``y`` on one grid, for 1-D (``[N]`` or
    ``[N, 1]``) or 2-D (``[N, 2]``) samples (``bins`` per axis).

    The grid spans ``range_`` per axis (a pair ``(lo, hi)``, the same for each axis) or, by default, the ``tail`` and
    ``1 - tail`` quantiles of ``y`` widened by 10%; points outside are counted in the edge bins, so both histograms
    sum to one. This is the TV of the discretized laws: a lower bound on the true TV that approaches it as bins get
    finer, plus a noise floor of order ``sqrt(bins^d / N)``."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    d = y.shape[1]
    if x.shape[1] != d or d not in (1, 2):
        raise ValueError(f"tv_histogram takes 1-D or 2-D samples of equal dimension, got {x.shape[1]} and {d}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    codes = []
    for s in (x, y):
        code = torch.zeros(s.shape[0], dtype=torch.long)
        for j in range(d):
            if range_ is not None:
                lo, hi = float(range_[0]), float(range_[1])
            else:
                q = torch.quantile(y[:, j], torch.tensor([tail, 1 - tail], dtype=y.dtype))
                lo, hi = float(q[0]), float(q[1])
                pad = 0.1 * (hi - lo) + 1e-12
                lo, hi = lo - pad, hi + pad
            if not hi > lo:
                raise ValueError(f"empty histogram range ({lo}, {hi})")
            b = torch.floor((s[:, j] - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)
            code = code * bins + b
        codes.append(code)
    p = torch.bincount(codes[0], minlength=bins ** d).double() / x.shape[0]
    q = torch.bincount(codes[1], minlength=bins ** d).double() / y.shape[0]
    return 0.5 * float((p - q).abs().sum())


def _quantiles(s: Tensor, levels: Tensor) -> Tensor:
    """Empirical quantile functions of the columns of ``s`` [N, k] at ``levels`` (the inverse of the empirical CDF:
    the sorted value whose rank covers the level)."""
    srt, _ = torch.sort(s, dim=0)
    n = srt.shape[0]
    i = torch.clamp(torch.ceil(levels * n).long() - 1, 0, n - 1)
    return srt[i]


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 200, p: int = 2, generator=None,
                       directions: Tensor | None = None) -> float:
    """Sliced Wasserstein-p: ``(E_θ W_p(θᵀx, θᵀy)^p)^{1/p}`` over ``n_proj`` directions uniform on the sphere (or the
    given unit ``directions [k, d]``); each 1-D W_p is computed exactly between the two empirical laws by matching
    quantiles on the merged grid of levels (so N and M may differ)."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    d = x.shape[1]
    if directions is None:
        th = torch.randn(n_proj, d, generator=make_generator(generator), dtype=torch.float64)
    else:
        th = directions.double()
    th = th / th.norm(dim=1, keepdim=True)
    px, py = x @ th.T, y @ th.T                       # [N, k], [M, k]
    n, m = px.shape[0], py.shape[0]
    # the merged breakpoints of both empirical CDFs; on each piece both quantile functions are constant
    levels = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                     torch.arange(1, m + 1, dtype=torch.float64) / m]))
    widths = torch.diff(levels, prepend=torch.zeros(1, dtype=torch.float64))
    mids = levels - widths / 2
    diff = (_quantiles(px, mids) - _quantiles(py, mids)).abs().pow(p)   # [L, k]
    per_dir = (widths[:, None] * diff).sum(0)
    return float(per_dir.mean() ** (1.0 / p))


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None, max_points: int = 2000, generator=None) -> float:
    """Maximum mean discrepancy with the RBF kernel ``exp(-|u - v|² / (2 σ²))``: the square root of the biased
    (V-statistic) estimate of MMD². ``σ`` = ``bandwidth`` or the median pairwise distance of the pooled samples (the
    median heuristic). At most ``max_points`` points of each set are used (a random subset; cost is quadratic)."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    g = make_generator(generator)
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_points]]
    if y.shape[0] > max_points:
        y = y[torch.randperm(y.shape[0], generator=g)[:max_points]]
    dxx, dyy, dxy = _sqdist(x, x), _sqdist(y, y), _sqdist(x, y)
    if bandwidth is None:
        pooled = torch.cat([dxx.flatten(), dyy.flatten(), dxy.flatten(), dxy.flatten()])
        sigma2 = float(pooled[pooled > 0].median()) if bool((pooled > 0).any()) else 1.0
    else:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        sigma2 = float(bandwidth) ** 2
    k = lambda dd: torch.exp(-dd / (2 * sigma2)).mean()  # noqa: E731
    return math.sqrt(max(float(k(dxx) + k(dyy) - 2 * k(dxy)), 0.0))


def mean_error(x: Tensor, mean: Tensor) -> float:
    """``|mean(x) - mean|`` (Euclidean norm)."""
    x = _as_2d(x, "x")
    return float((x.mean(0) - torch.as_tensor(mean, dtype=x.dtype).reshape(-1)).norm())


def cov_error(x: Tensor, cov: Tensor, relative: bool = True) -> float:
    """Frobenius norm of ``cov(x) - cov`` (divided by ``|cov|_F`` when ``relative``)."""
    x = _as_2d(x, "x")
    if x.shape[0] < 2:
        raise ValueError("cov_error needs at least 2 samples")
    c = torch.as_tensor(cov, dtype=x.dtype)
    if c.dim() == 0:
        c = c * torch.eye(x.shape[1], dtype=x.dtype)
    err = float((torch.cov(x.T).reshape(c.shape) - c).norm())
    return err / float(c.norm()) if relative else err


def noise_floor(metric: Callable[[Tensor, Tensor], float], sampler: Callable[[int, int], Tensor], n: int, m: int,
                seeds: tuple[int, ...] = (1, 2, 3)) -> float:
    """The mean of ``metric(exact_n, exact_m)`` over ``seeds``, where ``sampler(count, seed)`` draws exact samples:
    the value a perfect sampler with ``n`` draws would score against ``m`` reference draws."""
    vals = [metric(sampler(n, 1000 + s), sampler(m, 2000 + s)) for s in seeds]
    return sum(vals) / len(vals)
