"""Known math benchmarks: where they live on the hub, their columns, and gold-answer extraction.

Each loader yields rows ``{"question", "answer", "solution"?}`` with the gold answer as a string:
GSM8K takes the text after ``####`` with thousands separators removed; MATH-500 and AIME24 use the
``answer`` field (falling back to the last ``\\boxed{}`` of the solution); AMC23 stores floats such as
``27.0``, which become ``27``; full MATH (``math``, train/test, for RL training) takes the last
``\\boxed{}`` of the reference solution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlkit_rewards.text import last_boxed


class DataError(ValueError):
    """A dataset problem the user can fix (missing file, missing column, unknown set)."""


def gsm8k_gold(answer: str) -> str:
    if "####" not in answer:
        raise ValueError("no '####' line")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def math_gold(answer: str) -> str:
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()


def amc_gold(answer) -> str:
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


@dataclass
class Benchmark:
    name: str
    hub_id: str
    hub_config: str | None
    hub_split: dict[str, str]
    question_column: str
    answer_column: str
    solution_column: str | None
    gold: Callable
    local_files: dict[str, str] = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", "openai/gsm8k", "main", {"train": "train", "test": "test"}, "question", "answer",
                       "answer", gsm8k_gold, {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}),
    "math500": Benchmark("math500", "HuggingFaceH4/MATH-500", None, {"test": "test"}, "problem", "answer",
                         "solution", math_gold, {"test": "math500_test.jsonl"}),
    "aime24": Benchmark("aime24", "HuggingFaceH4/aime_2024", None, {"test": "train"}, "problem", "answer",
                        "solution", math_gold, {"test": "aime24_test.jsonl"}),
    "amc23": Benchmark("amc23", "math-ai/amc23", None, {"test": "test"}, "question", "answer", None, amc_gold,
                       {"test": "amc23_test.jsonl"}),
    # Full MATH (Hendrycks et al.): 7,500 train / 5,000 test problems; the gold answer is the last
    # \boxed{} of the reference solution. Used as RL training data (MATH-500 is a subset of its test split).
    "math": Benchmark("math", "DigitalLearningGmbH/MATH-lighteval", "default", {"train": "train", "test": "test"},
                      "problem", "solution", "solution", math_gold,
                      {"train": "math_train.jsonl", "test": "math_test.jsonl"}),
}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} not found")
    rows = []
    with p.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {i + 1} is not valid JSON ({e})") from None
    return rows


def local_file(bench: Benchmark, split: str, path: str | None) -> Path | None:
    """A local jsonl for ``bench``/``split``: ``path`` itself if it is a file, ``path/<file>`` if it is a
    folder, else ``$RLKIT_DATA_DIR/<file>`` when that exists."""
    fname = bench.local_files.get(split)
    if path:
        p = Path(path)
        if p.is_dir():
            if not fname:
                raise DataError(f"{bench.name} has no {split!r} split (splits: {', '.join(bench.local_files)})")
            return p / fname
        return p
    env = os.environ.get("RLKIT_DATA_DIR")
    if env and fname and (Path(env) / fname).is_file():
        return Path(env) / fname
    return None


def load_hub(hub_id: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a hard dependency
        raise DataError("loading from the hub needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        raise DataError(
            f"could not load {hub_id!r} (split {split!r}) from the hub: {type(e).__name__}: {e}. "
            "Offline? Point `path:` at a local jsonl copy, or set RLKIT_DATA_DIR."
        ) from None
    return [dict(r) for r in ds]


def extract_rows(rows: list[dict], question_col: str, answer_col: str | None, solution_col: str | None,
                 gold: Callable | None, source: str) -> list[dict]:
    """Normalize raw rows to ``question``/``answer``/``solution``; a missing column names the row."""
    out = []
    for i, row in enumerate(rows):
        if question_col not in row or row[question_col] in (None, ""):
            raise DataError(f"{source}: row {i} has no {question_col!r} column (columns: {sorted(row)})")
        item = {"question": str(row[question_col])}
        if answer_col is not None:
            if answer_col not in row or row[answer_col] is None:
                raise DataError(f"{source}: row {i} has no {answer_col!r} column (columns: {sorted(row)})")
            try:
                item["answer"] = gold(row[answer_col]) if gold else str(row[answer_col]).strip()
            except ValueError as e:
                raise DataError(f"{source}: row {i}: cannot extract the gold answer from {answer_col!r}: {e}") from None
        if solution_col is not None:
            if solution_col not in row or row[solution_col] is None:
                raise DataError(f"{source}: row {i} has no {solution_col!r} column (columns: {sorted(row)})")
            item["solution"] = str(row[solution_col])
        out.append(item)
    return out
