"""MathHay-style long-context math items (arXiv 2410.04698), built offline: template documents full of quantities,
questions of the paper's task types with a solution program and an exact answer, and haystacks assembled to a
target length in the evaluated model's tokens. Also a loader for the released MathHay v1 JSON files.

Used by ``method: mathhay_build`` (:mod:`rlkit.methods.mathhay_build`) and the evaluation
(:mod:`rlkit.eval.mathhay`); the choices made where the paper is silent are in ``docs/methods/mathhay.md``.

**Documents.** Each document is about one entity of one of the paper's 10 :data:`TOPICS` (a county, a hospital, a
company, ...; every full name is used by one document only in a build) and states three of the topic's metrics for
the years :data:`YEARS`, one sentence per quantity: ``"The 2024 corn yield of Northfield County was 7.12 tonnes per
hectare."``. The value strings of a needed quantity are reserved: no noise document of the build writes them (nor
does the user's noise text, whose numbers the generator avoids), so a needed value appears only in its relevant
document.

**Task types** (:data:`TASK_TYPES`, the paper's 7, plus rlkit's :data:`EXTRA_TASK_TYPES`):

========  =====  =========  ==============================================================================
type      steps  documents  operations (all quantities of one question share a metric, hence a unit)
========  =====  =========  ==============================================================================
lookup    0      1          the value itself (rlkit only: retrieval without arithmetic, for small models)
sssd      1      1          difference, sum, ratio (two years of one entity)
ss2d      1      2          difference, sum, ratio (one year, two entities)
2ssd      2      1          sum minus, sum over, difference over (three years of one entity)
2s2d      2      2          as 2ssd, two quantities from the first document and one from the second
3ssd      3      1          mean of three, sum as a percentage, percentage change
3s2d      3      2          as 3ssd across two documents
3s3d      3      3          mean of three, sum as a percentage (one quantity per document)
========  =====  =========  ==============================================================================

A step is one arithmetic operation of the solution program (``round`` is not counted). Results that are not
short decimals (ratios, means, percentages) are asked for "rounded to two decimal places" and the program rounds,
so an exact numeric match is meaningful.

**Items.** The question, a solution program (Python source text ``def solve(): ... return answer`` written from the
chosen quantities) and the answer. Programs are never executed: :func:`evaluate_solution` reads them with
:mod:`ast` and evaluates numbers, names and ``+ - * / **``, ``round``, ``min``, ``max``, ``abs`` only.

**Haystacks** (:func:`build_haystack`): noise documents (other entities, or chunks of text files the user points
at) in a seeded order, whole documents while they fit and the next one cut at a word boundary to fill the length,
with the relevant documents spliced in at document boundaries nearest to the :data:`PLACEMENTS` position. The whole
prompt (chat template, instructions, question and context) is within 1% of the target in the tokenizer's tokens.

**Files** (:func:`build_mathhay`): ``items.jsonl`` (one row per item x length x placement) and ``meta.json``;
:func:`load_mathhay` reads them back, or a released MathHay JSON file with its ``documents.json``.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

DATASET = "items"
YEARS = (2022, 2023, 2024)
STYLES = ("released", "short")

TOPICS = ("Financial Market Analysis", "Sports Performance Analytics", "Climate Change Impact Assessment",
          "Healthcare Resource Allocation", "Urban Traffic Flow Optimization", "Supply Chain Management",
          "Energy Consumption Forecasting", "Epidemiological Modeling", "Agricultural Yield Prediction",
          "Educational Outcome Evaluation")
TASK_TYPES = ("sssd", "2ssd", "3ssd", "ss2d", "2s2d", "3s2d", "3s3d")
EXTRA_TASK_TYPES = ("lookup",)
ALL_TASK_TYPES = TASK_TYPES + EXTRA_TASK_TYPES
# task type -> (arithmetic steps, relevant documents)
TASK_SHAPE = {"lookup": (0, 1), "sssd": (1, 1), "2ssd": (2, 1), "3ssd": (3, 1), "ss2d": (1, 2), "2s2d": (2, 2),
              "3s2d": (3, 2), "3s3d": (3, 3)}

_SINGLE = ("first", "middle", "last")
_PN = tuple(f"p{n}" for n in range(11))
_TWO = ("first-first", "middle-middle", "last-last", "first-middle", "middle-last", "first-last")
_THREE = ("first-middle-last", "first-first-first", "middle-middle-middle", "last-last-last")
PLACEMENTS = _SINGLE + _PN + _TWO + _THREE
DEFAULT_PLACEMENT = {1: "middle", 2: "first-middle", 3: "first-middle-last"}
"""The paper's defaults by number of relevant documents."""


class MathHayError(ValueError):
    """Bad MathHay input (one line, saying what to change)."""


# --------------------------------------------------------------------------------------------------
# Placements


def placement_fractions(placement: str, n_docs: int) -> list[float]:
    """Where each of ``n_docs`` relevant documents goes, as a fraction of the noise (0: before all of it, 1: after
    it). A single-part placement (``first``, ``middle``, ``last``, ``pN``) puts every document there (the released
    code does so for ``pN``); a multi-part one must have one part per document."""
    if placement not in PLACEMENTS:
        raise MathHayError(f"unknown placement {placement!r}; use first, middle, last, p0..p10, or a combination "
                           f"such as first-middle ({', '.join(_TWO + _THREE)})")
    parts = placement.split("-")
    if len(parts) == 1:
        parts = parts * n_docs
    if len(parts) != n_docs:
        raise MathHayError(f"placement {placement!r} places {len(parts)} documents but the item has {n_docs}")
    where = {"first": 0.0, "middle": 0.5, "last": 1.0}
    return [where[p] if p in where else int(p[1:]) / 10 for p in parts]


def placements_for(task_type: str, placements: Sequence[str] | None) -> list[str]:
    """The placements that apply to a task type: the paper's default when ``placements`` is None, else the given
    ones whose part count fits the type's document count (single-part ones fit every type)."""
    n = TASK_SHAPE[task_type][1]
    if placements is None:
        return [DEFAULT_PLACEMENT[n]]
    out = []
    for p in placements:
        placement_fractions(p, len(p.split("-")))  # validates the name
        if len(p.split("-")) in (1, n):
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# Topics, entities and documents


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lo: float
    hi: float
    decimals: int


@dataclass(frozen=True)
class Topic:
    name: str
    patterns: tuple[str, ...]
    """Entity-name patterns with ``{s}`` for a place-like stem."""
    metrics: tuple[Metric, ...]
    report: str
    """The title's noun, e.g. ``annual report``."""
    fillers: tuple[str, ...]
    """Sentences without numbers (``{e}``: the entity)."""


