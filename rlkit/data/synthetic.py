"""Synthetic multi-step arithmetic with written step-by-step solutions, generated from a seed.

A problem is a left-to-right chain such as ``37+18-9``; its solution writes one line per operation
(``37+18=55``, ``55-9=46``) and ends with ``#### 46`` (GSM8K style, so the same answer extraction and
rewards serve both). Train and test rows come from disjoint problem sets drawn from separate seeds.
Used for offline runs: the quickstart, the launch tests and the benchmarks.

Imperfect demonstrations (``slip_rate``): real SFT data (scraped or model-written solutions) carries
systematic mistakes, and learning past them from a verifier is what RL with verifiable rewards adds over
SFT. With ``slip_rate = p``, a *train* solution whose last operation is a subtraction writes that
result one too high with probability p (the ``#### x`` line follows the slip), as a sloppy annotator
would. The ``answer`` column always holds the true result, and test rows are never slipped, so rewards
and evaluation stay exact. Off by default; the quickstart turns it on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic task. Defaults give 2-3 operations on operands up to 99."""

    num_train: int = 4000
    num_test: int = 200
    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 99
    ops: str = "+-"
    allow_negative: bool = False
    """If false, subtractions are drawn so no intermediate result is negative."""
    slip_rate: float = 0.0
    """Probability that a train solution ending in a subtraction writes its last result off by +1."""


def _problem(rng: random.Random, cfg: SyntheticConfig, slip: bool = False) -> tuple[str, str, int, str]:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    value = rng.randint(1, cfg.max_operand)
    question = str(value)
    lines = []
    for _ in range(n_ops):
        op = rng.choice(cfg.ops)
        if op == "-" and not cfg.allow_negative:
            operand = rng.randint(0, min(value, cfg.max_operand))
        elif op == "*":
            operand = rng.randint(2, 9)
        else:
            operand = rng.randint(1, cfg.max_operand)
        new = value + operand if op == "+" else value - operand if op == "-" else value * operand
        lines.append(f"{value}{op}{operand}={new}")
        question += f"{op}{operand}"
        value = new
    exact = "\n".join(lines) + f"\n#### {value}"
    written = value
    if slip and op == "-" and rng.random() < cfg.slip_rate:
        written = value + 1
        lines[-1] = lines[-1].rsplit("=", 1)[0] + f"={written}"
    solution = "\n".join(lines) + f"\n#### {written}"
    return question, solution, value, exact


def generate(cfg: SyntheticConfig | None = None, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows ``{"question", "solution", "answer", "reference"}`` for ``split`` ("train" or "test"), deterministic
    in seed. ``reference`` is the exact solution (``solution`` with any slip undone): a verified reference
    chain for methods such as StepHint.

    The test split never contains a train question: test questions are drawn first and reserved.
    """
    cfg = cfg or SyntheticConfig()
    if split not in ("train", "test"):
        raise ValueError(f"synthetic split must be 'train' or 'test', got {split!r}")
    bad = set(cfg.ops) - set("+-*")
    if bad or not cfg.ops:
        raise ValueError(f"synthetic ops must be drawn from '+-*', got {cfg.ops!r}")
    if not 0.0 <= cfg.slip_rate <= 1.0:
        raise ValueError(f"synthetic slip_rate must be in [0, 1], got {cfg.slip_rate}")
    test_rng = random.Random(f"rlkit-synthetic-test-{seed}")
    test, seen = [], set()
    while len(test) < cfg.num_test:
        q, s, a, exact = _problem(test_rng, cfg)
        if q not in seen:
            seen.add(q)
            test.append({"question": q, "solution": s, "answer": str(a), "reference": exact})
    if split == "test":
        return test
    train_rng = random.Random(f"rlkit-synthetic-train-{seed}")
    train = []
    attempts = 0
    while len(train) < cfg.num_train:
        attempts += 1
        if attempts > 50 * cfg.num_train + 1000:
            raise ValueError("synthetic task too small for the requested num_train; raise max_operand or max_ops")
        q, s, a, exact = _problem(train_rng, cfg, slip=cfg.slip_rate > 0)
        if q not in seen:
            train.append({"question": q, "solution": s, "answer": str(a), "reference": exact})
    return train
