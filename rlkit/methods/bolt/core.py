"""BOLT's pure pieces (arXiv 2502.03860; no code was released): the long-CoT format, the format filter, the
bootstrapping selection and the on-policy DPO pairs. No torch, no model.

- **Format** (:class:`ThoughtFormat`): internal thoughts between explicit markers, then the external solution.
  The paper's exact delimiters are in a figure and not confirmed; rlkit's default markers are
  ``<|thought_start|>`` / ``<|thought_end|>`` (an option), identical in all three stages.
- **Format filter** (:meth:`ThoughtFormat.parse`): exactly one thought block, at the start, non-empty thoughts
  and a non-empty solution after it; anything else is a format violation.
- **Bootstrapping selection** (:func:`bootstrap_select`, Stage 1): among the format-valid responses, drop every
  response whose outcome score is below the ``percentile``-th percentile (30) of the **global** score
  distribution, then keep the single highest-scoring response per query (ties: the earlier response).
- **DPO pairs** (:func:`dpo_pair`, Stage 3): per prompt, chosen = the best, rejected = the worst of the samples by
  outcome score, with format violators ranked below every valid response (the paper combines the ORM and a
  format rule without saying how: this is rlkit's rule); no pair when all samples rank equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ThoughtFormat", "bootstrap_select", "dpo_pair", "percentile"]


@dataclass(frozen=True)
class ThoughtFormat:
    """Internal thoughts between ``start`` and ``end``, then the solution."""

    start: str = "<|thought_start|>"
    end: str = "<|thought_end|>"

    def __post_init__(self) -> None:
        if not self.start or not self.end or self.start == self.end:
            raise ValueError("thought markers must be two different non-empty strings")

    def render(self, thoughts: str, solution: str) -> str:
        """The response text of ``thoughts`` and ``solution`` in this format."""
        return f"{self.start}\n{thoughts.strip()}\n{self.end}\n{solution.strip()}"

    def parse(self, text: str) -> tuple[str, str] | None:
        """``(thoughts, solution)`` when ``text`` follows the format, else None (a format violation)."""
        body = text.lstrip()
        if not body.startswith(self.start) or body.count(self.start) != 1 or body.count(self.end) != 1:
            return None
        thoughts, _, solution = body[len(self.start):].partition(self.end)
        thoughts, solution = thoughts.strip(), solution.strip()
        if not thoughts or not solution:
            return None
        return thoughts, solution


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` with linear interpolation between order statistics (numpy's
    default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bootstrap_select(queries: Sequence[str], scores: Sequence[float], valid: Sequence[bool],
                     q: float = 30.0) -> list[int]:
    """Stage 1's selection: indices of the kept responses, at most one per query, in order of first appearance
    of each query. The cut is the ``q``-th percentile of the scores of the format-valid responses (all queries
    pooled); a response below it is dropped; the highest-scoring remaining response of each query is kept."""
    if not len(queries) == len(scores) == len(valid):
        raise ValueError("bootstrap_select: give one query, score and format flag per response")
    pool = [s for s, ok in zip(scores, valid) if ok]
    if not pool:
        return []
    cut = percentile(pool, q)
    best: dict[str, int] = {}
    for i, (query, score, ok) in enumerate(zip(queries, scores, valid)):
        if not ok or score < cut:
            continue
        if query not in best or score > scores[best[query]]:
            best[query] = i
    return sorted(best.values())


def dpo_pair(scores: Sequence[float], valid: Sequence[bool]) -> tuple[int, int] | None:
    """``(chosen, rejected)`` indices among one prompt's samples: format-valid responses rank above violators,
    then by score; chosen is the first best, rejected the last worst. None when every sample ranks the same."""
    if len(scores) != len(valid) or not scores:
        raise ValueError("dpo_pair: give one score and format flag per sample (at least one)")
    keys = [(1 if ok else 0, s) for s, ok in zip(scores, valid)]
    top, bottom = max(keys), min(keys)
    if top == bottom:
        return None
    chosen = keys.index(top)
    rejected = len(keys) - 1 - keys[::-1].index(bottom)
    return chosen, rejected
