"""FIRST's "trustworthy maximisation": temperature scaling of the teacher's top-k distribution.

The stored teacher log-probs ``l_1..l_k`` (full-softmax log-probabilities of its top-k tokens) are turned into a
distribution over the k buckets, or k + 1 with the "other" bucket of mass ``1 - sum_i exp(l_i)``, and scaled:

    p~_b(tau) = exp(l_b / tau) / sum_c exp(l_c / tau)

over the buckets (``l_other = log(1 - sum exp(l_i))``). Over the top-k this is ``softmax(z / tau)`` of the teacher's
logits restricted to its top-k, exactly. The other bucket is scaled as if it were one token whose log-probability
is the bucket's (true temperature scaling of the tail would need the logits the data does not keep): this is our
choice, the paper's handling is not public. ``tau -> inf`` gives the uniform distribution over the buckets,
``tau = 1`` the stored distribution.

The temperature is chosen on held-out response tokens (:func:`choose_tau`) from a log-spaced grid: ``ece`` (default)
minimises the teacher's token-level expected calibration error (confidence = calibrated top-1 probability,
correct = the top-1 id is the reference's next token; 10 equal-width bins), ``nll`` the negative log-likelihood of
the reference's next token's bucket. The paper's criterion is not public (spec §5.1: UNCONFIRMED).
"""

from __future__ import annotations

import math

import torch

__all__ = ["TAU_GRID", "bucket_logprobs", "calibrated_logprobs", "choose_tau", "ece", "parse_tau"]

TAU_GRID: tuple[float, ...] = tuple(sorted({round(math.exp(math.log(0.1) + i * (math.log(10.0) - math.log(0.1)) / 40), 6)
                                            for i in range(41)} | {1.0}))
"""41 log-spaced temperatures from 0.1 to 10 (1.0 among them)."""


def parse_tau(tau: str | float | int | None) -> float | None:
    """``"auto"`` (or None) -> None; a positive number (or its text) -> float; anything else: ValueError."""
    if tau is None or (isinstance(tau, str) and tau.strip().lower() == "auto"):
        return None
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be 'auto' or a positive number, got {tau!r}") from None
    if not value > 0:
        raise ValueError(f"tau must be 'auto' or a positive number, got {tau!r}")
    return value


def bucket_logprobs(logprobs: torch.Tensor, use_other: bool) -> torch.Tensor:
    """``[..., k]`` top-k log-probs -> ``[..., k (+1)]`` bucket log-probs (the other bucket appended last, its mass
    floored at 1e-12 so that a top-k holding all the mass stays finite)."""
    logprobs = logprobs.float()
    if not use_other:
        return logprobs
    rest = (-torch.expm1(torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=0.0))).clamp(min=1e-12)
    return torch.cat([logprobs, rest.log()], dim=-1)


def calibrated_logprobs(logprobs: torch.Tensor, tau: float, use_other: bool) -> torch.Tensor:
    """Log of the temperature-scaled bucket distribution ``p~(tau)`` (module docstring), ``[..., k (+1)]``."""
    x = bucket_logprobs(logprobs, use_other)
    if math.isinf(tau):
        return torch.full_like(x, -math.log(x.shape[-1]))
    return torch.log_softmax(x / tau, dim=-1)


def ece(confidences, correct, bins: int = 10) -> float:
    """Expected calibration error with equal-width bins (:func:`rlkit.eval.calibration.ece`)."""
    from ...eval.calibration import ece as _ece

    return float(_ece(confidences, correct, bins=bins))


def _criterion(logprobs: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, tau: float, use_other: bool,
               criterion: str, bins: int) -> float:
    cal = calibrated_logprobs(logprobs, tau, use_other)
    if criterion == "ece":
        conf = cal[:, 0].exp()  # top-1 of the top-k (stored sorted; scaling keeps the order)
        correct = ids[:, 0].long() == target
        return ece(conf.tolist(), correct.tolist(), bins=bins)
    hit = ids.long() == target[:, None]
    found = hit.any(-1)
    slot = hit.float().argmax(-1)
    if use_other:
        slot = torch.where(found, slot, torch.full_like(slot, ids.shape[-1]))
        return float(-cal.gather(-1, slot[:, None]).mean())
    if not found.any():
        return math.inf
    return float(-cal[found].gather(-1, slot[found][:, None]).mean())


def choose_tau(logprobs: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, *, use_other: bool,
               criterion: str = "ece", grid: tuple[float, ...] = TAU_GRID, bins: int = 10) -> tuple[float, list]:
    """The grid temperature minimising ``criterion`` (``ece`` or ``nll``) of the teacher on held-out tokens, and the
    table ``[[tau, value], ...]``. ``logprobs`` / ``ids``: ``[N, k]`` stored top-k; ``target``: ``[N]`` the reference
    next tokens. Ties go to the temperature closest to 1 (log scale). For ``nll`` without the other bucket, only the
    tokens whose reference is in the top-k count."""
    if criterion not in ("ece", "nll"):
        raise ValueError(f"criterion must be 'ece' or 'nll', got {criterion!r}")
    if logprobs.shape[0] == 0:
        raise ValueError("no held-out token to choose tau on")
    table = [[float(t), _criterion(logprobs, ids, target.long(), float(t), use_other, criterion, bins)] for t in grid]
    best = min(table, key=lambda row: (round(row[1], 12), abs(math.log(row[0]))))
    return best[0], table
