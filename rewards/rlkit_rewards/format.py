"""Format rewards: ``think_answer_format`` (R1-style ``<think>..</think><answer>..</answer>``) and
``boxed_format`` (a ``\\boxed{}`` answer is present).

Choices: surrounding whitespace is allowed around and between the blocks, but no other text outside
them (anything before ``<think>`` or after ``</answer>`` scores 0). Any repeated tag (two ``<think>`` or
two ``<answer>`` blocks, a stray closing tag) scores 0: several answer blocks let a policy hedge between
answers, a known reward hack. Empty blocks score 0.
"""

from __future__ import annotations

import re
from typing import Any

from .registry import register
from .text import completion_text, last_boxed

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FULL = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def has_think_answer_format(text: str, prefilled_think: bool = False) -> bool:
    """True when ``text`` is exactly one non-empty think block followed by one non-empty answer block.
    With ``prefilled_think`` the prompt already ends with ``<think>``, so the completion starts inside
    the think block (a leading ``<think>`` in the completion is then a second block and fails)."""
    if prefilled_think:
        text = "<think>" + text
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    m = _FULL.fullmatch(text)
    return bool(m and m.group(1).strip() and m.group(2).strip())


@register("think_answer_format")
def think_answer_format(prefilled_think: bool = False):
    """1.0 for exactly one ``<think>...</think>`` followed by exactly one ``<answer>...</answer>``, else 0.0.
    Option ``prefilled_think`` (default False): the prompt ends with ``<think>`` (R1-Zero/ORZ templates)."""

    def think_answer_format_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [1.0 if has_think_answer_format(completion_text(c), prefilled_think) else 0.0 for c in completions]

    return think_answer_format_reward


@register("boxed_format")
def boxed_format():
    """1.0 when the completion holds a ``\\boxed{...}`` answer with a non-empty body, else 0.0."""

    def boxed_format_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        out = []
        for c in completions:
            b = last_boxed(completion_text(c))
            out.append(1.0 if b is not None and b.strip() else 0.0)
        return out

    return boxed_format_reward