def _m(*args) -> Metric:
    return Metric(*args)


_TOPIC_SPECS = (
    Topic("Financial Market Analysis", ("{s} Holdings", "{s} Industries", "{s} Capital Group"),
          (_m("annual revenue", "million dollars", 120, 9800, 1), _m("net profit", "million dollars", 5, 950, 1),
           _m("average share price", "dollars", 12, 480, 2), _m("dividend per share", "dollars", 0.2, 9.5, 2),
           _m("average daily trading volume", "thousand shares", 150, 9500, 0)),
          "financial summary",
          ("Analysts followed {e} closely during the period.", "The board of {e} met each quarter to review results.",
           "Investors reacted calmly to the reports of {e}.")),
    Topic("Sports Performance Analytics", ("the {s} Falcons", "the {s} Rovers", "the {s} Comets"),
          (_m("average points per game", "points", 70, 125, 1), _m("average home attendance", "spectators", 4000,
                                                                     65000, 0),
           _m("win rate", "percent", 20, 85, 1), _m("total distance run per match", "kilometres", 95, 125, 1),
           _m("season ticket holders", "members", 1500, 30000, 0)),
          "season review",
          ("The coaching staff of {e} tracked every match.", "Supporters of {e} travelled to most away games.",
           "The league published these figures for {e} after the season.")),
    Topic("Climate Change Impact Assessment", ("the {s} Valley region", "the {s} coastal zone", "the {s} Basin"),
          (_m("average summer temperature", "degrees Celsius", 14, 36, 1),
           _m("annual rainfall", "millimetres", 250, 2400, 0),
           _m("carbon emissions", "thousand tonnes of CO2", 80, 9000, 1),
           _m("forest cover", "square kilometres", 40, 5200, 1), _m("flood damage costs", "million dollars", 1, 900, 1)),
          "climate assessment",
          ("Scientists monitored conditions in {e} throughout the year.",
           "Local officials in {e} discussed adaptation plans.", "Weather stations across {e} supplied the data.")),
    Topic("Healthcare Resource Allocation", ("{s} General Hospital", "{s} Medical Center", "{s} Community Clinic"),
          (_m("number of staffed beds", "beds", 40, 1400, 0), _m("patient admissions", "patients", 2000, 90000, 0),
           _m("average emergency wait time", "minutes", 12, 240, 1),
           _m("operating budget", "million dollars", 15, 2400, 1),
           _m("number of nurses employed", "nurses", 60, 4200, 0)),
          "resource report",
          ("The administrators of {e} reviewed staffing every month.", "Patients at {e} were surveyed about care.",
           "The regional health board audited {e} during the period.")),
    Topic("Urban Traffic Flow Optimization", ("the {s} Road corridor", "the {s} Avenue corridor",
                                              "the {s} Bridge crossing"),
          (_m("average daily vehicle count", "vehicles", 3000, 95000, 0),
           _m("average peak-hour speed", "kilometres per hour", 8, 70, 1),
           _m("average commute time", "minutes", 12, 75, 1), _m("number of traffic accidents", "accidents", 5, 900, 0),
           _m("bus ridership", "thousand passengers", 50, 9000, 1)),
          "traffic study",
          ("Traffic engineers counted vehicles on {e} with roadside sensors.",
           "The city adjusted signal timing along {e}.", "Commuters using {e} were asked about delays.")),
    Topic("Supply Chain Management", ("the {s} distribution center", "the {s} freight terminal", "{s} Logistics"),
          (_m("shipments handled", "thousand shipments", 20, 4800, 1), _m("average delivery time", "days", 1.2, 14, 2),
           _m("inventory value", "million dollars", 3, 900, 1), _m("fuel costs", "thousand dollars", 100, 9000, 1),
           _m("order backlog", "orders", 100, 25000, 0)),
          "operations report",
          ("Managers at {e} reorganised the loading docks.", "Suppliers of {e} were reviewed for reliability.",
           "The planning team of {e} updated its forecasts.")),
    Topic("Energy Consumption Forecasting", ("the city of {s}", "the town of {s}", "the {s} industrial park"),
          (_m("electricity consumption", "gigawatt-hours", 40, 9000, 1),
           _m("peak electricity demand", "megawatts", 15, 3500, 1), _m("solar generation", "gigawatt-hours", 2, 900, 1),
           _m("natural gas use", "million cubic metres", 5, 1200, 1),
           _m("average household energy bill", "dollars", 600, 3200, 2)),
          "energy outlook",
          ("The utility serving {e} published its demand forecast.", "Planners in {e} studied new storage options.",
           "Meter readings from {e} were collected every hour.")),
    Topic("Epidemiological Modeling", ("{s} District", "the {s} health region", "{s} Province"),
          (_m("reported influenza cases", "cases", 200, 60000, 0), _m("vaccination rate", "percent", 30, 95, 1),
           _m("hospitalizations for respiratory illness", "patients", 20, 8000, 0),
           _m("tests performed", "thousand tests", 5, 2500, 1), _m("case fatality rate", "percent", 0.1, 4, 2)),
          "surveillance bulletin",
          ("Public health staff in {e} updated their models weekly.", "Clinics across {e} reported cases promptly.",
           "The epidemiology unit of {e} reviewed the season.")),
    Topic("Agricultural Yield Prediction", ("{s} County", "the {s} farming cooperative", "the {s} estate"),
          (_m("wheat yield", "tonnes per hectare", 2, 9, 2), _m("corn yield", "tonnes per hectare", 4, 13, 2),
           _m("farmland area", "thousand hectares", 5, 900, 1),
           _m("irrigation water use", "million cubic metres", 3, 700, 1),
           _m("fertilizer use", "kilograms per hectare", 40, 320, 1)),
          "harvest report",
          ("Farmers in {e} planted early because of a mild spring.", "Agronomists visited {e} to sample the soil.",
           "The harvest in {e} was stored in new silos.")),
    Topic("Educational Outcome Evaluation", ("{s} High School", "{s} Academy", "{s} Community College"),
          (_m("number of enrolled students", "students", 300, 9000, 0), _m("graduation rate", "percent", 55, 99, 1),
           _m("average math test score", "points", 380, 720, 1), _m("number of teachers", "teachers", 20, 600, 0),
           _m("spending per student", "dollars", 6000, 24000, 0)),
          "school report",
          ("Teachers at {e} introduced a new reading programme.", "Parents of students at {e} joined the review.",
           "Inspectors visited {e} during the autumn term.")),
)
TOPIC_SPECS = {t.name: t for t in _TOPIC_SPECS}

