"""BOLT's outcome score with its format rule as one reward function (``rewards: [{name: thought_solution, ...}]``),
for trainers that score completions themselves (the GRPO arm of the Table 3 comparison).

A completion that follows the thought format (:class:`~rlkit.methods.bolt.core.ThoughtFormat`) scores the
weighted sum of the inner ``rewards`` applied to its **solution part only** (the thoughts are never judged, as in
the paper's ORM); a format violator scores ``violation_score`` (default -1: below every 0/1 verifiable score, so
violators rank lowest as in the DPO pairs; for an unbounded reward model pick a value below its range). The
``bolt_bootstrap`` / ``bolt_sample`` stages apply the same rule with the recipe's rewards directly.
"""

from __future__ import annotations

import math
from typing import Any

from .core import ThoughtFormat

__all__ = ["ThoughtSolutionReward", "solution_texts"]


def solution_texts(fmt: ThoughtFormat, completions: list) -> list[tuple[str, str] | None]:
    """``(thoughts, solution)`` of each completion (plain or chat), None for a format violator."""
    from rlkit_rewards.text import completion_text

    return [fmt.parse(completion_text(c)) for c in completions]


class ThoughtSolutionReward:
    """The inner rewards on the solution after the thought block; ``violation_score`` for a format violator."""

    in_process = True
    example = "{rewards: [{name: math_accuracy}]}"

    def __init__(self, rewards: list, thought_start: str = ThoughtFormat.start, thought_end: str = ThoughtFormat.end,
                 violation_score: float = -1.0):
        self.check_options(rewards, thought_start, thought_end, violation_score)
        from ...recipe import RewardSpec, build
        from ...rewarding import build_reward_funcs

        specs = [build(RewardSpec, r, f"thought_solution.rewards[{i}]") for i, r in enumerate(rewards)]
        self.format = ThoughtFormat(thought_start, thought_end)
        self.funcs, self.weights = build_reward_funcs(specs), [s.weight for s in specs]
        self.violation_score = float(violation_score)
        self.__name__ = "thought_solution"

    @staticmethod
    def check_options(rewards: list | None = None, thought_start: str = ThoughtFormat.start,
                      thought_end: str = ThoughtFormat.end, violation_score: float = -1.0) -> None:
        from ...recipe import RewardSpec, build
        from ...rewarding import check_rewards

        if not isinstance(rewards, list) or not rewards:
            raise ValueError("reward thought_solution: option rewards must list the outcome rewards, e.g. "
                             "[{name: math_accuracy}]")
        specs = [build(RewardSpec, r, f"thought_solution.rewards[{i}]") for i, r in enumerate(rewards)]
        if any(s.name == "thought_solution" for s in specs):
            raise ValueError("reward thought_solution: its rewards cannot contain thought_solution")
        check_rewards(specs, "thought_solution.")
        ThoughtFormat(thought_start, thought_end)
        if not math.isfinite(float(violation_score)):
            raise ValueError(f"reward thought_solution: violation_score must be finite, got {violation_score}")

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        parts = solution_texts(self.format, completions)
        ok = [i for i, p in enumerate(parts) if p is not None]
        out: list[float | None] = [self.violation_score] * len(completions)
        if not ok:
            return out
        cols = {k: [v[i] for i in ok] if isinstance(v, list) and len(v) == len(parts) else v
                for k, v in columns.items() if k != "completion_ids"}  # the thoughts' ids are not the solution's
        sols = [parts[i][1] for i in ok]
        values = [list(f(prompts=[prompts[i] for i in ok], completions=sols, **cols)) for f in self.funcs]
        for n, i in enumerate(ok):
            vals = [w * v[n] for w, v in zip(self.weights, values) if v[n] is not None]
            out[i] = float(sum(vals)) if vals else None
        return out
