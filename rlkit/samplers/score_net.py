"""A tiny learned score for the diffusion-inference examples: an MLP with a time embedding trained by denoising score
matching under the OU forward process of :mod:`rlkit.samplers.diffusion` (used by ``bench/samplers.py`` to compare
DDPM, DDIM, RTK-MALA and RTK-ULD on a learned score; ``docs/methods/rtk.md``).

Training (the standard noise-prediction form of denoising score matching, Ho et al. 2020 / Song et al. 2021): draw
``x_0`` from the data, ``t`` log-uniform on ``[t_min, T]`` (every decade of noise levels gets the same share, which
matters for the last, low-noise steps), ``ξ ~ N(0, I)``, ``x_t = e^{-t} x_0 + sigma_t ξ``, and minimise
``|eps_θ(x_t, t) - ξ|^2``. Its minimiser is ``-sigma_t ∇log p_t``, so the score estimate is
``s_θ(x, t) = -eps_θ(x, t) / sigma_t``. It is defined for ``t >= t_min`` only (a sampler stops at ``t_end = t_min``;
smaller times are clamped to ``t_min``).

Network: input ``x`` and the time features ``[log t / 4, sin(k π t / T), cos(k π t / T)]`` for ``k = 1..n_freq``;
``depth`` hidden layers of width ``hidden`` with SiLU; Adam (betas 0.9 / 0.999) with a cosine learning-rate decay
from ``lr`` to ``0.02 lr``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from rlkit.samplers.diffusion import ou_var

Tensor = torch.Tensor

__all__ = ["ScoreNet", "LearnedScore", "train_score_net"]


class ScoreNet(nn.Module):
    """``eps_θ(x [n, d], t [n]) -> [n, d]``: the noise predictor (module text)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, n_freq: int = 8, T: float = 5.0):
        super().__init__()
        self.dim, self.T = dim, float(T)
        self.register_buffer("freqs", torch.arange(1, n_freq + 1, dtype=torch.float32) * math.pi / self.T)
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        arg = t[:, None] * self.freqs
        feats = torch.cat([x, 0.25 * torch.log(t)[:, None], torch.sin(arg), torch.cos(arg)], dim=1)
        return self.mlp(feats)


class LearnedScore:
    """``score_fn(x, t) = -eps_θ(x, t) / sigma_t`` from a trained :class:`ScoreNet` (no gradient; ``t`` is clamped to
    ``[t_min, T]``; the output has ``x``'s dtype). ``losses``: the training loss every 100 steps; ``train_seconds``."""

    def __init__(self, net: ScoreNet, t_min: float, T: float, losses: list[float], train_seconds: float, steps: int):
        self.net, self.t_min, self.T = net, float(t_min), float(T)
        self.losses, self.train_seconds, self.steps = losses, train_seconds, steps

    def __call__(self, x: Tensor, t: float) -> Tensor:
        t = min(max(float(t), self.t_min), self.T)
        p = next(self.net.parameters())
        with torch.no_grad():
            tt = torch.full((x.shape[0],), t, dtype=p.dtype, device=p.device)
            eps = self.net(x.to(p.dtype), tt)
        return (-eps / math.sqrt(ou_var(t))).to(x.dtype)


def _adam_step(params: list[Tensor], grads: tuple[Tensor, ...], moments: list[tuple[Tensor, Tensor]], lr: float,
               step: int, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam update in place (written out here: ``torch.optim`` imports ``torch._dynamo`` on first use, which costs
    several seconds for a network this small)."""
    with torch.no_grad():
        for q, g, (m, v) in zip(params, grads, moments):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2 ** step)).sqrt_().add_(eps)
            q.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))


def train_score_net(samples: Tensor, *, T: float = 5.0, t_min: float = 1e-3, hidden: int = 128, depth: int = 3,
                    n_freq: int = 8, steps: int = 4000, batch_size: int = 512, lr: float = 2e-3, seed: int = 0,
                    time_limit_s: float | None = None) -> LearnedScore:
    """Train a :class:`ScoreNet` on ``samples [N, d]`` by denoising score matching (module text) and return the score.

    ``steps`` Adam steps on fresh minibatches of ``batch_size`` (data rows drawn with replacement, fresh ``t`` and
    noise); ``time_limit_s`` stops earlier when the wall clock runs out (the learning-rate decay follows ``steps``).
    ``seed`` fixes the initialisation and every draw, so the same call gives the same network."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.shape[0] < 2:
        raise ValueError(f"samples must be a tensor [N >= 2, d], got "
                         f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
    if not 0 < t_min < T:
        raise ValueError(f"need 0 < t_min < T, got t_min={t_min}, T={T}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ScoreNet(samples.shape[1], hidden=hidden, depth=depth, n_freq=n_freq, T=T)
    data = samples.to(torch.float32)
    params = list(net.parameters())
    moments = [(torch.zeros_like(q), torch.zeros_like(q)) for q in params]
    log_lo, log_hi = math.log(t_min), math.log(T)
    losses: list[float] = []
    running = 0.0
    start = time.perf_counter()
    done = 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        x0 = data[idx]
        t = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch_size, generator=gen))
        xi = torch.randn(x0.shape, generator=gen)
        xt = torch.exp(-t)[:, None] * x0 + torch.sqrt(-torch.expm1(-2 * t))[:, None] * xi
        loss = (net(xt, t) - xi).pow(2).sum(1).mean()
        grads = torch.autograd.grad(loss, params)
        rate = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps)))
        _adam_step(params, grads, moments, rate, step)
        running += loss.detach().item()
        done = step
        if step % 100 == 0:
            losses.append(running / 100)
            running = 0.0
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
    net.eval()
    return LearnedScore(net, t_min, T, losses, time.perf_counter() - start, done)