_STEM_HEADS = ("Ash", "North", "Brook", "Elm", "Oak", "Ridge", "Stone", "Maple", "Clear", "Fair", "Green", "Haven",
               "High", "Lake", "Mill", "Red", "Silver", "West", "East", "South", "Wood", "Cedar", "Pine", "Rose",
               "Black", "White", "Gold", "Kings", "Marsh", "Fern")
_STEM_TAILS = ("field", "ford", "bury", "ton", "wood", "dale", "brook", "ridge", "haven", "port", "mont", "well",
               "stead", "wick", "moor")


class _Names:
    """Entity names, each handed out once per build; names that occur in the user's noise text are skipped."""

    def __init__(self, rng: random.Random, forbidden_text: str = ""):
        stems = [h + t for h in _STEM_HEADS for t in _STEM_TAILS if h.lower() != t]
        self._queues: dict[str, list[str]] = {}
        for topic in _TOPIC_SPECS:
            names = [p.format(s=s) for p in topic.patterns for s in stems]
            rng.shuffle(names)
            self._queues[topic.name] = names
        self._forbidden = forbidden_text

    def take(self, topic: str) -> str:
        queue = self._queues[topic]
        while queue:
            name = queue.pop()
            if not self._forbidden or name not in self._forbidden:
                return name
        raise MathHayError(f"ran out of entity names for topic {topic!r}; build fewer items or shorter haystacks")


_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def number_strings(text: str) -> set[str]:
    """The numbers written in ``text``, without thousands separators (``"12,345.6"`` -> ``"12345.6"``)."""
    return {m.group().replace(",", "") for m in _NUMBER.finditer(text)}


class _Values:
    """Value draws. A needed quantity's value string is reserved once its item is made: noise documents drawn later
    never write it (nor a year, nor a number of the user's noise text), so a needed value appears only in its
    relevant document. Within one document all value strings differ."""

    def __init__(self, forbidden: set[str] = frozenset()):
        self._blocked = {str(y) for y in YEARS} | set(forbidden)

    def reserve(self, plain: str) -> None:
        self._blocked.add(plain.replace(",", ""))

    def draw(self, rng: random.Random, metric: Metric, taken: set[str]) -> tuple[float, str]:
        for _ in range(10000):
            v = round(rng.uniform(metric.lo, metric.hi), metric.decimals)
            plain = f"{v:.{metric.decimals}f}"
            if plain in self._blocked or plain in taken or float(plain) == 0:
                continue
            taken.add(plain)
            return (float(plain) if metric.decimals else int(plain)), f"{v:,.{metric.decimals}f}"
        raise MathHayError(f"ran out of distinct values for {metric.name!r}; build fewer items")


@dataclass
class Quantity:
    entity: str
    metric: str
    unit: str
    year: int
    value: float
    text: str
    """The value as written in the document (thousands separators included)."""

    @property
    def phrase(self) -> str:
        return f"the {self.year} {self.metric} of {self.entity}"

    @property
    def sentence(self) -> str:
        return f"The {self.year} {self.metric} of {self.entity} was {self.text} {self.unit}."

    def as_dict(self, doc_id: str) -> dict:
        return {"entity": self.entity, "metric": self.metric, "unit": self.unit, "year": self.year,
                "value": self.value, "value_text": self.text, "sentence": self.sentence, "doc_id": doc_id}


@dataclass
class Document:
    doc_id: str
    topic: str
    entity: str
    text: str
    quantities: list[Quantity] = field(default_factory=list)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_document(doc_id: str, topic: str, entity: str, metrics: Sequence[Metric], rng: random.Random,
                  values: _Values, years: Sequence[int] = YEARS) -> Document:
    """A document about ``entity``: a title, a filler sentence, then for each metric one sentence per year, then a
    closing filler sentence."""
    spec = TOPIC_SPECS[topic]
    fill = rng.sample(spec.fillers, 2)
    lines = [f"{_cap(entity)}: {spec.report}", fill[0].format(e=entity)]
    quantities, taken = [], set()
    for metric in metrics:
        sentences = []
        for year in years:
            value, text = values.draw(rng, metric, taken)
            q = Quantity(entity, metric.name, metric.unit, year, value, text)
            quantities.append(q)
            sentences.append(q.sentence)
        lines.append(" ".join(sentences))
    lines.append(fill[1].format(e=entity))
    return Document(doc_id, topic, entity, "\n".join(lines), quantities)


# --------------------------------------------------------------------------------------------------
# Operations and items


@dataclass(frozen=True)
class Op:
    name: str
    n: int
    """Quantities used."""
    steps: int
    expr: str
    """Python expression over ``{a}``, ``{b}``, ``{c}``."""
    question: str
    """Question template over ``{P1}``..``{P3}`` (the quantities' phrases) and ``{unit}``."""
    fn: Callable[..., float]
    rounded: bool = False
    descending: bool = False
    """Order the first two values so that the first is the larger."""


_ROUND = " Round to two decimal places."
OPS = {op.name: op for op in (
    Op("lookup", 1, 0, "{a}", "What was {P1}, in {unit}?", lambda a: a),
    Op("sub", 2, 1, "{a} - {b}", "How much higher was {P1} than {P2}, in {unit}?", lambda a, b: a - b,
       descending=True),
    Op("add", 2, 1, "{a} + {b}", "What is the sum of {P1} and {P2}, in {unit}?", lambda a, b: a + b),
    Op("ratio", 2, 1, "{a} / {b}", "What is the ratio of {P1} to {P2}?" + _ROUND, lambda a, b: a / b, rounded=True),
    Op("add_sub", 3, 2, "{a} + {b} - {c}", "What is the sum of {P1} and {P2}, minus {P3}, in {unit}?",
       lambda a, b, c: a + b - c),
    Op("sum_ratio", 3, 2, "({a} + {b}) / {c}", "What is the sum of {P1} and {P2}, divided by {P3}?" + _ROUND,
       lambda a, b, c: (a + b) / c, rounded=True),
    Op("diff_ratio", 3, 2, "({a} - {b}) / {c}", "What is {P1} minus {P2}, divided by {P3}?" + _ROUND,
       lambda a, b, c: (a - b) / c, rounded=True, descending=True),
    Op("mean3", 3, 3, "({a} + {b} + {c}) / 3", "What is the average of {P1}, {P2} and {P3}, in {unit}?" + _ROUND,
       lambda a, b, c: (a + b + c) / 3, rounded=True),
    Op("sum_pct", 3, 3, "({a} + {b}) / {c} * 100", "The sum of {P1} and {P2} is what percentage of {P3}?" + _ROUND,
       lambda a, b, c: (a + b) / c * 100, rounded=True),
    Op("pct_change", 2, 3, "({a} - {b}) / {b} * 100", "What is the percentage change from {P2} to {P1}?" + _ROUND,
       lambda a, b: (a - b) / b * 100, rounded=True),
)}

