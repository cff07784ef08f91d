"""Reward plumbing shared by every method: recipe-time checks, the reward functions and weights, and the engine.

Rewards come from :mod:`rlkit_rewards` by name. A recipe's ``rewards`` list is checked when the recipe is
validated, before any model loads (:func:`check_rewards`: names, option names and values, weights), so a typo
fails in the first second. Trainers (GRPO, StepHint) and non-trainer stages (``sample``, labelling) build
the same functions (:func:`build_reward_funcs`) and score them in the same hang-proof engine
(:func:`make_reward_engine`; :func:`score` runs it, or scores in-process when the engine is disabled).

The engine's status classifier follows the rewards: when the first reward scores a final math answer
(``rlkit_rewards.answer_format(name) == "math"``), a completion with no extractable answer is
``unparseable``; for any other first reward (format, pattern or model rewards) there is no parser and a zero
score is just ``wrong``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

from .config import RecipeError

__all__ = ["MODEL_REWARDS", "check_rewards", "build_reward_funcs", "reward_weights_of", "answer_check_for",
           "make_reward_engine", "score", "score_mixed", "ScoredBatch"]

MODEL_REWARDS = {
    "prm": ("rlkit.process_reward", "PRMReward"),
    "reward_model": ("rlkit.outcome_rewards", "RewardModelReward"),
    "callable": ("rlkit.outcome_rewards", "CallableReward"),
    "thought_solution": ("rlkit.methods.bolt.reward", "ThoughtSolutionReward"),
}
"""Model-based rewards (they load a model or user code, so they live in rlkit, not in the light ``rlkit_rewards``):
name -> (module, class). They run in the trainer's process (``in_process``), never in the engine's workers. A
class may declare ``check_options(**options)`` (recipe-time checks) and ``example`` (its options, for messages)."""


def _check_model_reward(name: str, options: dict) -> None:
    import importlib
    import inspect

    module, cls = MODEL_REWARDS[name]
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"reward {name!r} has no option {unknown[0]!r} (options: {', '.join(params)})")
    klass = getattr(importlib.import_module(module), cls)
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        example = getattr(klass, "example", "{path: <prm run>/final}")
        raise ValueError(f"reward {name!r} needs option {missing[0]!r} (e.g. options: {example})")
    if hasattr(klass, "check_options"):
        klass.check_options(**options)
    if name == "prm" and options.get("aggregate") not in (None, "min", "last", "mean", "product"):
        raise ValueError(f"reward prm: aggregate must be min, last, mean or product, got {options['aggregate']!r}")


def is_in_process(func: Any) -> bool:
    """Whether a reward function must run in this process (a model-based reward), not in the engine."""
    return bool(getattr(func, "in_process", False))


def check_rewards(specs: Sequence[Any], prefix: str = "", required: bool = False, method: str = "") -> None:
    """Validate reward specs (``name``, ``weight``, ``options``) without loading any model; one-line errors."""
    import rlkit_rewards

    if required and not specs:
        raise RecipeError(f"{prefix}rewards: {method or 'this method'} needs at least one reward "
                          "(e.g. rewards: [{name: math_accuracy}])")
    for i, r in enumerate(specs):
        if not math.isfinite(r.weight):
            raise RecipeError(f"{prefix}rewards[{i}].weight: must be a finite number, got {r.weight}")
        try:
            if r.name in MODEL_REWARDS:
                _check_model_reward(r.name, dict(r.options))
            else:
                rlkit_rewards.check(r.name, **r.options)
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0]
            field = "name" if msg.startswith("unknown reward") else "options"
            raise RecipeError(f"{prefix}rewards[{i}].{field}: {msg}") from None


def build_reward_funcs(specs: Sequence[Any]) -> list:
    """The reward functions of ``specs``, in order."""
    import rlkit_rewards

    funcs = []
    for i, r in enumerate(specs):
        try:
            if r.name in MODEL_REWARDS:
                import importlib

                module, cls = MODEL_REWARDS[r.name]
                funcs.append(getattr(importlib.import_module(module), cls)(**r.options))
            else:
                funcs.append(rlkit_rewards.get(r.name, **r.options))
        except (ValueError, TypeError) as e:
            raise RecipeError(f"rewards[{i}]: {e}") from None
    return funcs


def reward_weights_of(run: Any) -> dict:
    """``{"reward_weights": [...]}`` when the recipe weights its rewards and the trainer section does not."""
    if "reward_weights" not in run.trainer and any(r.weight != 1.0 for r in run.rewards):
        return {"reward_weights": [r.weight for r in run.rewards]}
    return {}


def answer_check_for(specs: Sequence[Any]) -> str | None:
    """The engine's answer check for these rewards: ``"math"`` when the first scores a math answer, else None."""
    import rlkit_rewards

    if not specs or specs[0].name in MODEL_REWARDS:
        return None
    return rlkit_rewards.answer_format(specs[0].name)


