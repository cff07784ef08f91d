"""Best-of-N selection: choose one of N sampled completions per problem, and best-of-n accuracy curves.

``rlkit eval --samples N --select SPEC`` samples N completions per problem and picks one with a selector:

- ``prm:DIR`` / ``orm:DIR``: the highest solution score of the process (outcome) reward model saved at DIR
  (:class:`rlkit.process_reward.ProcessRewardModel`): each completion is split into steps with the PRM's own
  splitter (``prm.split``), scored step by step (``score_batch``) and aggregated with the PRM's aggregate
  (min by default, as ``solution_scores`` does); ties go to the first candidate; a NaN score never wins;
- ``majority``: a candidate whose extracted answer is the majority answer (answers that compare equal as
  numbers are pooled, as ``maj@k`` pools them; ties go to the answer seen first, and the first candidate with
  it is taken); with no extracted answer at all, the first candidate;
- ``first``: the first sample.

:func:`best_of_n` is the library function the benches use: given per-problem candidates (``correct``,
``extracted``, ``score``), best-of-n accuracy for each n in a list, using the first n candidates of each
problem (so one set of N samples gives the whole curve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

SELECTORS = ("prm", "orm", "majority", "first")
RULES = ("score", "majority", "first")


def parse_select(spec: str) -> tuple[str, str | None]:
    """``"prm:DIR"`` -> ``("prm", DIR)``; ``"majority"`` / ``"first"`` -> ``(name, None)``; one-line ConfigError
    otherwise."""
    from ..config import ConfigError

    kind, sep, path = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind not in SELECTORS:
        raise ConfigError(f"--select {spec!r}: use prm:DIR, orm:DIR, majority or first")
    if kind in ("prm", "orm"):
        if not sep or not path.strip():
            raise ConfigError(f"--select {kind} needs the model folder: --select {kind}:DIR")
        return kind, path.strip()
    if sep:
        raise ConfigError(f"--select {kind} takes no folder; use --select {kind}")
    return kind, None


def _score_key(value: Any) -> float:
    if value is None:
        return -math.inf
    v = float(value)
    return -math.inf if math.isnan(v) else v


def _majority_index(answers: Sequence[str | None]) -> int:
    from .math_eval import _same

    buckets: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for b in buckets:
            if _same(answers[b[0]], a):
                b.append(i)
                break
        else:
            buckets.append([i])
    if not buckets:
        return 0
    return max(buckets, key=len)[0]  # max keeps the first of equal-size buckets: ties to the answer seen first


def select_index(candidates: Sequence[dict], rule: str) -> int:
    """The index of the chosen candidate: ``score`` (the highest ``score``; ties to the first; None or NaN
    never wins over a number), ``majority`` (see the module docstring) or ``first``."""
    if not candidates:
        raise ValueError("select_index: a problem with no candidate")
    if rule == "first":
        return 0
    if rule == "majority":
        return _majority_index([c.get("extracted") for c in candidates])
    if rule == "score":
        best = 0
        for i, c in enumerate(candidates):
            if _score_key(c.get("score")) > _score_key(candidates[best].get("score")):
                best = i
        return best
    raise ValueError(f"unknown selection rule {rule!r}; use one of {', '.join(RULES)}")


def best_of_n(problems: Sequence[Sequence[dict]], ns: Sequence[int], rule: str = "score") -> dict[int, float]:
    """Best-of-n accuracy for each n in ``ns``: per problem, the candidate ``rule`` picks among the first n
    (``score``, ``majority`` or ``first``; candidates are dicts with ``correct`` and ``score`` or ``extracted``),
    and the mean of its ``correct`` flag. A problem with fewer than n candidates is a ValueError."""
    out: dict[int, float] = {}
    for n in ns:
        if int(n) < 1:
            raise ValueError(f"best_of_n: n must be at least 1, got {n}")
        hits = 0
        for cands in problems:
            if len(cands) < n:
                raise ValueError(f"best_of_n: a problem has {len(cands)} candidates, fewer than n = {n}")
            hits += bool(cands[select_index(cands[:n], rule)]["correct"])
        out[int(n)] = hits / max(1, len(problems))
    return out


def curve_ns(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples``, and ``samples`` itself."""
    ns, n = [], 1
    while n < samples:
        ns.append(n)
        n *= 2
    return ns + [samples]


@dataclass
class Selector:
    """A loaded selector of ``rlkit eval --select``: ``kind`` (prm, orm, majority, first), the scorer (a
    ``ProcessRewardModel`` for prm / orm) and where it was loaded from."""

    kind: str
    scorer: Any = None
    source: str | None = None

    @property
    def rule(self) -> str:
        return "score" if self.kind in ("prm", "orm") else self.kind

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.source}" if self.source else self.kind

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[dict]]:
        """Per problem, per candidate: ``{"steps": n, "step_scores": [...], "score": aggregated}`` (prm / orm), or
        empty dicts (majority / first, which need no scores). One ``score_batch`` call covers all candidates."""
        if self.scorer is None:
            return [[{} for _ in cands] for cands in completions]
        from ..process_reward import aggregate_scores

        prm = self.scorer
        flat_prompts = [p for p, cands in zip(prompts, completions) for _ in cands]
        flat_steps = [prm.split(c) for cands in completions for c in cands]
        rows = prm.score_batch(flat_prompts, flat_steps)
        scored = [{"steps": len(s), "step_scores": [float(v) for v in r],
                   "score": aggregate_scores(r, prm.aggregate) if r else 0.0}
                  for s, r in zip(flat_steps, rows)]
        out, k = [], 0
        for cands in completions:
            out.append(scored[k:k + len(cands)])
            k += len(cands)
        return out


def load_selector(spec: str, dtype: str = "auto") -> Selector:
    """The selector of ``--select SPEC``: a PRM / ORM folder is checked (one-line errors: not a PRM folder, or
    ``prm:`` given an ORM and the reverse) and loaded with :func:`rlkit.process_reward.load_step_scorer`."""
    import json
    from pathlib import Path

    from ..config import ConfigError
    from ..models import ModelError
    from ..process_reward import META_FILE, is_prm_dir, load_step_scorer

    kind, path = parse_select(spec)
    if path is None:
        return Selector(kind)

    if not is_prm_dir(path):
        raise ModelError(f"--select {kind}:{path}: not a PRM/ORM folder (no rlkit prm.json); pass the final/ folder "
                         "of a `method: prm` stage")
    saved_kind = json.loads((Path(path) / META_FILE).read_text()).get("kind", "prm")
    if saved_kind != kind:  # checked before the model loads
        what = "an ORM" if saved_kind == "orm" else "a PRM"
        raise ConfigError(f"--select {kind}:{path} is {what} (prm.json kind {saved_kind}); use "
                          f"--select {saved_kind}:{path}")
    return Selector(kind, load_step_scorer(path, dtype=dtype), path)