# task type -> [(operation, document index of each quantity)]
_TASK_OPS: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "lookup": [("lookup", (0,))],
    "sssd": [("sub", (0, 0)), ("add", (0, 0)), ("ratio", (0, 0))],
    "ss2d": [("sub", (0, 1)), ("add", (0, 1)), ("ratio", (0, 1))],
    "2ssd": [("add_sub", (0, 0, 0)), ("sum_ratio", (0, 0, 0)), ("diff_ratio", (0, 0, 0))],
    "2s2d": [("add_sub", (0, 0, 1)), ("sum_ratio", (0, 0, 1)), ("diff_ratio", (0, 0, 1))],
    "3ssd": [("mean3", (0, 0, 0)), ("sum_pct", (0, 0, 0)), ("pct_change", (0, 0))],
    "3s2d": [("mean3", (0, 0, 1)), ("sum_pct", (0, 0, 1)), ("pct_change", (0, 1))],
    "3s3d": [("mean3", (0, 1, 2)), ("sum_pct", (0, 1, 2))],
}


def _slug(s: str) -> str:
    s = re.sub(r"^the ", "", s.lower())
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_")


def _literal(value: float) -> str:
    return repr(value)


def solution_program(op: Op, quantities: Sequence[Quantity]) -> str:
    """The solution program (source text) of an operation over quantities."""
    names, lines = [], ["def solve():"]
    for q in quantities:
        name = f"{_slug(q.metric)}_{q.year}_{_slug(q.entity)}"
        names.append(name)
        lines.append(f"    {name} = {_literal(q.value)}  # {q.phrase}, in {q.unit}")
    expr = op.expr.format(**dict(zip("abc", names)))
    lines.append(f"    answer = round({expr}, 2)" if op.rounded else f"    answer = {expr}")
    lines.append("    return answer")
    return "\n".join(lines) + "\n"


def make_item(task_type: str, index: int, rng: random.Random, names: _Names, values: _Values,
              topic: str | None = None) -> dict:
    """One item (question, program, answer, relevant documents) of ``task_type``; deterministic in ``rng``."""
    if task_type not in TASK_SHAPE:
        raise MathHayError(f"unknown task type {task_type!r}; use one of {', '.join(ALL_TASK_TYPES)}")
    topic = topic or TOPICS[index % len(TOPICS)]
    spec = TOPIC_SPECS[topic]
    op_name, where = rng.choice(_TASK_OPS[task_type])
    op = OPS[op_name]
    n_docs = TASK_SHAPE[task_type][1]
    metric = rng.choice(spec.metrics)
    common = rng.choice(YEARS)
    # a lookup document states its three metrics for the asked year only (the needle has no same-metric distractor)
    years = (common,) if task_type == "lookup" else YEARS
    docs = []
    for j in range(n_docs):
        others = rng.sample([m for m in spec.metrics if m is not metric], 2)
        metrics = [metric] + others
        rng.shuffle(metrics)
        docs.append(make_document(f"{task_type}-{index:04d}-rel{j}", topic, names.take(topic), metrics, rng, values,
                                  years))
    # years: distinct within a document; the first quantity of every document shares one year
    chosen: list[Quantity] = []
    used: dict[int, list[int]] = {}
    for d in where:
        taken = used.setdefault(d, [])
        year = common if not taken else rng.choice([y for y in YEARS if y not in taken])
        taken.append(year)
        chosen.append(next(q for q in docs[d].quantities if q.metric == metric.name and q.year == year))
    for q in chosen:
        values.reserve(q.text)
    if op.descending and chosen[0].value < chosen[1].value:
        chosen[0], chosen[1] = chosen[1], chosen[0]
    answer = op.fn(*[q.value for q in chosen])
    if op.rounded:
        answer = round(answer, 2)
    program = solution_program(op, chosen)
    computed = evaluate_solution(program)
    if not math.isclose(computed, answer, rel_tol=1e-12, abs_tol=1e-12):
        raise AssertionError(f"solution program gives {computed}, the generator {answer}")  # a bug, not input
    fmt = {f"P{i + 1}": q.phrase for i, q in enumerate(chosen)}
    question = _cap(op.question.format(unit=metric.unit, **fmt))
    doc_of = {id(q): d.doc_id for d in docs for q in d.quantities}
    return {"item_id": f"{task_type}-{index:04d}", "task_type": task_type, "topic": topic, "op": op.name,
            "steps": op.steps, "question": question, "solution": program, "answer": float(computed),
            "quantities": [q.as_dict(doc_of[id(q)]) for q in chosen], "documents": docs}


# --------------------------------------------------------------------------------------------------
# The solution-program evaluator (no exec)

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_FUNCS = {"round": round, "min": min, "max": max, "abs": abs}


class SolutionError(MathHayError):
    """A solution program the arithmetic evaluator does not accept."""


def _eval(node: ast.AST, env: dict[str, float]) -> float:
    where = f"line {getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise SolutionError(f"solution program, {where}: only numbers are allowed, got {node.value!r}")
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise SolutionError(f"solution program, {where}: name {node.id!r} is used before it is assigned")
        return env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Div) and right == 0:
            raise SolutionError(f"solution program, {where}: division by zero")
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e12):
            raise SolutionError(f"solution program, {where}: power too large ({left} ** {right})")
        try:
            return _BINOPS[type(node.op)](left, right)
        except (OverflowError, ZeroDivisionError) as e:
            raise SolutionError(f"solution program, {where}: {e}") from None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        args = [_eval(a, env) for a in node.args]
        name = node.func.id
        if name == "round":
            if len(args) not in (1, 2) or (len(args) == 2 and args[1] != int(args[1])):
                raise SolutionError(f"solution program, {where}: round takes a number and whole digits")
            return round(args[0], int(args[1])) if len(args) == 2 else round(args[0])
        if name == "abs":
            if len(args) != 1:
                raise SolutionError(f"solution program, {where}: abs takes one number")
            return abs(args[0])
        if not args:
            raise SolutionError(f"solution program, {where}: {name} needs at least one number")
        return _FUNCS[name](args)
    what = type(node).__name__
    if isinstance(node, ast.Call):
        what = f"call of {ast.unparse(node.func)}"
    raise SolutionError(f"solution program, {where}: {what} is not allowed (numbers, names, + - * / **, round, "
                        f"min, max, abs only)")


