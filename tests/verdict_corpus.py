"""Verdict test corpus for the math answer reward (``rlkit_rewards.math.verify_answer`` / ``math_accuracy``).

``build_cases(data_dir)`` reads the real gold answers in the shared benchmark folder (``gsm8k_test.jsonl``,
``math500_test.jsonl``), picks golds by type with fixed rules (file order, no randomness), and writes each one
in other forms. Every case is ``Case(source_id, gold, candidate, expected, kind)``; ``expected`` comes from
the rewriting rule that produced the candidate (an equivalent rewrite -> True, a rewrite that changes the
value -> False), never from running the code under test.

Kinds: ``integer``, ``thousands``, ``currency``, ``percent``, ``units``, ``fraction``, ``dfrac``, ``decimal``,
``interval``, ``tuple``, ``list``, ``matrix``, ``degrees``, ``radical_pi``, ``nonfinite``.

Conventions (what a math grader is taken to expect; the module keeps out anything it does not settle):

* Numbers use the US convention: "," groups thousands (also the LaTeX forms ``1{,}234``, ``1,\\!234``,
  ``1\\,234``) and "." is the decimal point, so "1,234" = 1234 and "700.0" != 70000. Two integers must be
  equal exactly (1,450,001 != 1,450,000), whatever the size.
* Currency signs (``$``, ``\\$``) and trailing units (``\\text{ cm}^2``, "square inches", "dollars",
  "apples") are presentation: "\\$1,234" = "1234 dollars" = 1234. Units are not converted: an answer in a
  different unit than the gold's is left out of the corpus.
* Degrees: ``30^\\circ`` = ``30`` = ``30°`` = "30 degrees" (the unit is dropped, never converted; an answer
  in radians for a degree gold, e.g. ``\\frac{\\pi}{6}`` for ``30^\\circ``, is left out).
* Percent: a percent sign on one side only matches either reading: "25%" = 25 (GSM8K golds drop the
  sign) and "25%" = 0.25 = ``\\frac14``. So a 10x slip ("250%" or "2.5%" for 25) is wrong, while a
  100x reading ("0.25%" for 0.25, "2500%" for 25) is ambiguous and left out, as is a bare "0.25" for a
  gold 25 that a question asked for as a percentage (see ``AMBIGUOUS``).
* Fractions: ``\\dfrac``/``\\tfrac``/``\\frac``/``a/b``/an exact terminating decimal are all equal; a
  rounded decimal of a non-terminating fraction (4.67 for 14/3) is left out. A mixed number ``1\\frac{4}{5}``
  means 1 + 4/5.
* Intervals: endpoint brackets matter (``(3,4]`` != ``[3,4]``); a union is order-free; the univariate
  inequality with the same solution set (``3 < x \\le 4``) is equal. ``(2,\\infty]`` is left out.
* Tuples (ordered pairs/triples/points) are ordered; a bare comma list of solutions ("1,-2") is an unordered
  set. A point written with square brackets ("[15,-29]") is left out.
* Matrices: entries compared exactly; ``bmatrix`` = ``pmatrix``; a scalar factored out is equal; a tuple
  ``(a, b, c)`` equals the column vector with those entries; a row vector for a column-vector gold is left out.
* ``\\sqrt13`` is TeX for ``\\sqrt{1}3`` = 3, so such brace-less forms are left out.
* Non-finite or absurd answers (``\\infty``, "nan", a 400-digit number) never equal a finite gold.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple


class Case(NamedTuple):
    source_id: str
    gold: str
    candidate: str
    expected: bool
    kind: str


KINDS = ("integer", "thousands", "currency", "percent", "units", "fraction", "dfrac", "decimal", "interval",
         "tuple", "list", "matrix", "degrees", "radical_pi", "nonfinite")

# Forms whose verdict is a convention call rather than mathematics: documented here, not asserted.
AMBIGUOUS = [
    ("25", "0.25", "gold 25 for 'what percent...?': the fraction instead of the percentage"),
    ("0.15", "0.15\\%", "a percent sign on a number equal to the gold (100x reading)"),
    ("25", "2500\\%", "2500% = 25 as a number, but a 100x slip as a percentage"),
    ("1234", "1 234", "a plain space as thousands separator (or two numbers?)"),
    ("1234", "1.234", "European thousands dot"),
    ("2125", "2.125", "European thousands dot"),
    (".0000672", "6.72e-5", "'e' notation: LaTeX reads 6.72e-5 as 6.72*e - 5"),
    ("120^\\circ", "\\frac{2\\pi}{3}", "radians for a degree answer"),
    ("(2,\\infty)", "(2,\\infty]", "closed bracket at infinity"),
    ("(15,-29)", "[15,-29]", "a point in square brackets"),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "\\begin{pmatrix} -2 & -14 & -7 \\end{pmatrix}",
     "row vector for a column vector"),
    ("3\\sqrt{13}", "3\\sqrt13", "TeX: \\sqrt13 is sqrt(1)*3"),
    ("\\frac{14}{3}", "4.67", "a rounded decimal for a non-terminating fraction"),
    ("5.4 \\text{ cents}", "\\$0.054", "the same amount in another unit"),
    ("1234", "1234.0001", "within the default relative tolerance (1e-6) of a non-integer comparison"),
]


def default_data_dir() -> Path:
    """``$RLKIT_DATA_DIR`` or ``../shared/data`` beside the repository (as in tests/conftest.py)."""
    import os

    env = os.environ.get("RLKIT_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- number formatting helpers -------------------------------------------------------------------------
def _dec(x: Fraction) -> str | None:
    """Exact decimal string of a terminating fraction, else None."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    value = Decimal(x.numerator) / Decimal(x.denominator)
    s = format(value.normalize(), "f")
    return s