def make_reward_engine(engine_spec: Any, reward_specs: Sequence[Any] = ()) -> Any:
    """A ``RewardEngine`` for a run's ``reward_engine`` section (None when it is disabled)."""
    if engine_spec is None or not engine_spec.enabled:
        return None
    from rlkit_rewards.engine import RewardEngine

    return RewardEngine(num_workers=engine_spec.resolved_workers(), item_timeout=engine_spec.item_timeout,
                        batch_timeout=engine_spec.batch_timeout, answer_check=answer_check_for(reward_specs)
                        if reward_specs else "math")


class ScoredBatch:
    """Scores of one batch: ``per_func[i][j]`` (NaN for not applicable), the weighted ``total[i]`` (None when
    every function was not applicable) and ``status[i]``."""

    def __init__(self, per_func: list[list[float]], weights: Sequence[float], status: list[str]):
        self.per_func = per_func
        self.status = status
        self.total: list[float | None] = []
        for row in per_func:
            vals = [w * v for w, v in zip(weights, row) if not math.isnan(v)]
            self.total.append(sum(vals) if vals else None)

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.status))


def score(engine: Any, funcs: list, weights: Sequence[float], prompts: list, completions: list,
          completion_ids: list | None = None, columns: dict | None = None, kwargs: dict | None = None,
          answer_check: Any = "math") -> ScoredBatch:
    """Score a batch with ``engine`` (a ``RewardEngine``), or in this process when ``engine`` is None (no
    deadline; statuses from the first function and ``answer_check``, as the engine computes them)."""
    columns = columns or {}
    if engine is not None:
        per_func, status = score_mixed(engine, funcs, prompts, completions, completion_ids, columns, kwargs,
                                       answer_check)
        return ScoredBatch(per_func, weights, status)
    from rlkit_rewards.engine import _has_answer

    per_func, status = [], []
    values = [list(f(prompts=prompts, completions=completions, **({"completion_ids": completion_ids}
                                                                    if completion_ids is not None else {}),
                   **columns, **(kwargs or {}))) for f in funcs]
    for i in range(len(completions)):
        row = [math.nan if v[i] is None else float(v[i]) for v in values]
        per_func.append(row)
        if row and row[0] > 0:
            status.append("ok")
        else:
            status.append("wrong" if _has_answer(answer_check, completions[i]) else "unparseable")
    return ScoredBatch(per_func, weights, status)


def score_mixed(engine: Any, funcs: list, prompts: list, completions: list, completion_ids: list | None,
                columns: dict, kwargs: dict | None = None, answer_check: Any = "math") -> tuple[list[list[float]], list[str]]:
    """``engine.score`` for the light reward functions and this process for the model-based ones
    (:func:`is_in_process`), merged back in the functions' order: ``(per_func, status)``. The status comes from
    the engine when it scored any function, else from the first function's score and ``answer_check``."""
    local = [i for i, f in enumerate(funcs) if is_in_process(f)]
    if not local:
        return engine.score(funcs, prompts, completions, completion_ids, columns, kwargs=kwargs)
    remote = [i for i in range(len(funcs)) if i not in local]
    per_func = [[math.nan] * len(funcs) for _ in completions]
    status = None
    if remote:
        part, status = engine.score([funcs[i] for i in remote], prompts, completions, completion_ids, columns,
                                    kwargs=kwargs)
        for row, vals in zip(per_func, part):
            for i, v in zip(remote, vals):
                row[i] = v
    extra = {"completion_ids": completion_ids} if completion_ids is not None else {}
    for i in local:
        values = funcs[i](prompts=prompts, completions=completions, **extra, **columns, **(kwargs or {}))
        for row, v in zip(per_func, values):
            row[i] = math.nan if v is None else float(v)
    if status is None:
        from rlkit_rewards.engine import _has_answer

        status = ["ok" if row[0] > 0 else ("wrong" if _has_answer(answer_check, c) else "unparseable")
                  for row, c in zip(per_func, completions)]
    return per_func, status
