"""Math answer-correctness reward.

Verdict order: (1) both sides parse as plain numbers -> compare with a relative tolerance (fast path,
no sympy); (2) otherwise math-verify with the gold answer first (``verify`` is not symmetric).
math-verify's own timeouts use SIGALRM and only work on the main thread; off the main thread they
are disabled here, so callers that need a hard deadline must run rewards through a process engine.
"""

from __future__ import annotations

import threading
from typing import Any

from .registry import register
from .text import completion_text, extract_answer, parse_number


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6) -> bool:
    """Equal within ``rel_tol`` relative to the larger magnitude (absolute below 1)."""
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def verify_answer(gold: str, predicted: str, rel_tol: float = 1e-6) -> bool:
    """True when ``predicted`` is mathematically equal to ``gold``."""
    g, p = parse_number(gold), parse_number(predicted)
    if g is not None and p is not None:
        return numbers_equal(g, p, rel_tol)
    from math_verify import parse, verify  # imported lazily: sympy is slow to import

    on_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if on_main else None
    gold_parsed = parse(f"${gold}$" if "$" not in gold and "\\boxed" not in gold else gold, parsing_timeout=timeout)
    if not gold_parsed:
        return False
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def gold_of(value: Any) -> str | None:
    """Gold answer from a dataset cell: GSM8K solutions ("... #### 42") reduce to their final answer."""
    if value is None:
        return None
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text or None


@register("math_accuracy")
def math_accuracy(gold_column: str = "answer", rel_tol: float = 1e-6):
    """1.0 if the completion's final answer equals the gold answer, 0.0 if not or if no answer is found,
    None for rows with no gold answer. Options: ``gold_column`` (default ``answer``), ``rel_tol``."""

    def math_accuracy_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        if gold_column not in columns:
            raise KeyError(
                f"math_accuracy needs a {gold_column!r} column with the gold answers; the batch has columns "
                f"{sorted(k for k in columns if not k.startswith('_'))}. Set the reward option gold_column."
            )
        golds = columns[gold_column]
        scores: list[float | None] = []
        for completion, gold_cell in zip(completions, golds, strict=True):
            gold = gold_of(gold_cell)
            if gold is None:
                scores.append(None)
                continue
            predicted = extract_answer(completion_text(completion))
            scores.append(1.0 if predicted is not None and verify_answer(gold, predicted, rel_tol) else 0.0)
        return scores

    return math_accuracy_reward
