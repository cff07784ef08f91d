"""Reasoning Pattern Reward (RPR), from "The Climb Carves Wisdom Deeper Than the Summit: On the Noisy
Rewards in Learning to Reason" (Lv et al., arXiv 2505.22653), ported from the released code
(trestad/Noisy-Rewards-in-Learning-to-Reason @ 083f72b: ``math_score.think_reward`` and the
RewardModelWorker's ``think_reward``).

Scoring, as the released code does it (the paper text says 1/40 per phrase and no cap):

    text  = completion text, lower-cased
    k     = number of distinct phrases that occur in text as substrings (each counts once)
    s     = min(1, k / divisor)          # divisor = 20 in the code (option ``divisor``)
    s    -= rep20(text)                  # (#distinct 20-word grams occurring > 1 times) / #20-grams
    s    -= text.count("user: ")         # math variant only: -1 per self-posed "user: " turn
    RPR   = max(0, s)

``rpr`` uses the 40-phrase math list (note the original typo "makes sence" and the trailing spaces);
``rpr_open`` uses the 53-phrase open-ended (HelpSteer3) list, without the ``user:`` penalty.

Choices where the spec is silent: the completion text is scored as given (in TRL the completion is the
response only, i.e. the text after "Assistant: <think>" in the paper's raw prompt); the 20-grams are
taken over the lower-cased text. Option ``require_answer`` (default False) gives 0 when no final answer
can be extracted (the paper's RPR-only run: "RPR if a \\boxed{} answer is extractable, else 0").
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .registry import register
from .text import completion_text, extract_answer

MATH_PHRASES: tuple[str, ...] = (
    "i need to", "we need to", "wait", "alternatively", "let me check", "let me see", "let's focus on",
    "we know that", "we can observe ", "we can see ", "let me try", "let's try", "let us try",
    "first, ", "firstly, ", "next, ", "finally, ", "let us first", "let's first", "let me first",
    "try again", "still not", "not working", "not correct", "does not work", "doesn't work", "makes sence",
    "since we ", "because we ", "consequently", "as a result", "thus", "therefore", "hence", "so that",
    "thereby", "if we", "given there ", "for instance ", "for example ",
)

OPEN_PHRASES: tuple[str, ...] = MATH_PHRASES + (
    "1. ", "2. ", "3. ", "4. ", "step 1 ", "step 2 ", "step 3. ", "step 4 ", "considering the", "i'll",
    "i will", "i would", "i should",
)


def rep20(text: str, n: int = 20) -> float:
    """Share of repeated word n-grams: (#distinct n-grams occurring more than once) / (#n-grams)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(1 for c in counts.values() if c > 1) / len(grams)


def rpr_score(text: str, phrases: tuple[str, ...] = MATH_PHRASES, divisor: float = 20.0,
              user_penalty: bool = True) -> float:
    """RPR of one text (see the module docstring)."""
    t = text.lower()
    k = sum(1 for p in set(phrases) if p in t)
    s = min(1.0, k / divisor)
    s -= rep20(t)
    if user_penalty:
        s -= t.count("user: ")
    return max(0.0, s)


def _make(phrases: tuple[str, ...], user_penalty: bool, divisor: float, require_answer: bool, name: str):
    if divisor <= 0:
        raise ValueError(f"{name}: divisor must be > 0, got {divisor}")

    def reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            text = completion_text(c)
            if require_answer and extract_answer(text) is None:
                out.append(0.0)
            else:
                out.append(rpr_score(text, phrases, divisor, user_penalty))
        return out

    reward.__name__ = f"{name}_reward"
    return reward


@register("rpr")
def rpr(divisor: float = 20.0, user_penalty: bool = True, require_answer: bool = False):
    """Math RPR (40 phrases). Options: ``divisor`` (20, the code; the paper says 40), ``user_penalty``
    (True: -1 per "user: "), ``require_answer`` (False; True scores 0 without an extractable answer)."""
    return _make(MATH_PHRASES, user_penalty, divisor, require_answer, "rpr")


@register("rpr_open")
def rpr_open(divisor: float = 20.0, require_answer: bool = False):
    """Open-ended RPR (53 phrases, no "user: " penalty). Options: ``divisor`` (20), ``require_answer``."""
    return _make(OPEN_PHRASES, False, divisor, require_answer, "rpr_open")
