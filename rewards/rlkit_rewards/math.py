"""Math answer-correctness reward.

Verdict order: (1) both answers are normalised (math delimiters, ``\\$``, LaTeX thousands separators such as
``10,\\!080``, degree signs, trailing units such as ``\\text{ cm}^2`` or "dollars" are dropped); (2) if both
sides are then plain numbers they are compared exactly as decimals (fast path, no sympy): two integral
values must be equal, otherwise they must agree within ``rel_tol`` relative to the larger magnitude, and
a percent sign on one side only accepts either reading ("25%" matches 25 and 0.25); (3) otherwise
math-verify with the gold answer first (``verify`` is not symmetric); a univariate inequality answer is
compared as a set when the gold is an interval, and a tuple answer as a column vector when the gold is one.
Before (3), answers far costlier than their gold are rejected without parsing (model output is untrusted and
sympy can spend minutes on it): more than ``max(256, 4 x len(gold))`` characters, braces nested deeper than
``max(12, 2 x gold's + 2)``, exponents nested (``a^{b^{c}}``, ``9^9^9``) deeper than the gold's, or an integer
exponent above ``max(10^4, 10 x the gold's largest)``, or a factorial of a 4-digit number or of a group
(``(10^{10})!``) when the gold has none. Such an answer cannot equal a gold that has none of it.
math-verify's own timeouts use SIGALRM and only work on the main thread; off the main thread they
are disabled here, so callers that need a hard deadline must run rewards through a process engine.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from typing import Any

from .registry import register
from .text import _THIN_SEP, _unwrap, completion_text, extract_answer, last_boxed, parse_number_parts


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6) -> bool:
    """Equal within ``rel_tol`` relative to the larger magnitude (absolute below 1)."""
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


# ---- normalisation ---------------------------------------------------------------------------------
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree\b")
_SPACING = re.compile(r"\\\\|\\[,;:> ]|\\q?quad\b")
_POWER = r"(?:\s*\^\s*(?:\{\s*[23]\s*\}|[23]))?"
_TRAILING_TEXT = re.compile(r"\\(?:text|textrm|textnormal|textup|mbox|mathrm)\s*\{([^{}]*)\}" + _POWER + r"\s*$")
_UNITS = (
    "dollars?|cents?|percent|degrees?|radians?|units?|"
    "mm|cm|km|meters?|metres?|inches|inch|in|feet|foot|ft|yards?|yds?|miles?|mi|"
    "seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|"
    "grams?|kg|mg|pounds?|lbs?|oz|ounces?|liters?|litres?|ml|mL|gallons?|mph"
)
_UNIT_WORD = re.compile(r"(?<![\\A-Za-z])(?:(?:square|sq\.?|cubic)\s+)?(?:" + _UNITS + r")\b\.?" + _POWER + r"\s*$")
# a unit may only follow something that ends like a value: a digit, a closing bracket or a command such as \pi
# ("x \text{ is even}" and "2 m" with a variable m keep their words; single-letter units are never dropped)
_VALUE_END = re.compile(r"(?:[\d})\]]|\\[a-zA-Z]+)\s*$")
_NUMBER_THEN_WORDS = re.compile(r"^([-+]?[\d.,]*\d)\s+[A-Za-z]{3,}(?:[\s-]+[A-Za-z]{2,}){0,3}\.?$")


def _strip_units(s: str) -> str:
    """Drop a trailing unit ("\\text{ cm}^2", "square inches", "dollars", "apples" after a plain number)."""
    for _ in range(4):
        before = s
        m = _TRAILING_TEXT.search(s)
        if m and re.fullmatch(r"[A-Za-z][A-Za-z .'/\-]*", m.group(1).strip()) and _VALUE_END.search(s[: m.start()]):
            s = s[: m.start()].rstrip()
        m = _UNIT_WORD.search(s)
        if m and _VALUE_END.search(s[: m.start()]):
            s = s[: m.start()].rstrip() + ("\\%" if "percent" in m.group(0) else "")
        m = _NUMBER_THEN_WORDS.match(s)
        if m and parse_number_parts(m.group(1)) is not None:
            s = m.group(1)
        if s == before:
            break
    return s


def _normalize(s: str) -> str:
    """Answer text with presentation-only decorations removed (see the module docstring)."""
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        inner = last_boxed(s)
        if inner is not None:
            s = inner
    s = _unwrap(s)
    s = s.replace("\u2212", "-").replace("\\$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if s.count("$") == 1:  # a lone currency sign ("$1,234"); paired ones were math delimiters
        s = s.replace("$", "")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")
    s = _THIN_SEP.sub("", s)
    s = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)  # keep "\\" row breaks
    s = _DEGREE.sub("", s)
    s = _strip_units(s)
    return re.sub(r"\s+", " ", s).strip()


# ---- numbers -----------------------------------------------------------------------------------------
def _close(a: Decimal, b: Decimal, rel_tol: float) -> bool:
    if a == b:
        return True
    if a == a.to_integral_value() and b == b.to_integral_value():
        return False  # two integers: no tolerance (1,450,001 is not 1,450,000)
    return float(abs(a - b)) <= rel_tol * max(float(abs(a)), float(abs(b)))


def _numbers_match(g: tuple[Decimal, bool], p: tuple[Decimal, bool], rel_tol: float) -> bool:
    (gv, gpct), (pv, ppct) = g, p
    if gpct == ppct:
        return _close(gv, pv, rel_tol)
    pct, other = (gv, pv) if gpct else (pv, gv)
    # "25%" against 25 (gold written without its percent sign, as in GSM8K) or against 0.25
    return _close(other, pct, rel_tol) or _close(other, pct / 100, rel_tol)


def _plain(d: Decimal) -> str:
    return format(d.normalize(), "f") if d != d.to_integral_value() else format(d.to_integral_value(), "f")


def _readings(s: str) -> list[str]:
    """Strings to hand math-verify: a plain number in canonical form (both readings of a percent)."""
    parts = parse_number_parts(s)
    if parts is None:
        return [s]
    value, percent = parts
    return [_plain(value), _plain(value / 100)] if percent else [_plain(value)]


# ---- structure-aware rewrites for math-verify ----------------------------------------------------------
_MATRIX_ENV = re.compile(r"\\begin\{([pbBvV]?matrix)\}(.*?)\\end\{\1\}", re.DOTALL)


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _tuple_as_column(gold: str, pred: str) -> str:
    """``(a, b, c)`` rewritten as a column pmatrix when the gold is a column vector of the same length."""
    m = _MATRIX_ENV.fullmatch(gold.strip())
    if not m or "&" in m.group(2) or "matrix" in pred:
        return pred
    rows = [r for r in m.group(2).split("\\\\") if r.strip()]
    body = re.sub(r"^\\left\s*\(|\\right\s*\)$", lambda x: x.group(0)[-1], pred.strip())
    if not (body.startswith("(") and body.endswith(")")):
        return pred
    items = _split_top_level(body[1:-1])
    if len(items) != len(rows) or len(items) < 2 or not all(items):
        return pred
    return "\\begin{pmatrix} " + " \\\\ ".join(items) + " \\end{pmatrix}"


def _as_set_if_interval_gold(gold_parsed: list, pred_parsed: list) -> list:
    """A univariate inequality answer ("3 < x \\le 4") as its solution set when the gold is an interval."""
    try:
        from sympy import Eq, Set
        from sympy.core.relational import Relational
        from sympy.logic.boolalg import And, Or

        g, p = gold_parsed[0], pred_parsed[0]
        gold_is_set = isinstance(g, Set) or (isinstance(g, Eq) and isinstance(g.rhs, Set))
        relations = [p] if isinstance(p, Relational) else list(p.args) if isinstance(p, (And, Or)) else []
        # only a variable against constants ("3 < x <= 4"): as_set() is then trivial, never a solver run
        simple = relations and all(
            isinstance(r, Relational) and not isinstance(r, Eq)
            and all(side.is_Symbol or not side.free_symbols for side in r.args) for r in relations)
        if gold_is_set and simple and len(p.free_symbols) == 1:
            return [p.as_set(), *pred_parsed[1:]]
    except Exception:
        pass
    return pred_parsed


# latex2sympy2_extended's malformed-\frac fix (r"\\frac\s?{(.*?)}\s?(\d)") reaches past the fraction into a later
# "\begin{pmatrix} 16" and rewrites it to "\begin{pmatrix}{1}6", a wrong first entry; two spaces after the
# environment's opening brace keep that regex from matching.
_ENV_THEN_DIGIT = re.compile(r"(\\begin\{[a-zA-Z]*\})\s*(?=\d)")


def _math_verify(gold: str, predicted: str) -> bool:
    from math_verify import parse, verify  # imported lazily: sympy is slow to import

    on_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if on_main else None
    gold, predicted = _ENV_THEN_DIGIT.sub(r"\1  ", gold), _ENV_THEN_DIGIT.sub(r"\1  ", predicted)
    for g in _readings(gold):
        gold_parsed = parse(f"${g}$", parsing_timeout=timeout)
        if not gold_parsed:
            continue
        for p in _readings(predicted):
            pred_parsed = parse(f"\\boxed{{{_tuple_as_column(g, p)}}}", parsing_timeout=timeout)
            if not pred_parsed:
                continue
            pred_parsed = _as_set_if_interval_gold(gold_parsed, pred_parsed)
            if verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
                return True
    return False


_EXPONENT_INT = re.compile(r"\^\s*\{?\s*(\d+)")
_CHAINED_POWER = re.compile(r"\^\s*[\w.]+\s*\^")
_BIG_FACTORIAL = re.compile(r"(?:\d{4,}|[)}\]])\s*(?<!\\)!")  # 1000!, (10^{10})! -- not LaTeX's \! space


def _cost_profile(s: str) -> tuple[int, int, int, int]:
    """(length, brace depth, exponent nesting depth, largest integer exponent) of an answer, in one pass
    plus two regex scans; all linear in the length."""
    depth = max_depth = 0
    power_stack: list[bool] = []  # per open brace: was it opened right after a caret?
    power_depth = max_power = 0
    pending_caret = False
    for ch in s:
        if ch == "{":
            depth += 1
            max_depth = max(max_depth, depth)
            power_stack.append(pending_caret)
            if pending_caret:
                power_depth += 1
                max_power = max(max_power, power_depth)
            pending_caret = False
        elif ch == "}":
            if power_stack and power_stack.pop():
                power_depth -= 1
            depth = max(0, depth - 1)
        elif ch == "^":
            pending_caret = True
            max_power = max(max_power, power_depth + 1)
        elif not ch.isspace():
            pending_caret = False
    if _CHAINED_POWER.search(s):  # 9^9^9: a caret after a caret's bare operand nests too
        max_power = max(max_power, 2)
    biggest = 0
    for m in _EXPONENT_INT.finditer(s):
        digits = m.group(1)
        biggest = max(biggest, 10**9 if len(digits) > 9 else int(digits))
    return len(s), max_depth, max_power, biggest


def _too_costly(gold: str, predicted: str) -> bool:
    """A predicted answer far costlier to parse than the gold can never equal it (module docstring)."""
    if len(predicted) > max(256, 4 * len(gold)):
        return True
    g_len, g_depth, g_power, g_exp = _cost_profile(gold)
    _, p_depth, p_power, p_exp = _cost_profile(predicted)
    return (p_depth > max(12, 2 * g_depth + 2) or p_power > max(1, g_power)
            or p_exp > max(10_000, 10 * g_exp) or (_BIG_FACTORIAL.search(predicted) is not None
                                                     and _BIG_FACTORIAL.search(gold) is None))


def verify_answer(gold: str, predicted: str, rel_tol: float = 1e-6) -> bool:
    """True when ``predicted`` is mathematically equal to ``gold`` (see the module docstring for the rules)."""
    if len(predicted) > max(1024, 8 * len(gold)):  # before any normalisation: a megabyte answer costs seconds
        return False
    g, p = _normalize(gold), _normalize(predicted)
    if not g or not p:
        return False
    gn, pn = parse_number_parts(g), parse_number_parts(p)
    if gn is not None and pn is not None:
        return _numbers_match(gn, pn, rel_tol)
    if _too_costly(g, p):
        return False
    return _math_verify(g, p)


def gold_of(value: Any) -> str | None:
    """Gold answer from a dataset cell: GSM8K solutions ("... #### 42") reduce to their final answer."""
    if value is None:
        return None
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text or None


@register("math_accuracy", answers="math")
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