def evaluate_solution(src: str) -> float:
    """The value ``solve()`` returns, computed without executing anything: the program must be one
    ``def solve():`` without arguments whose body holds assignments (``x = ...``, ``x += ...``) of arithmetic
    expressions and ends with ``return <expression>``; comments and a docstring are allowed. Anything else raises
    :class:`SolutionError` naming the line."""
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise SolutionError(f"solution program: not valid Python ({e.msg}, line {e.lineno})") from None
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if len(tree.body) != 1 or len(funcs) != 1 or funcs[0].name != "solve":
        raise SolutionError("solution program: expected exactly one function, def solve()")
    fn = funcs[0]
    a = fn.args
    if a.args or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or fn.decorator_list:
        raise SolutionError("solution program: solve() must take no arguments and have no decorators")
    env: dict[str, float] = {}
    for i, stmt in enumerate(fn.body):
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            env[stmt.targets[0].id] = _eval(stmt.value, env)
            continue
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and type(stmt.op) in _BINOPS:
            node = ast.BinOp(left=ast.Name(id=stmt.target.id, ctx=ast.Load()), op=stmt.op, right=stmt.value)
            ast.copy_location(node, stmt)
            env[stmt.target.id] = _eval(node, env)
            continue
        if isinstance(stmt, ast.Return) and stmt.value is not None:
            if i != len(fn.body) - 1:
                raise SolutionError(f"solution program, line {stmt.lineno}: return must be the last statement")
            value = _eval(stmt.value, env)
            if not math.isfinite(value):
                raise SolutionError("solution program: the answer is not a finite number")
            return float(value)
        raise SolutionError(f"solution program, line {stmt.lineno}: {type(stmt).__name__} is not allowed "
                            f"(assignments of arithmetic and a final return only)")
    raise SolutionError("solution program: solve() has no final return statement")


# --------------------------------------------------------------------------------------------------
# Prompts (the fixed parts of a haystack's length; rlkit.eval.mathhay renders the same text)

_RELEASED = (
    "Long-context documents:\n{context}\n\n"
    "Answer a math question with the information in the documents above.\n"
    "1. Find every number the question needs in the documents and note what it measures (the object, attribute, "
    "date or place it belongs to).\n"
    "2. Compute the answer from those numbers, step by step.\n\n"
    "Question: {question}\n\n"
    "Reply with one JSON object: {{\"reasoning\": \"<your steps>\", \"answer\": <the final number>}}. The answer is a "
    "plain number, without units or thousands separators."
)
_SHORT = "Documents:\n{context}\n\nQuestion: {question}\nReply with the number only."
SHORT_PREFIX = "Answer:"
"""What a ``short`` prompt ends with (the model continues it with the number)."""


def prompt_text(context: str, question: str, style: str = "released") -> str:
    """The user message of a prompt (without chat template)."""
    if style not in STYLES:
        raise MathHayError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
    return (_RELEASED if style == "released" else _SHORT).format(context=context, question=question)


def render_context(context: str, question: str, tokenizer, style: str = "released") -> str:
    """The full prompt text: the user message through the tokenizer's chat template (generation prompt on), or
    the plain message and a newline without one; the ``short`` style then appends ``"Answer:"`` (under a chat
    template: the first words of the assistant's turn)."""
    from .manyshot import has_chat_template

    user = prompt_text(context, question, style)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user + "\n"
    return text + SHORT_PREFIX if style == "short" else text


def render_prompt(row: dict, tokenizer, style: str | None = None) -> str:
    """The prompt of an item row (``context`` and ``question``); ``style`` None: the row's own (``released`` if it
    has none)."""
    for key in ("context", "question"):
        if not isinstance(row.get(key), str):
            raise MathHayError(f"MathHay row {row.get('id', '?')}: missing text field {key!r}")
    return render_context(row["context"], row["question"], tokenizer, style or row.get("style") or "released")


def count_tokens(text: str, tokenizer) -> int:
    """Tokens of a full prompt text, with special tokens added as :func:`rlkit.rollout.generate_hf` adds them."""
    from .manyshot import text_tokens

    return text_tokens(text, tokenizer)


# --------------------------------------------------------------------------------------------------
# Haystacks

SEPARATOR = "\n\n"


