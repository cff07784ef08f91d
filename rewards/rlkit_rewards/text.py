"""Helpers shared by the rewards: completion text and final-answer extraction."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
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
# "The answer is X." / "Final answer: X": X runs to the end of its line or to a sentence-ending period
# (a period followed by whitespace or the end), so the decimal point in "0.75" does not cut it short. The
# last trigger wins ("Final Answer: The final answer is $5$." -> "$5$"); one body scan keeps this linear.
_ANSWER_TRIGGER = re.compile(r"answer\s+is\b|final\s+answer\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _answer_body(text: str, start: int) -> str | None:
    """The answer stated after a trigger: from the first character that is not ``:`` or whitespace to the end
    of that line, cut at the first sentence-ending period, trailing whitespace stripped; None if empty. Plain
    scans, linear in the length (a backtracking regex here was quadratic in runs of spaces)."""
    n = len(text)
    while start < n and text[start] in ": \t\r\n\f\v":  # the answer may start on the next line
        start += 1
    end = text.find("\n", start)
    line = text[start:] if end < 0 else text[start:end]
    stop = _SENTENCE_END.search(line)
    body = (line if stop is None else line[: stop.start()]).rstrip()
    return body or None
_HASHES = re.compile(r"####\s*([^\n]+)")


def _closing_dollar(s: str, start: int) -> int:
    """Index of the first unescaped ``$`` at or after ``start``; -1 if none."""
    i = start
    while True:
        i = s.find("$", i)
        if i < 0 or s[i - 1] != "\\":
            return i
        i += 1


def _unwrap(ans: str) -> str:
    """Strip math delimiters around an extracted answer (``$x$``, ``$$x$$``, ``\\(x\\)``, ``\\[x\\]``) and a
    sentence-final period. A lone leading ``$`` with no closing one is a currency sign and is kept."""
    s = ans.strip()
    for _ in range(3):
        before = s
        if s.startswith("$$"):
            end = s.find("$$", 2)
            if end > 2:
                s = s[2:end].strip()
        elif s.startswith("$"):
            end = _closing_dollar(s, 1)
            if end > 1:
                s = s[1:end].strip()
        elif s.startswith("\\(") and "\\)" in s:
            s = s[2 : s.index("\\)")].strip()
        elif s.startswith("\\[") and "\\]" in s:
            s = s[2 : s.index("\\]")].strip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        if s == before:
            break
    return s


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, in priority order: last ``\\boxed{}``, last ``<answer>`` tag
    (a boxed answer inside it wins), ``#### x`` (GSM8K style), "the answer is x" / "final answer: x".
    Math delimiters (``$..$``, ``\\(..\\)``) and a sentence-final period are stripped. None if none found."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _unwrap(boxed)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return _unwrap(tags[-1])
    hashes = _HASHES.findall(text)
    if hashes:
        return _unwrap(hashes[-1])
    for trigger in reversed(list(_ANSWER_TRIGGER.finditer(text))):
        said = _answer_body(text, trigger.end())
        if said:
            if "\\boxed" in said or "\\fbox" in said:
                return None  # an unbalanced \boxed{ (a balanced one was found above): no final answer
            return _unwrap(said)
    return None


_NUM = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")
# LaTeX spacing used as a thousands separator: "10,\!080", "11,\! 111", "1{,}234", "1\,234"
_THIN_SEP = re.compile(r"(?<=\d)(?:\\,|\\!|\\ )(?=\d{3}(?!\d))")


def _number_text(s: str) -> tuple[str, bool] | None:
    """``s`` reduced to a bare decimal literal (no sign check yet) and whether it carried a percent sign."""
    t = s.strip().replace("\u2212", "-")
    t = t.replace("\\$", "$").strip().strip("$").strip()
    t = t.rstrip(".").strip()
    percent = False
    for mark in ("\\%", "%"):
        if t.endswith(mark):
            t, percent = t[: -len(mark)].strip(), True
            break
    t = re.sub(r"\\!\s*", "", t).replace("{,}", ",")
    t = _THIN_SEP.sub("", t)
    if not t or not _NUM.match(t) or t in {"+", "-", "."}:
        return None
    return t.replace(",", ""), percent


def parse_number_parts(s: str) -> tuple[Decimal, bool] | None:
    """``(exact decimal value, had a percent sign)`` of a plain number, or None. Same forms as
    :func:`parse_number`; the value is exact (no float rounding) and always finite."""
    parsed = _number_text(s)
    if parsed is None:
        return None
    t, percent = parsed
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    # A huge digit string overflows a float to inf, and inf would "equal" any gold under a relative
    # tolerance: reject it rather than hand out reward for boxing a million digits.
    if not math.isfinite(float(value)):
        return None
    return value, percent


def parse_number(s: str) -> float | None:
    """A plain number (thousands separators incl. LaTeX ``{,}``/``,\\!``/``\\,``, ``$``/``\\$``, ``%``, trailing
    period allowed) or None. The percent sign is dropped: ``parse_number("50\\%") == 50.0``."""
    parts = parse_number_parts(s)
    return None if parts is None else float(parts[0])
