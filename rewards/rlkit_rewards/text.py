"""Helpers shared by the rewards: completion text and final-answer extraction."""

from __future__ import annotations

import math
import re
from typing import Any


def completion_text(completion: Any) -> str:
    """Text of a plain (str) or conversational (list of messages) completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        parts = [m.get("content", "") for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "".join(p if isinstance(p, str) else str(p) for p in parts)
    return str(completion)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with balanced braces; None if absent."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THE_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|\n|$)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, in priority order: last ``\\boxed{}``, last ``<answer>`` tag
    (a boxed answer inside it wins), ``#### x`` (GSM8K style), "the answer is x". None if none found."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    said = _THE_ANSWER_IS.findall(text)
    if said:
        return said[-1].strip()
    return None


_NUM = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")


def parse_number(s: str) -> float | None:
    """A plain number (thousands separators, $, %, trailing period allowed) or None."""
    t = s.strip().strip("$").strip()
    t = t.rstrip(".").replace("\\%", "").rstrip("%").strip()
    t = t.replace("\\!", "").replace("{,}", ",")
    if not t or not _NUM.match(t) or t in {"+", "-", "."}:
        return None
    try:
        value = float(t.replace(",", ""))
    except ValueError:
        return None
    # A huge digit string overflows to inf, and inf would "equal" any gold under a relative tolerance:
    # reject it rather than hand out reward for boxing a million digits.
    return value if math.isfinite(value) else None
