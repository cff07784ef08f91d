"""Auto-CEI's pure pieces (arXiv 2410.07627; released code ``SalesforceAIResearch/Auto-CEI``): "I don't know"
detection, the length-curriculum reward, the curriculum's initialisation, Boltzmann resampling, the objective
f and the hill-climb on c1. No torch, no model: the expert-iteration stages build on these.

- **IDK detection** (:func:`is_idk`): a response is an IDK answer when it contains one of the phrases, compared
  case-insensitively. The released code has two lists: the reward's (``reward_processor``: "i don't know",
  "sorry", "too difficult", "unfortunate", "no answer") and the evaluation's (``MATH_eval.py``: "I don't know",
  "too difficult", "sorry", "unfortunate", "uncertain", "not sure", "not certain", "not clear"). Both are kept
  (:data:`REWARD_IDK_PHRASES`, :data:`EVAL_IDK_PHRASES`) and every caller takes its list as an option.
- **Reward** (:func:`autocei_reward`): correct +1, wrong -1, IDK ``R(d) = 2 / (1 + exp(-c2 (d - c1))) - 1`` with
  d the number of reasoning steps (:func:`depth`): an early "I don't know" is penalised, one after long reasoning
  rewarded.
- **Initialisation** (:func:`init_curriculum`), from the initial model's responses: ``step = min(0.2 std, 0.5)``,
  ``c1 = mean IDK depth + step``, ``c2 = ln 10 / (4 std)`` (std of all depths, population form as numpy's).
- **Resampling** (:func:`boltzmann_resample`): n draws with replacement from p_j ∝ exp(R_j / tau), plus every
  original once; draws and originals with R = -1 (wrong answers) are dropped.
- **Objective** ``f = (1 - lambda) precision + lambda (1 - IDK rate)`` (:func:`objective`; lambda 0.2), with
  precision = correct / non-IDK answers (:func:`idk_metrics`).
- **Hill-climb** (:class:`CurriculumSearch`) on c1 with c2 fixed, and the inner loop's convergence test
  (:func:`ei_converged`). The released code compares each expert-iteration round with the precision and IDK rate
  at the curriculum's start, which it never updates; rlkit compares successive rounds (``mode="successive"``,
  the default) and keeps the released comparison as ``mode="released"``. See ``docs/methods/autocei.md``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

REWARD_IDK_PHRASES = ("i don't know", "sorry", "too difficult", "unfortunate", "no answer")
"""The released ``reward_processor``'s phrases (an IDK answer for the reward)."""
EVAL_IDK_PHRASES = ("I don't know", "too difficult", "sorry", "unfortunate", "uncertain", "not sure",
                    "not certain", "not clear")
"""The released ``MATH_eval.py``'s phrases (an IDK answer for precision and the IDK rate)."""
RTUNING_ENDING = ("\nSorry, I am not sure if I answer the question correctly. There might be mistakes in my answer. "
                  "\n#### No answer.")
"""What the released ``rtuning.py`` appends to a wrong answer's reasoning (its ``<|eot_id|>`` is the tokenizer's
EOS, added by SFT)."""
DEPTH_SPLITTERS = ("newline", "paragraph", "sentence", "latex_sentence", "period_newline")


def is_idk(text: str, phrases: Sequence[str] = REWARD_IDK_PHRASES) -> bool:
    """Whether ``text`` contains one of ``phrases`` (case-insensitive)."""
    low = text.lower()
    return any(p.lower() in low for p in phrases)


def depth(text: str, splitter: str = "newline") -> int:
    """The number of reasoning steps d of a response: ``period_newline`` counts the pieces between ``".\\n"``
    (the released MATH count, ``len(r.split('.\\n'))``); the others are :func:`rlkit.rollout.steps.split_steps`'s
    splitters (``newline``: one step per line, the released count for other tasks)."""
    if splitter not in DEPTH_SPLITTERS:
        raise ValueError(f"depth splitter {splitter!r} is not one of {', '.join(DEPTH_SPLITTERS)}")
    if splitter == "period_newline":
        return len(text.split(".\n"))
    from ...rollout.steps import split_steps

    return len(split_steps(text, splitter))


def idk_reward(d: float, c1: float, c2: float) -> float:
    """R(d) = 2 / (1 + exp(-c2 (d - c1))) - 1, in (-1, 1): negative below c1 steps, positive above."""
    x = -c2 * (d - c1)
    if x > 700:  # exp would overflow; the value is -1 in floating point anyway
        return -1.0
    return 2.0 / (1.0 + math.exp(x)) - 1.0


def autocei_reward(correct: bool, idk: bool, d: float, c1: float, c2: float, idk_first: bool = False) -> float:
    """+1 for a correct answer, the curriculum reward :func:`idk_reward` for an IDK answer, else -1. An answer that
    is both right and says "I don't know" counts as correct, or, with ``idk_first``, as IDK: the released
    ``reward_processor`` overwrites a correct answer's +1 with R(d) when it holds an IDK phrase."""
    if idk and (idk_first or not correct):
        return idk_reward(d, c1, c2)
    if correct:
        return 1.0
    return -1.0