def _num(x: Fraction | int) -> str:
    """Integer or exact decimal text of a value (assumes a terminating decimal)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    s = _dec(x)
    assert s is not None, x
    return s


def _frac_tex(x: Fraction, cmd: str = "\\frac") -> str:
    sign = "-" if x < 0 else ""
    return f"{sign}{cmd}{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _commas(n: int) -> str:
    return f"{n:,}"


# ---- GSM8K ---------------------------------------------------------------------------------------------
def _gsm8k_gold(row: dict) -> str:
    return row["answer"].rsplit("####", 1)[1].strip()


def _final_question(q: str) -> str:
    sents = re.split(r"(?<=[.?!])\s+", q.strip())
    asked = [s for s in sents if s.endswith("?")]
    return asked[-1] if asked else sents[-1]


_PERCENT_Q = re.compile(r"\bwhat(?:'s| is)?(?: the)? percent(?:age)?\b|expressed as a percentage", re.I)
_UNIT_NOUNS = ("hours", "miles", "dollars", "liters", "pounds", "minutes", "years", "cups", "bags", "flowers",
               "cookies", "points", "pages", "people", "centimeters", "grams", "days", "weeks", "feet", "inches",
               "meters", "eggs", "apples", "oranges", "books", "students")


def _gsm8k_cases(rows: list[dict]) -> list[Case]:
    cases: list[Case] = []

    def add(i: int, gold: str, cand: str, expected: bool, kind: str) -> None:
        cases.append(Case(f"gsm8k_test:{i}", gold, cand, expected, kind))

    golds = [(i, _gsm8k_gold(r)) for i, r in enumerate(rows)]
    value = {i: int(g.replace(",", "")) for i, g in golds}

    # integer: the first 12 golds below 1000 plus every negative one
    small = [i for i, _ in golds if 0 < value[i] < 1000][:12] + [i for i, _ in golds if value[i] < 0]
    for k, i in enumerate(small):
        n, g = value[i], golds[i][1]
        add(i, g, f"{n}.0", True, "integer")
        add(i, g, f"{n}.00" if k % 2 else (f"+{n}" if n > 0 else f"{n}.000"), True, "integer")
        add(i, g, str(n + 1), False, "integer")
        add(i, g, str(-n), False, "integer")
        add(i, g, str(10 * n) if k % 2 else _num(Fraction(n, 10)), False, "integer")

    # thousands: every gold written with separators, plus the first 16 other golds >= 1000
    with_sep = [i for i, g in golds if "," in g]
    big = with_sep + [i for i, g in golds if "," not in g and value[i] >= 1000][:16]
    seps = [lambda n: _commas(n), lambda n: _commas(n).replace(",", "{,}"), lambda n: _commas(n).replace(",", ",\\!"),
            lambda n: _commas(n).replace(",", "\\,"), lambda n: f"{_commas(n)}.00", lambda n: f"{n}.0", lambda n: str(n)]
    for k, i in enumerate(big):
        n, g = value[i], golds[i][1]
        add(i, g, seps[k % len(seps)](n), True, "thousands")
        add(i, g, seps[(k + 3) % len(seps)](n), True, "thousands")
        add(i, g, _commas(n + 1) if k % 2 else str(n - 1), False, "thousands")   # off by one, any size
        add(i, g, _commas(10 * n) if k % 3 else _num(Fraction(n, 100)), False, "thousands")  # 10x / 100x slip

    # currency: questions that talk in dollars
    money = [i for i, r in enumerate(rows) if "$" in r["question"] and 0 < value[i]][:14]
    for k, i in enumerate(money):
        n, g = value[i], golds[i][1]
        add(i, g, f"\\${_commas(n)}", True, "currency")
        add(i, g, [f"{_commas(n)} dollars", f"\\${n}.00", f"${_commas(n)}"][k % 3], True, "currency")
        add(i, g, f"\\${_commas(n + 1)}", False, "currency")
        add(i, g, f"\\${_num(Fraction(n, 100))}", False, "currency")  # dollars/cents slip

    # percent: the final question asks for a percentage; the gold is the bare number
    pct = [i for i, r in enumerate(rows)
           if _PERCENT_Q.search(_final_question(r["question"])) and value[i] > 0]
    for k, i in enumerate(pct):
        n, g = value[i], golds[i][1]
        add(i, g, [f"{n}\\%", f"{n}%", f"{n} percent", f"{n}.0\\%"][k % 4], True, "percent")
        add(i, g, f"{10 * n}\\%", False, "percent")                   # 10x slip
        add(i, g, f"{_num(Fraction(n, 10))}\\%", False, "percent")     # 10x slip the other way
        if k % 2:
            add(i, g, f"{n + 1}\\%", False, "percent")

    # units: "How many <noun> ...?" golds written with the noun as a unit
    unit = []
    for i, r in enumerate(rows):
        m = re.search(r"\bhow many ([a-z]+)\b", _final_question(r["question"]), re.I)
        if m and m.group(1).lower() in _UNIT_NOUNS and value[i] > 0:
            unit.append((i, m.group(1).lower()))
    for k, (i, noun) in enumerate(unit[:14]):
        n, g = value[i], golds[i][1]
        add(i, g, f"{_commas(n)} {noun}" if k % 2 else f"{n} \\text{{ {noun}}}", True, "units")
        add(i, g, f"{n + 1} {noun}", False, "units")
        if k % 2 == 0:
            add(i, g, f"{10 * n}\\text{{ {noun}}}", False, "units")

    # non-finite / absurd answers never equal a finite gold
    for k, i in enumerate([golds[0][0], big[0]]):
        g = golds[i][1]
        for cand in ["\\infty", "-\\infty", "inf", "nan", "1" * 400, "1e999"]:
            add(i, g, cand, False, "nonfinite")
    return cases


# ---- MATH-500 ------------------------------------------------------------------------------------------
_FRAC = re.compile(r"^(-?)\s*\\[dt]?frac\s*(?:\{(\d+)\}|(\d))\s*(?:\{(\d+)\}|(\d))$")
_MIXED = re.compile(r"^(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_DECIMAL = re.compile(r"^-?\d*\.\d+$")
_CURRENCY = re.compile(r"^\\\$(.+)$")
_DEGREES = re.compile(r"^(\d+)\^\\circ$")
_TEXT_UNIT = re.compile(r"^(.+?)\s*\\(?:text|mbox)\{\s*([a-z ]+)\}(\^2)?$")


def _fraction_of(ans: str) -> Fraction | None:
    m = _FRAC.match(ans.strip())
    if not m:
        return None
    sign, a1, a2, b1, b2 = m.groups()
    x = Fraction(int(a1 or a2), int(b1 or b2))
    return -x if sign else x


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    out.append(cur.strip())
    return out


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if depth < 0:
            return False
    return depth == 0


def _strip_left_right(s: str) -> str:
    return re.sub(r"\\(?:left|right)\s*", "", s).strip()


def _pieces(ans: str) -> list[tuple[str, str, str, str]] | None:
    """``(open, a, b, close)`` for each piece of an interval or union of intervals."""
    s = _strip_left_right(re.sub(r"^x\s*\\in\s*", "", ans.strip()))
    out = []
    for part in s.split("\\cup"):
        part = part.strip()
        if len(part) < 5 or part[0] not in "([" or part[-1] not in ")]":
            return None
        ends = _split_top(part[1:-1])
        if len(ends) != 2:
            return None
        out.append((part[0], ends[0], ends[1], part[-1]))
    return out


def _interval_tex(pieces, sep: str = ", ", cup: str = " \\cup ") -> str:
    return cup.join(f"{o}{a}{sep}{b}{c}" for o, a, b, c in pieces)


def _simple_frac_to_slash(e: str) -> str:
    x = _fraction_of(e)
    return f"{x.numerator}/{x.denominator}" if x is not None else e


def _inequality(piece) -> str | None:
    o, a, b, c = piece
    lo = {"(": "<", "[": "\\le"}[o]
    hi = {")": "<", "]": "\\le"}[c]
    if a == "-\\infty" and b == "\\infty":
        return None
    if a == "-\\infty":
        return f"x {hi} {b}"
    if b == "\\infty":
        return f"x {'>' if o == '(' else GE} {a}"
    return f"{a} {lo} x {hi} {b}"


GE = "\\ge"


def _flip(bracket: str) -> str:
    return {"(": "[", "[": "(", ")": "]", "]": ")"}[bracket]


def _is_int(e: str) -> bool:
    return re.fullmatch(r"-?\d+", e) is not None


def _math500_cases(rows: list[dict]) -> list[Case]:
    cases: list[Case] = []

    def add(r: dict, cand: str, expected: bool, kind: str, gold: str | None = None) -> None:
        cases.append(Case(r["unique_id"], gold if gold is not None else r["answer"], cand, expected, kind))

    for r in rows:
        ans, q = r["answer"], r["problem"].lower()

        # ---- fractions (and \dfrac) ----
        x = _fraction_of(ans)
        if x is not None:
            is_d = "\\dfrac" in ans
            kind = "dfrac" if is_d else "fraction"
            add(r, f"{x.numerator}/{x.denominator}", True, kind)
            if is_d:
                add(r, _frac_tex(x), True, "dfrac")
                add(r, _frac_tex(Fraction(1, 1) / x, "\\dfrac"), False, "dfrac")
                add(r, f"\\dfrac{{{x.numerator}}}{{{x.denominator + 1}}}", False, "dfrac")
            else:
                add(r, _frac_tex(x, "\\dfrac"), True, "dfrac")     # \dfrac of a \frac gold
                add(r, _frac_tex(Fraction(1, 1) / x, "\\dfrac"), False, "dfrac")
                # unreduced form
                add(r, f"{'-' if x < 0 else ''}\\frac{{{2 * abs(x.numerator)}}}{{{2 * x.denominator}}}", True, kind)
            if abs(x) != 1:
                add(r, _frac_tex(Fraction(1, 1) / x), False, kind)               # reciprocal
            add(r, _frac_tex(-x), False, kind)                                   # sign
            add(r, _frac_tex(x + Fraction(1, x.denominator)), False, kind)        # numerator + 1
            d = _dec(x)
            if d is not None:
                add(r, d, True, "decimal")
                add(r, _num(x * 10), False, "decimal")
                if 0 < x < 1 and (x * 100).denominator == 1:
                    add(r, f"{_num(x * 100)}\\%", True, "percent")    # convention: p% = p/100
                    add(r, f"{_num(x * 10)}\\%", False, "percent")    # 10x slip
            continue

        m = _MIXED.match(ans)
        if m:
            w, a, b = (int(v) for v in m.groups())
            x = w + Fraction(a, b)
            add(r, f"{x.numerator}/{x.denominator}", True, "fraction")
            add(r, _frac_tex(x), True, "fraction")
            add(r, _num(x), True, "decimal")
            add(r, _frac_tex(Fraction(a, b)), False, "fraction")               # whole part dropped
            add(r, _num(w * Fraction(a, b)), False, "fraction")                # read as a product
            add(r, _frac_tex(1 / x), False, "fraction")
            continue

        # ---- decimals ----
        if _DECIMAL.match(ans):
            x = Fraction(Decimal(ans))
            f = x.limit_denominator(10**9)
            assert f == x
            add(r, _frac_tex(x), True, "decimal")
            add(r, f"{x.numerator}/{x.denominator}", True, "decimal")
            add(r, ans + "0", True, "decimal")
            if ans.startswith(".") or ans.startswith("0."):
                add(r, "0" + ans if ans.startswith(".") else ans[1:], True, "decimal")
            add(r, _num(x * 10), False, "decimal")
            add(r, _num(x / 10), False, "decimal")
            last = Fraction(1, 10 ** len(ans.split(".")[1]))
            add(r, _num(x + last), False, "decimal")
            if x < Fraction(1, 1000):
                digits = ans.split(".")[1]
                lead = len(digits) - len(digits.lstrip("0"))
                mant = Decimal("0." + digits) * Decimal(10) ** (lead + 1)
                add(r, f"{format(mant.normalize(), 'f')} \\times 10^{{{-(lead + 1)}}}", True, "decimal")
                add(r, f"{format(mant.normalize(), 'f')} \\times 10^{{{-lead}}}", False, "decimal")
            continue

        # ---- currency and numbers with LaTeX thousands separators ----
        m = _CURRENCY.match(ans)
        if m or re.fullmatch(r"\d{1,3}(,(\\!)?\s*\d{3})+", ans):
            body = m.group(1) if m else ans
            x = Fraction(Decimal(re.sub(r"[,\s]|\\!", "", body)))
            kind = "currency" if m else "thousands"
            whole = x.denominator == 1
            plain = _num(x)
            grouped = _commas(int(x)) if whole else f"{_commas(int(x))}.{plain.split('.')[1]}"
            add(r, plain, True, kind)
            add(r, grouped, True, kind)
            if m:
                add(r, f"\\${grouped}", True, kind)
                add(r, f"{grouped} dollars", True, kind)
                add(r, f"{plain}0" if not whole and len(plain.split('.')[1]) == 1 else f"\\${plain}.00", True, kind)
            add(r, _num(x + 1) if whole else _num(x + Fraction(1, 100)), False, kind)
            add(r, _num(x * 10), False, kind)
            add(r, (_commas(int(x) + 1) if whole else _num(x - Fraction(1, 10))), False, kind)
            continue

        # ---- degrees ----
        m = _DEGREES.match(ans)
        if m:
            n = int(m.group(1))
            forms = [str(n), f"{n}^{{\\circ}}", f"{n}°", f"{n} degrees", f"{n}\\text{{ degrees}}", f"{n}^\\circ"]
            k = len(cases)
            add(r, forms[k % 6], True, "degrees")
            add(r, forms[(k + 2) % 6], True, "degrees")
            add(r, f"{n + 1}^\\circ" if k % 2 else str(n - 1), False, "degrees")
            if n != 90:
                add(r, f"{180 - n}^\\circ", False, "degrees")    # the supplement
            else:
                add(r, "180^\\circ", False, "degrees")
            continue

        # ---- units in \text{} / \mbox{} ----
        m = _TEXT_UNIT.match(ans)
        if m and m.group(2).strip() not in ("",):
            val, unit, sq = m.group(1).strip(), m.group(2).strip(), m.group(3) or ""
            if unit == "degrees":
                x = _fraction_of(val)
                assert x is not None
                whole, rest = divmod(x.numerator, x.denominator)
                for cand in [_frac_tex(x), f"{x.numerator}/{x.denominator}", f"{_frac_tex(x)}^\\circ",
                             f"{_frac_tex(x)} degrees", f"{whole}\\frac{{{rest}}}{{{x.denominator}}}"]:
                    add(r, cand, True, "units")
                for cand in [_frac_tex(1 / x), _frac_tex(x - 1), f"{_frac_tex(x + 1)}^\\circ"]:
                    add(r, cand, False, "units")
                continue
            x = Fraction(Decimal(val))
            short = {"inches": "in", "cm": "cm", "cents": "cents"}.get(unit, unit)
            word_sq = f"square {unit}" if sq else unit
            for cand in [val, f"{val} {word_sq}", f"{val}\\text{{ {short}}}{sq}", f"{val} {short}{sq}",
                         f"{val}\\text{{ {unit}}}{'^{2}' if sq else ''}"]:
                add(r, cand, True, "units")
            for cand in [_num(x + Fraction(1, 10) if x.denominator > 1 else x + 1), f"{_num(x * 10)} {word_sq}",
                         f"{_num(x + (Fraction(1, 10) if x.denominator > 1 else 1))}\\text{{ {unit}}}{sq}"]:
                add(r, cand, False, "units")
            if sq:
                add(r, f"{val}^2", False, "units")   # the value squared, not the unit
            continue

        # ---- pmatrix ----
        if ans.startswith("\\begin{pmatrix}"):
            body = ans[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
            grid = [[e.strip() for e in row.split("&")] for row in body.split("\\\\")]
            vals = [[Fraction(e) for e in row] for row in grid]

            def mat(rows_, env="pmatrix", fmt=lambda v: _num(v) if _dec(v) is not None else _frac_tex(v), sep=" "):
                inner = f"{sep}\\\\{sep}".join(f"{sep}&{sep}".join(fmt(v) for v in row) for row in rows_)
                return f"\\begin{{{env}}}{sep}{inner}{sep}\\end{{{env}}}"

            add(r, mat(vals, "bmatrix"), True, "matrix")
            add(r, mat(vals, sep=""), True, "matrix")
            add(r, mat(vals, fmt=lambda v: _frac_tex(v) if v.denominator > 1 else str(v)), True, "matrix")
            den = 1
            for v in (v for row in vals for v in row):
                den = den * v.denominator // __import__("math").gcd(den, v.denominator)
            if den > 1:
                add(r, f"\\frac{{1}}{{{den}}}" + mat([[v * den for v in row] for row in vals]), True, "matrix")
            if all(len(row) == 1 for row in vals):
                add(r, "(" + ", ".join(_frac_tex(v) if v.denominator > 1 else str(v) for (v,) in vals) + ")", True,
                    "matrix")   # convention: a tuple equals the column vector
            flat = [(ri, ci) for ri, row in enumerate(vals) for ci, _ in enumerate(row)]
            nz = next(p for p in flat if vals[p[0]][p[1]] != 0)
            neg = [row[:] for row in vals]
            neg[nz[0]][nz[1]] = -neg[nz[0]][nz[1]]
            add(r, mat(neg), False, "matrix")                          # one entry's sign
            plus = [row[:] for row in vals]
            plus[-1][-1] += 1
            add(r, mat(plus), False, "matrix")                         # one entry off by one
            a, b = flat[0], flat[-1]
            if vals[a[0]][a[1]] != vals[b[0]][b[1]]:
                sw = [row[:] for row in vals]
                sw[a[0]][a[1]], sw[b[0]][b[1]] = sw[b[0]][b[1]], sw[a[0]][a[1]]
                add(r, mat(sw), False, "matrix")                       # two entries swapped
            add(r, "2" + mat(vals), False, "matrix")                   # scaled
            continue

        # ---- intervals and tuples ----
        pieces = _pieces(ans)
        is_interval = pieces is not None and (
            re.search(r"\\b(?:interval|domain|range)", q) is not None or "\\infty" in ans or "\\cup" in ans
            or any(o == "[" or c == "]" for o, _, _, c in pieces))
        if is_interval:
            add(r, _interval_tex(pieces, sep=","), True, "interval")
            if len(pieces) == 1:
                o, a, b, c = pieces[0]
                add(r, f"\\left{o} {a}, {b} \\right{c}", True, "interval")
                ineq = _inequality(pieces[0])
                if ineq:
                    add(r, ineq, True, "interval")
            else:
                add(r, _interval_tex(pieces[::-1]), True, "interval")   # union order is free
                add(r, f"({pieces[0][1]}, {pieces[-1][2]})", False, "interval")  # the hull
                add(r, _interval_tex(pieces[:1]), False, "interval")    # a piece dropped
            if any("\\frac" in e for _, a, b, _ in pieces for e in (a, b)):
                add(r, _interval_tex([(o, _simple_frac_to_slash(a), _simple_frac_to_slash(b), c)
                                      for o, a, b, c in pieces]), True, "interval")
            o, a, b, c = pieces[0]
            flipped = list(pieces)
            flipped[0] = (o, a, b, _flip(c)) if b != "\\infty" else (_flip(o), a, b, c)
            add(r, _interval_tex(flipped), False, "interval")         # open vs closed endpoint
            if _is_int(a) or _is_int(b):
                moved = list(pieces)
                moved[0] = (o, str(int(a) - 1), b, c) if _is_int(a) else (o, a, str(int(b) + 1), c)
                add(r, _interval_tex(moved), False, "interval")       # endpoint moved
            if len(pieces) == 1 and "\\infty" not in a + b:
                add(r, _interval_tex([(o, b, a, c)]), False, "interval")  # endpoints swapped
                ineq = _inequality((_flip(o), a, b, c))
                if ineq:
                    add(r, ineq, False, "interval")                    # strictness changed
            continue
        s = _strip_left_right(ans)
        if s.startswith("(") and s.endswith(")") and _balanced(s[1:-1]) and len(_split_top(s[1:-1])) >= 2:
            entries = _split_top(s[1:-1])
            tup = lambda es, sep=", ": "(" + sep.join(es) + ")"  # noqa: E731
            add(r, tup(entries), True, "tuple")
            add(r, "\\left(" + ",".join(entries) + "\\right)", True, "tuple")
            if any(_fraction_of(e) is not None for e in entries):
                add(r, tup([_simple_frac_to_slash(e) for e in entries]), True, "tuple")
            if all(_is_int(e) for e in entries):
                add(r, tup([e + ".0" for e in entries]), True, "tuple")
            i, j = next((i, j) for i in range(len(entries)) for j in range(i + 1, len(entries))
                        if entries[i] != entries[j])
            sw = list(entries)
            sw[i], sw[j] = sw[j], sw[i]
            add(r, tup(sw), False, "tuple")                              # order matters
            add(r, tup(entries[:-1]), False, "tuple")                    # an entry dropped
            k = next((k for k, e in enumerate(entries) if _is_int(e) and e != "0"), None)
            if k is not None:
                neg = list(entries)
                neg[k] = str(-int(entries[k]))
                add(r, tup(neg), False, "tuple")                         # a sign flipped
            continue

        # ---- comma lists of solutions (unordered) ----
        if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)+", ans):
            items = [e.strip() for e in ans.split(",")]
            add(r, ", ".join(items[::-1]), True, "list")
            add(r, ",".join(items), True, "list")
            add(r, ", ".join(items[:-1]), False, "list")
            add(r, ", ".join(items + [str(max(int(e) for e in items) + 2)]), False, "list")
            k = next(k for k, e in enumerate(items) if str(-int(e)) not in items)
            neg = list(items)
            neg[k] = str(-int(items[k]))
            add(r, ", ".join(neg), False, "list")
            continue

        # ---- a set of solutions written with braces and \pm ----
        m = re.fullmatch(r"\\\{(.+)\\\}", ans)
        if m:
            items = []
            for e in _split_top(m.group(1)):
                pm = re.fullmatch(r"(.+?)\\pm(.+)", e)
                items += [f"{pm.group(1)}+{pm.group(2)}", f"{pm.group(1)}-{pm.group(2)}"] if pm else [e]
            add(r, ", ".join(items[::-1]), True, "list")
            add(r, "\\{" + ", ".join(items) + "\\}", True, "list")
            add(r, ", ".join(items[:-1]), False, "list")
            add(r, ", ".join(items[1:]), False, "list")
            continue

        # ---- radicals and pi ----
        if "\\sqrt" in ans or "\\pi" in ans:
            _radical_pi(r, ans, add)
    return cases


def _radical_pi(r: dict, ans: str, add) -> None:
    kind = "radical_pi"
    m = re.fullmatch(r"(-?)(\d*)\s*\\sqrt\s*(?:\{(\d+)\}|(\d))", ans)
    if m:
        sign, k, n = m.group(1), int(m.group(2) or 1), int(m.group(3) or m.group(4))
        coef = "" if k == 1 else str(k)
        add(r, f"{sign}{coef}\\sqrt{{{n}}}", True, kind)
        add(r, f"{sign}\\sqrt{{{k * k * n}}}", True, kind)
        if k > 1:
            add(r, f"{sign}{k} \\cdot \\sqrt{{{n}}}", True, kind)
            add(r, f"{sign}\\sqrt{{{k * n}}}", False, kind)
            if k != n:
                add(r, f"{sign}{n}\\sqrt{{{k}}}", False, kind)
        else:
            add(r, f"{sign}{n}", False, kind)
        add(r, f"{sign}{coef}\\sqrt{{{n + 1}}}", False, kind)
        add(r, f"{'' if sign else '-'}{coef}\\sqrt{{{n}}}", False, kind)
        return
    m = re.fullmatch(r"(\d*)\s*\\pi", ans)
    if m:
        k = int(m.group(1) or 1)
        coef = "" if k == 1 else str(k)
        add(r, f"{coef}\\pi", True, kind)
        add(r, f"\\pi \\cdot {k}" if k > 1 else "\\frac{2\\pi}{2}", True, kind)
        add(r, f"{k + 1}\\pi", False, kind)
        add(r, str(k) if k > 1 else "3.14", False, kind)   # the pi dropped / rounded
        return
    m = re.fullmatch(r"\\frac\{(\d*)\s*\\sqrt\{(\d+)\}\}\{(\d+)\}", ans)
    if m:
        a, n, b = int(m.group(1) or 1), int(m.group(2)), int(m.group(3))
        ca = "" if a == 1 else str(a)
        add(r, f"\\frac{{{a}}}{{{b}}}\\sqrt{{{n}}}", True, kind)
        add(r, f"\\frac{{\\sqrt{{{a * a * n}}}}}{{{b}}}", True, kind)
        if a == 1 and b == n:
            add(r, f"\\frac{{1}}{{\\sqrt{{{n}}}}}", True, kind)
        add(r, f"\\frac{{{ca}\\sqrt{{{n}}}}}{{{b + 1}}}", False, kind)
        add(r, f"\\frac{{{b}}}{{{ca}\\sqrt{{{n}}}}}", False, kind)    # reciprocal
        add(r, f"{ca}\\sqrt{{{n}}}", False, kind)                      # denominator dropped
        return
    m = re.fullmatch(r"(-?)\\frac\{\\pi\}\{(\d+)\}", ans)
    if m:
        sign, b = m.group(1), int(m.group(2))
        add(r, f"{sign}\\pi/{b}", True, kind)
        add(r, f"\\frac{{{sign}\\pi}}{{{b}}}", True, kind)
        add(r, f"\\frac{{{'' if sign else '-'}\\pi}}{{{b}}}", False, kind)
        add(r, f"{sign}\\frac{{{b}}}{{\\pi}}", False, kind)
        return
    m = re.fullmatch(r"\\frac\{(\d+)\}\{\\pi\}", ans)
    if m:
        a = int(m.group(1))
        add(r, f"{a}/\\pi", True, kind)
        add(r, f"{a}\\pi^{{-1}}", True, kind)
        add(r, f"{a}\\pi", False, kind)
        add(r, f"\\frac{{\\pi}}{{{a}}}", False, kind)
        return
    m = re.fullmatch(r"(\S+?)\s*\\pm\s*(.+)", ans)
    if m and "," not in ans:
        a, b = m.group(1), m.group(2)
        add(r, f"{a}+{b}, {a}-{b}", True, kind)
        add(r, f"{a}-{b}, {a}+{b}", True, kind)
        add(r, f"{a}+{b}", False, kind)          # one root only
        return
    terms = [t.strip() for t in ans.split("+")]
    if len(terms) == 2 and all(terms) and "-" not in ans and "\\pm" not in ans:
        a, b = terms
        add(r, f"{b} + {a}", True, kind)
        add(r, f"{a} - {b}", False, kind)
        add(r, f"{b}", False, kind)


def build_cases(data_dir: Path | str | None = None) -> list[Case]:
    """All corpus cases, in a fixed order. Raises FileNotFoundError when a data file is missing."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    cases = _gsm8k_cases(_rows(d / "gsm8k_test.jsonl")) + _math500_cases(_rows(d / "math500_test.jsonl"))
    seen, out = set(), []
    for c in cases:
        key = (c.gold, c.candidate)
        if key not in seen and c.candidate.strip() != c.gold.strip():
            seen.add(key)
            out.append(c)
    return out


def summary(cases: list[Case]) -> dict[str, tuple[int, int]]:
    """``{kind: (equivalent cases, non-equivalent cases)}``."""
    eq = Counter(c.kind for c in cases if c.expected)
    ne = Counter(c.kind for c in cases if not c.expected)
    return {k: (eq[k], ne[k]) for k in KINDS}


if __name__ == "__main__":  # python tests/verdict_corpus.py: print the corpus and its per-kind counts
    all_cases = build_cases()
    for c in all_cases:
        print(f"{c.kind:11} {'EQ ' if c.expected else 'NE '} {c.source_id:40} {c.gold!r:45} {c.candidate!r}")
    for kind, (e, n) in summary(all_cases).items():
        print(f"{kind:11} {e:4} equivalent {n:4} not")
    print(len(all_cases), "cases")
