"""Question-wise reward-flip noise, from "The Climb Carves Wisdom Deeper Than the Summit: On the Noisy
Rewards in Learning to Reason" (Lv et al., arXiv 2505.22653; released code ``reward_manager/naive.py``).

``noisy`` wraps another registered reward (default ``math_accuracy``). For each question ONE Bernoulli(p)
draw decides whether all of its rollouts are flipped (c -> 1 - c). A rollout with no extractable final
answer (``text.extract_answer`` is None) keeps score 0 and is never flipped; a None inner score (no gold)
stays None. Under GRPO, flipping a whole all-parseable group negates its advantages exactly.

Determinism: the draw is ``sha256(seed, global_step, prompt key)`` read as a 64-bit integer over 2**64,
compared with p, so every rank (and every process a TRL group is split over) agrees without relying on
batch contiguity. The prompt key is the prompt text (conversational prompts: their JSON with sorted keys),
or the value of the column named by option ``key_column`` (e.g. a ``prompt_id`` column). The step is
``trainer_state.global_step`` (TRL passes ``trainer_state``; an object or a dict), 0 if it has none.

Evaluation (the paper flips training rewards only): no flipping when the ``trainer_state`` column is
absent or None, or when the row's ``is_eval`` column is true. TRL >= 1.x passes ``trainer_state`` during
evaluation too, so evaluation datasets must carry an ``is_eval=True`` column (or use ``flip=False``).
Options: ``inner``, ``inner_options``, ``p`` (0.0), ``seed`` (0), ``key_column`` (None), ``flip`` (True:
False disables flipping everywhere), ``eval_column`` ("is_eval"), ``extraction`` ("any").

``extraction``: which final answers count. The released code reads only ``\\boxed{}`` (its
``last_boxed_only_string``): a completion without one scores 0 and is never flipped, whatever else it
writes. ``"boxed"`` does exactly that: the inner reward sees only the last ``\\boxed{...}`` of each
completion, and a completion with none scores 0 unflipped. ``"any"`` (the library default, kept for
compatibility) accepts every answer format ``text.extract_answer`` knows (``\\boxed{}``, ``<answer>``,
``####``, "the answer is"), which changes the training reward of models that answer in another format. The
paper-faithful recipe (``recipes/noisy/``) sets ``extraction: boxed``; the synthetic-task recipe and bench
keep ``any`` because the synthetic solutions end in ``#### x``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .registry import get, register
from .text import completion_text, extract_answer, last_boxed

EXTRACTIONS = ("any", "boxed")


def prompt_key(prompt: Any) -> str:
    """Stable text key of a plain or conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def flip_draw(key: str, step: int, seed: int) -> float:
    """Uniform [0, 1) number from (key, step, seed), identical on every process and Python run."""
    digest = hashlib.sha256(f"{seed}\x1f{step}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def global_step(trainer_state: Any) -> int:
    """``trainer_state.global_step`` (object or dict), 0 when absent."""
    if trainer_state is None:
        return 0
    step = trainer_state.get("global_step") if isinstance(trainer_state, dict) else getattr(trainer_state, "global_step", None)
    return int(step) if step is not None else 0


def _row_flag(column: Any, i: int) -> bool:
    if column is None:
        return False
    if isinstance(column, (list, tuple)):
        return bool(column[i]) if i < len(column) else False
    return bool(column)  # a scalar flag for the whole batch


def is_training(columns: dict, i: int, eval_column: str = "is_eval") -> bool:
    """Row ``i`` is a training row: a ``trainer_state`` is passed and the row's eval flag is not set."""
    return columns.get("trainer_state") is not None and not _row_flag(columns.get(eval_column), i)


def boxed_only(completion: Any) -> str | None:
    """``\\boxed{X}`` for the last boxed answer of a completion, None when it has none (``extraction="boxed"``)."""
    boxed = last_boxed(completion_text(completion))
    return None if boxed is None else "\\boxed{" + boxed + "}"


@register("noisy", answers="math")
def noisy(inner: str = "math_accuracy", inner_options: dict | None = None, p: float = 0.0, seed: int = 0,
          key_column: str | None = None, flip: bool = True, eval_column: str = "is_eval", extraction: str = "any"):
    """Wrap reward ``inner`` with question-wise flips of probability ``p`` (see the module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noisy: flip probability p must be in [0, 1], got {p}")
    if inner == "noisy":
        raise ValueError("noisy: inner must be another reward, not 'noisy'")
    if extraction not in EXTRACTIONS:
        raise ValueError(f"noisy: extraction must be one of {', '.join(EXTRACTIONS)}, got {extraction!r}")
    inner_func = get(inner, **(inner_options or {}))

    def noisy_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        if extraction == "boxed":
            answers = [boxed_only(c) for c in completions]
            seen = [a if a is not None else "" for a in answers]
            scores = list(inner_func(prompts, seen, **columns))
            scores = [0.0 if a is None and s is not None else s for a, s in zip(answers, scores)]
            completions = seen
        else:
            scores = list(inner_func(prompts, completions, **columns))
        if not flip or p <= 0.0:
            return scores
        step = global_step(columns.get("trainer_state"))
        if key_column is not None and key_column not in columns:
            raise KeyError(f"noisy: key_column {key_column!r} is not a column of the batch; "
                           f"columns: {sorted(columns)}")
        keys = columns[key_column] if key_column is not None else prompts
        out: list[float | None] = []
        for i, (completion, score) in enumerate(zip(completions, scores, strict=True)):
            if score is None or not is_training(columns, i, eval_column):
                out.append(score)
            elif extract_answer(completion_text(completion)) is None:
                out.append(0.0)  # format failure: 0, never flipped
            elif flip_draw(prompt_key(keys[i]), step, seed) < p:
                out.append(1.0 - float(score))
            else:
                out.append(score)
        return out

    return noisy_reward