class NoisePool:
    """Noise documents tokenized once (token counts and character offsets), for assembling many haystacks."""

    def __init__(self, docs: Sequence[str], tokenizer, ids: Sequence[str] | None = None):
        self.texts = [d.strip() for d in docs]
        if not self.texts:
            raise MathHayError("the noise pool is empty")
        self.ids = list(ids) if ids is not None else [f"noise-{i}" for i in range(len(self.texts))]
        self.tokenizer = tokenizer
        self._counted: dict[str, int] = {}
        try:
            enc = tokenizer(self.texts, add_special_tokens=False, return_offsets_mapping=True)
            self.offsets: list | None = [list(map(tuple, o)) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):
            enc = tokenizer(self.texts, add_special_tokens=False)
            self.offsets = None
        self.ids_tokens = enc["input_ids"]
        self.counts = [len(x) for x in enc["input_ids"]]
        one = len(tokenizer("x", add_special_tokens=False)["input_ids"])
        self.sep_tokens = max(0, len(tokenizer("x" + SEPARATOR + "x", add_special_tokens=False)["input_ids"]) - 2 * one)

    def __len__(self) -> int:
        return len(self.texts)

    def count(self, text: str) -> int:
        """Tokens of a text (no special tokens), remembered: the relevant documents of an item recur at every
        length and placement."""
        if text not in self._counted:
            if len(self._counted) > 4096:
                self._counted.clear()
            self._counted[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._counted[text]

    @property
    def total_tokens(self) -> int:
        return sum(self.counts) + self.sep_tokens * len(self.counts)

    def prefix(self, i: int, n_tokens: int) -> str:
        """The first ``n_tokens`` tokens of document ``i``, cut back to a word boundary (never inside a number)."""
        text = self.texts[i]
        if n_tokens >= self.counts[i]:
            return text
        if n_tokens <= 0:
            return ""
        if self.offsets is not None:
            end = self.offsets[i][n_tokens - 1][1]
            cut = text[:end]
        else:
            cut = self.tokenizer.decode(self.ids_tokens[i][:n_tokens])
            end = len(cut)
        if end < len(text) and not text[end].isspace():
            space = max(cut.rfind(" "), cut.rfind("\n"))
            cut = cut[:space] if space > 0 else ""
        return cut.rstrip()


def _fill(pool: NoisePool, order: Sequence[int], budget: int) -> list[tuple[int, str, int]]:
    """Noise documents (pool index, text, estimated tokens) in ``order`` filling ``budget`` tokens: whole ones while
    they fit, then the next one cut."""
    out, used = [], 0
    for i in order:
        need = pool.counts[i] + pool.sep_tokens
        if used + need <= budget:
            out.append((i, pool.texts[i], pool.counts[i]))
            used += need
            continue
        rest = budget - used - pool.sep_tokens
        if rest > 0:
            text = pool.prefix(i, rest)
            if text:
                out.append((i, text, rest))
        return out
    if budget - used > max(8, budget // 100):
        raise MathHayError(f"the noise documents hold about {pool.total_tokens} tokens, too few for a haystack of "
                           f"{budget} noise tokens; add noise text or build shorter haystacks")
    return out


def build_haystack(relevant: Sequence[str], noise: NoisePool | Sequence[str], tokenizer, target_tokens: int,
                   placement: str = "middle", render: Callable[[str], str] | None = None, seed: Any = 0,
                   order: Sequence[int] | None = None, tolerance: float = 0.01,
                   fixed_tokens: int | None = None) -> dict:
    """A haystack: ``noise`` documents (a :class:`NoisePool` or texts) in a seeded order (or ``order``: pool
    indices, as the released files list them), with the ``relevant`` documents spliced in at the document
    boundaries nearest to the ``placement``'s positions, joined by blank lines. ``render(context)`` gives the full
    prompt whose token count must be within ``tolerance`` (relative) of ``target_tokens`` (default: the context
    alone; ``fixed_tokens``: the tokens of ``render("")`` when the caller knows them). Returns ``{"context", "n_tokens", "doc_ids", "positions": [{"doc_index", "char_start",
    "token_start", "fraction"}, ...] (one per relevant document, in order), "noise_ids"}``."""
    pool = noise if isinstance(noise, NoisePool) else NoisePool(noise, tokenizer)
    render = render or (lambda c: c)
    relevant = [r.strip() for r in relevant]
    if not relevant:
        raise MathHayError("build_haystack needs at least one relevant document")
    fractions = placement_fractions(placement, len(relevant))
    if order is None:
        order = list(range(len(pool)))
        random.Random(f"mathhay-noise|{seed}").shuffle(order)
    rel_tokens = [pool.count(r) for r in relevant]
    fixed = count_tokens(render(""), tokenizer) if fixed_tokens is None else fixed_tokens
    budget = target_tokens - fixed - sum(rel_tokens) - pool.sep_tokens * len(relevant)
    if budget < 0:
        raise MathHayError(f"a haystack of {target_tokens} tokens is too short: the prompt's fixed parts and the "
                           f"relevant documents alone take {target_tokens - budget}; build longer haystacks")
    best = None
    for _ in range(8):
        noise_docs = _fill(pool, order, budget)
        starts = [0]
        for _i, _t, n in noise_docs:
            starts.append(starts[-1] + n + pool.sep_tokens)
        total = starts[-1]
        # insertion slot (0..len(noise_docs)) per relevant document; ties keep the documents' order
        slots = [min(range(len(starts)), key=lambda k: (abs(starts[k] - f * total), k)) if 0 < f < 1
                 else (0 if f == 0 else len(noise_docs)) for f in fractions]
        docs: list[tuple[str, str, int]] = []  # (id, text, tokens)
        for k in range(len(noise_docs) + 1):
            for j, s in enumerate(slots):
                if s == k:
                    docs.append((f"relevant-{j}", relevant[j], rel_tokens[j]))
            if k < len(noise_docs):
                i, text, n = noise_docs[k]
                docs.append((pool.ids[i], text, n))
        context = SEPARATOR.join(t for _d, t, _n in docs)
        n_tokens = count_tokens(render(context), tokenizer)
        diff = target_tokens - n_tokens
        if best is None or abs(diff) < abs(best[0]):
            best = (diff, context, n_tokens, docs)
        if abs(diff) <= max(2, int(0.004 * target_tokens)) or not noise_docs:
            break
        budget += diff
    diff, context, n_tokens, docs = best
    if abs(diff) > tolerance * target_tokens:
        raise MathHayError(f"could not assemble a haystack within {tolerance:.0%} of {target_tokens} tokens "
                           f"(got {n_tokens})")
    positions, char, tok = [], 0, 0
    context_tokens = sum(n for _d, _t, n in docs) + pool.sep_tokens * (len(docs) - 1)
    for k, (d, text, n) in enumerate(docs):
        if d.startswith("relevant-"):
            positions.append({"doc_index": k, "char_start": char, "token_start": tok,
                              "fraction": round(tok / max(1, context_tokens), 4)})
        char += len(text) + len(SEPARATOR)
        tok += n + pool.sep_tokens
    return {"context": context, "n_tokens": n_tokens, "doc_ids": [d for d, _t, _n in docs], "positions": positions,
            "noise_ids": [d for d, _t, _n in docs if not d.startswith("relevant-")]}


# --------------------------------------------------------------------------------------------------
# Noise from files


def read_noise_files(paths: Sequence[str | Path], max_chars: int = 1500) -> list[str]:
    """Documents cut from text files: paragraphs (split at blank lines) packed into pieces of at most about
    ``max_chars`` characters (a longer paragraph is split at spaces)."""
    docs: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise MathHayError(f"noise file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MathHayError(f"noise file {path} is not UTF-8 text") from None
        paras = [" ".join(x.split()) for x in re.split(r"\n\s*\n", text) if x.strip()]
        cur = ""
        for para in paras:
            while len(para) > max_chars:
                cut = para.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                if cur:
                    docs.append(cur)
                    cur = ""
                docs.append(para[:cut])
                para = para[cut:].strip()
            if cur and len(cur) + len(para) + 1 > max_chars:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n{para}" if cur else para
        if cur:
            docs.append(cur)
    if not docs:
        raise MathHayError("the noise files hold no text")
    return docs


# --------------------------------------------------------------------------------------------------
# The builder


def _check_build_args(lengths, placements, task_types, n_items) -> tuple[list[int], list[str]]:
    if isinstance(task_types, str):
        task_types = [t.strip() for t in task_types.split(",") if t.strip()]
    task_types = list(task_types)
    if not task_types:
        raise MathHayError("no task types given")
    for t in task_types:
        if t not in TASK_SHAPE:
            raise MathHayError(f"unknown task type {t!r}; use any of {', '.join(ALL_TASK_TYPES)}")
    lengths = [int(x) for x in lengths]
    if not lengths or min(lengths) < 64:
        raise MathHayError(f"lengths must be token counts of at least 64, got {lengths}")
    if n_items < 1:
        raise MathHayError(f"n_items must be at least 1, got {n_items}")
    if placements is not None:
        for t in task_types:
            if not placements_for(t, placements):
                raise MathHayError(f"none of the placements {list(placements)} fits task type {t!r} "
                                   f"({TASK_SHAPE[t][1]} documents)")
    return lengths, task_types


def build_mathhay(out_dir: str | Path, tokenizer, lengths: Sequence[int], placements: Sequence[str] | None = None,
                  task_types: Sequence[str] | str = TASK_TYPES, n_items: int = 20, seed: int = 0,
                  noise_files: Sequence[str | Path] | None = None, progress: bool = True,
                  style: str = "released") -> dict:
    """Generate ``n_items`` items per task type and write ``items.jsonl`` (one row per item x length x placement)
    and ``meta.json`` to ``out_dir``; returns the meta dict (``path``: the jsonl file, ``rows``, counts, timing).

    ``lengths``: total prompt tokens (context + the ``style``'s fixed parts, in ``tokenizer``'s tokens);
    ``placements``: None for the paper's default per document count, else names (each task type gets those that
    fit it); ``noise_files``: text files whose chunks replace the template noise documents (the relevant documents
    are still generated). Deterministic in ``seed``. Row fields: ``id``, ``item_id``, ``task_type``, ``topic``,
    ``op``, ``steps``, ``length``, ``placement``, ``style``, ``n_tokens``, ``context``, ``question``, ``answer``,
    ``solution``, ``quantities``, ``relevant_doc_ids``, ``relevant_docs``, ``positions``, ``n_docs``, ``seed``."""
    t0 = time.perf_counter()
    lengths, task_types = _check_build_args(lengths, placements, task_types, n_items)
    if style not in STYLES:
        raise MathHayError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
    rng = random.Random(f"mathhay|{seed}")
    noise_text = ""
    user_docs = None
    if noise_files:
        user_docs = read_noise_files(noise_files)
        noise_text = "\n".join(user_docs)
    names = _Names(rng, noise_text)
    values = _Values(number_strings(noise_text))
    items = []
    for t in task_types:
        for i in range(n_items):
            items.append(make_item(t, i, random.Random(f"mathhay-item|{seed}|{t}|{i}"), names, values))
    # noise: generated after the items, so its entities and values differ from theirs
    if user_docs is not None:
        pool = NoisePool(user_docs, tokenizer, [f"noise-file-{i}" for i in range(len(user_docs))])
        noise_kind = [str(p) for p in noise_files]
    else:
        pool = _template_pool(tokenizer, rng, names, values, int(1.5 * max(lengths)) + 2000)
        noise_kind = "templates"
    if pool.total_tokens < max(lengths):
        raise MathHayError(f"the noise files hold about {pool.total_tokens} tokens, fewer than the longest haystack "
                           f"({max(lengths)}); add text or lower the lengths")
    for item in items:  # the prompt without context: the same at every length and placement
        item["fixed"] = count_tokens(render_context("", item["question"], tokenizer, style), tokenizer)
        need = item["fixed"] + sum(pool.count(d.text) + pool.sep_tokens for d in item["documents"])
        if need > min(lengths):
            raise MathHayError(f"{item['item_id']}: its prompt and relevant documents alone take {need} tokens "
                               f"({style} style), over the shortest length {min(lengths)}; raise the lengths")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{DATASET}.jsonl"
    jobs = [(item, length, p) for item in items for length in lengths
            for p in placements_for(item["task_type"], placements)]
    from tqdm.auto import tqdm

    n_rows = 0
    with open(path, "w") as fh:
        for item, length, p in tqdm(jobs, desc="mathhay build", disable=not progress, leave=False):
            docs = item["documents"]
            question = item["question"]
            hay = build_haystack([d.text for d in docs], pool, tokenizer, length, p,
                                 render=lambda c, q=question: render_context(c, q, tokenizer, style),
                                 seed=f"{seed}|{item['item_id']}", fixed_tokens=item["fixed"])
            positions = [{"doc_id": d.doc_id, **pos} for d, pos in zip(docs, hay["positions"])]
            row = {"id": f"{item['item_id']}-L{length}-{p}", "item_id": item["item_id"],
                   "task_type": item["task_type"], "topic": item["topic"], "op": item["op"], "steps": item["steps"],
                   "length": length, "placement": p, "style": style, "n_tokens": hay["n_tokens"],
                   "context": hay["context"], "question": question, "answer": item["answer"],
                   "solution": item["solution"], "quantities": item["quantities"],
                   "relevant_doc_ids": [d.doc_id for d in docs], "relevant_docs": [d.text for d in docs],
                   "positions": positions, "n_docs": len(hay["doc_ids"]), "seed": seed}
            fh.write(json.dumps(row) + "\n")
            n_rows += 1
    meta = {"version": 1, "generator": "rlkit.data.mathhay", "path": str(path), "rows": n_rows,
            "items": len(items), "n_items": n_items, "task_types": task_types, "lengths": lengths,
            "placements": {t: placements_for(t, placements) for t in task_types}, "style": style, "seed": seed,
            "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, "noise": noise_kind,
            "noise_docs": len(pool), "noise_tokens": pool.total_tokens,
            "build_seconds": round(time.perf_counter() - t0, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _template_pool(tokenizer, rng: random.Random, names: _Names, values: _Values, min_tokens: int) -> NoisePool:
    """Template noise documents (every topic, fresh entities and values) until they hold ``min_tokens`` tokens."""
    docs: list[Document] = []
    total = 0
    while total < min_tokens:
        batch = []
        for _ in range(16):
            topic = rng.choice(TOPICS)
            metrics = rng.sample(TOPIC_SPECS[topic].metrics, 3)
            batch.append(make_document(f"noise-{len(docs) + len(batch)}", topic, names.take(topic), metrics, rng,
                                       values))
        docs.extend(batch)
        counts = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        total += sum(len(c) + 2 for c in counts)
    return NoisePool([d.text for d in docs], tokenizer, [d.doc_id for d in docs])


# --------------------------------------------------------------------------------------------------
# Loading

REQUIRED = ("id", "task_type", "length", "placement", "context", "question", "answer")


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise MathHayError(f"{where}: expected a JSON object")
    for key in REQUIRED:
        if key not in row:
            raise MathHayError(f"{where}: missing field {key!r} (a MathHay row needs {', '.join(REQUIRED)})")
    return row


def _released_docs(row: dict, where: str) -> list[str]:
    if isinstance(row.get("Documents"), list):
        return [str(d) for d in row["Documents"]]
    if isinstance(row.get("Document"), str):
        return [row["Document"]]
    numbered = [row[f"Document{k}"] for k in (1, 2, 3) if isinstance(row.get(f"Document{k}"), str)]
    if numbered:
        return numbered
    raise MathHayError(f"{where}: no relevant document (fields Documents, Document or Document1..3)")


def released_items(path: str | Path) -> list[dict]:
    """The items of a released MathHay v1 question file, normalised: ``item_id``, ``task_type``, ``topic``,
    ``question``, ``answer``, ``solution``, ``steps``, ``relevant_docs`` (texts), ``noise_indexes`` (into
    ``documents.json``), ``verified`` flags kept under ``raw_task``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MathHayError(f"{p}: cannot read a released MathHay file ({e})") from None
    if not isinstance(data, list):
        raise MathHayError(f"{p}: a released MathHay file is a JSON list of items")
    items = []
    for k, row in enumerate(data):
        where = f"{p}: item {k}"
        task = row.get("Task") if isinstance(row, dict) else None
        if not isinstance(task, dict) or "question" not in task or "answer" not in task:
            raise MathHayError(f"{where}: missing Task.question / Task.answer (not a released MathHay item)")
        task_type = row.get("task_type") or p.stem.rsplit("_", 1)[-1]
        noise = row.get("Irrelevant_Documents_Indexs")
        if not isinstance(noise, list):
            raise MathHayError(f"{where}: missing Irrelevant_Documents_Indexs")
        answer = task["answer"]
        items.append({"item_id": f"{task_type}-{k:04d}", "task_type": task_type, "topic": row.get("Topic", ""),
                      "question": task["question"], "answer": None if answer is None else float(answer),
                      "solution": task.get("solution", ""), "steps": task.get("steps"),
                      "relevant_docs": _released_docs(row, where), "noise_indexes": [int(i) for i in noise],
                      "raw_task": task})
    return items


def _released_documents(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MathHayError(f"{path}: cannot read the MathHay documents file ({e})") from None
    if isinstance(data, dict):
        data = [data[k] for k in sorted(data, key=lambda x: int(x))]
    out = []
    for k, d in enumerate(data):
        text = d.get("Document") if isinstance(d, dict) else d
        if not isinstance(text, str):
            raise MathHayError(f"{path}: document {k} has no 'Document' text")
        out.append(text)
    return out


def load_mathhay(path: str | Path, documents: str | Path | None = None, tokenizer=None,
                 lengths: Sequence[int] | None = None, placements: Sequence[str] | None = None,
                 style: str = "released") -> list[dict]:
    """MathHay rows ready to evaluate. ``path``: a folder holding ``items.jsonl`` (what :func:`build_mathhay`
    writes), such a jsonl file, or a released MathHay v1 question file (``*.json``). A released file needs its
    ``documents.json`` (``documents``, default: beside the file), a ``tokenizer`` and ``lengths``: its haystacks are
    assembled here with the item's own noise order (``Irrelevant_Documents_Indexs``) and the ``placements`` (None:
    the paper's defaults). Missing pieces raise one line naming them."""
    p = Path(path)
    if p.is_dir():
        if not (p / f"{DATASET}.jsonl").is_file():
            raise MathHayError(f"{p}: no {DATASET}.jsonl in this folder (build one with `rlkit mathhay build`)")
        p = p / f"{DATASET}.jsonl"
    if not p.is_file():
        raise MathHayError(f"{p}: no such MathHay file or folder")
    if p.suffix == ".jsonl":
        rows = []
        with open(p) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MathHayError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                rows.append(_check_row(row, f"{p}:{n}"))
        if not rows:
            raise MathHayError(f"{p}: no rows")
        return rows
    items = released_items(p)
    docs_path = Path(documents) if documents is not None else p.parent / "documents.json"
    missing = []
    if not docs_path.is_file():
        missing.append(f"its documents file ({docs_path} does not exist; pass documents=PATH)")
    if tokenizer is None:
        missing.append("a tokenizer")
    if not lengths:
        missing.append("lengths")
    if missing:
        raise MathHayError(f"{p}: a released MathHay file needs " + ", ".join(missing) + " to build its haystacks")
    noise_texts = _released_documents(docs_path)
    pool = NoisePool(noise_texts, tokenizer, [f"DOC-{i}" for i in range(len(noise_texts))])
    rows = []
    for item in items:
        t = item["task_type"]
        n_docs = len(item["relevant_docs"])
        for idx in item["noise_indexes"]:
            if not 0 <= idx < len(pool):
                raise MathHayError(f"{p}: item {item['item_id']} names noise document {idx}, but {docs_path} holds "
                                   f"{len(pool)}")
        plist = [DEFAULT_PLACEMENT[n_docs]] if placements is None else \
            [x for x in placements if len(x.split("-")) in (1, n_docs)]
        if not plist:
            raise MathHayError(f"{p}: none of the placements {list(placements)} fits item {item['item_id']} "
                               f"({n_docs} documents)")
        for length in lengths:
            for pl in plist:
                hay = build_haystack(item["relevant_docs"], pool, tokenizer, int(length), pl,
                                     render=lambda c, q=item["question"]: render_context(c, q, tokenizer, style),
                                     order=item["noise_indexes"])
                rows.append({"id": f"{item['item_id']}-L{length}-{pl}", "item_id": item["item_id"], "task_type": t,
                             "topic": item["topic"], "steps": item["steps"], "length": int(length), "placement": pl,
                             "style": style, "n_tokens": hay["n_tokens"], "context": hay["context"],
                             "question": item["question"], "answer": item["answer"], "solution": item["solution"],
                             "relevant_docs": item["relevant_docs"], "positions": hay["positions"],
                             "n_docs": len(hay["doc_ids"]), "source": str(p)})
    return rows