@dataclass
class Curriculum:
    """The reward curriculum: IDK answers are rewarded by R(d) around ``c1`` with slope ``c2``; the hill-climb moves
    ``c1`` by ``step``."""

    c1: float
    c2: float
    step: float


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def init_curriculum(depths: Sequence[float], idk_depths: Sequence[float]) -> Curriculum:
    """The released ``test_c1``: from the depths of all the initial model's responses and of its IDK responses,
    ``step = min(0.2 std, 0.5)``, ``c1 = mean(idk_depths) + step``, ``c2 = ln 10 / (4 std)`` (population std)."""
    if len(depths) < 2:
        raise ValueError("init_curriculum needs the depths of at least 2 responses")
    if not idk_depths:
        raise ValueError("init_curriculum: the initial model gave no IDK answer; run the R-Tuning round first (it "
                         "turns wrong answers into IDK endings) or give its IDK responses")
    mu = _mean(depths)
    std = math.sqrt(_mean([(d - mu) ** 2 for d in depths]))
    if std == 0:
        raise ValueError("init_curriculum: every response has the same depth, so c2 = ln 10 / (4 std) is undefined")
    step = min(0.2 * std, 0.5)
    return Curriculum(c1=_mean(idk_depths) + step, c2=math.log(10) / (4 * std), step=step)


def boltzmann_resample(rewards: Sequence[float], tau: float, rng: random.Random, n: int | None = None,
                       drop_below: float = -1.0) -> list[int]:
    """Indices of the responses to fine-tune on: every original once (in order), then ``n`` (default
    ``len(rewards)``) draws with replacement from p_j ∝ exp(R_j / tau); indices whose reward is ``<= drop_below``
    (-1: wrong answers) are dropped from both. ``tau``: the released code's ``resampling_temp``, the initial
    model's precision."""
    if not tau > 0:
        raise ValueError(f"resampling temperature tau must be > 0, got {tau}")
    if not rewards:
        return []
    n = len(rewards) if n is None else int(n)
    top = max(rewards)
    weights = [math.exp((r - top) / tau) for r in rewards]
    draws = rng.choices(range(len(rewards)), weights=weights, k=n)
    return [i for i in (*range(len(rewards)), *draws) if rewards[i] > drop_below]


def idk_metrics(correct: Sequence[bool], idk: Sequence[bool]) -> dict[str, float]:
    """``precision`` = correct / non-IDK answers (0 when every answer is IDK), ``idk_rate`` = IDK / all,
    ``accuracy`` = correct / all (the released ``MATH_eval.py``; an IDK answer is never counted correct)."""
    if len(correct) != len(idk) or not correct:
        raise ValueError("idk_metrics: give one correct and one IDK flag per answer (at least one answer)")
    answered = [c for c, i in zip(correct, idk) if not i]
    right = sum(bool(c) for c in answered)
    return {"precision": right / len(answered) if answered else 0.0, "idk_rate": sum(map(bool, idk)) / len(idk),
            "accuracy": right / len(correct)}


def objective(precision: float, idk_rate: float, lam: float = 0.2) -> float:
    """f = (1 - lambda) precision + lambda (1 - IDK rate) (the released default lambda 0.2)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    return (1.0 - lam) * precision + lam * (1.0 - idk_rate)


def ei_converged(history: Sequence[tuple[float, float]], tol: float = 0.003, mode: str = "successive") -> bool:
    """Whether the inner expert-iteration loop has converged. ``history``: (precision, IDK rate) at the
    curriculum's start, then after each round. ``successive`` (default): the last round moved both by less than
    ``tol`` from the round before; ``released``: from the curriculum's start (the released code never updates its
    reference values)."""
    if mode not in ("successive", "released"):
        raise ValueError(f"convergence mode must be successive or released, got {mode!r}")
    if len(history) < 2:
        return False
    ref = history[-2] if mode == "successive" else history[0]
    last = history[-1]
    return abs(last[0] - ref[0]) < tol and abs(last[1] - ref[1]) < tol


def _key(c1: float) -> float:
    return round(c1, 9)


@dataclass
class CurriculumSearch:
    """The outer hill-climb on c1 (released ``curriculum.py``). Call :meth:`propose` for the next c1 to train with
    (None: done), then :meth:`report` its best f. After a curriculum that beats the incumbent, the next c1 is one
    ``step`` higher; otherwise one step lower than the curriculum just evaluated. The search stops when the
    proposed c1 was already evaluated (its neighbour was worse), or after ``max_curricula``.

    ``initial_f``: the incumbent before any curriculum (the starting model's f; -inf: the first curriculum always
    counts as an improvement)."""

    c1: float
    step: float
    initial_f: float = -math.inf
    max_curricula: int = 10
    evaluated: dict[float, float] = field(default_factory=dict)
    best_c1: float | None = None
    best_f: float = -math.inf
    done: bool = False
    _next: float | None = None

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ValueError(f"curriculum step must be > 0, got {self.step}")
        self.best_f = self.initial_f
        self._next = self.c1

    def propose(self) -> float | None:
        if self.done or len(self.evaluated) >= self.max_curricula:
            self.done = True
            return None
        return self._next

    def report(self, c1: float, f: float) -> None:
        if self.done:
            raise ValueError("CurriculumSearch.report: the search is over")
        if self._next is None or _key(c1) != _key(self._next):
            raise ValueError(f"CurriculumSearch.report: expected the result for c1 = {self._next}, got {c1}")
        self.evaluated[_key(c1)] = f
        if f > self.best_f:
            self.best_f, self.best_c1 = f, c1
            nxt = c1 + self.step
        else:
            nxt = c1 - self.step
        if _key(nxt) in self.evaluated:
            self.done = True
            self._next = None
        else:
            self._next = nxt
