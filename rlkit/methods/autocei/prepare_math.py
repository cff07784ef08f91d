"""The released Auto-CEI MATH data (``data/MATH/data_pre.py``): the 7,500 MATH training problems split 90/10 into
train and validation (seed 42), the prompt = the problem plus the released format instruction, the target = the
reference solution with ". " replaced by ".\\n" and ``"\\n#### {answer}."`` appended (the released ``<|eot_id|>`` is
the tokenizer's EOS, added by SFT). Writes ``MATH_train.jsonl`` and ``MATH_val.jsonl`` (``question``, ``answer``,
``solution``) for ``recipes/autocei/llama3.1-8b_math.yaml``:

    python -m rlkit.methods.autocei.prepare_math data/autocei [--path math_train.jsonl]

The MATH train split comes from the hub (``DigitalLearningGmbH/MATH-lighteval``) or a local jsonl (``--path``,
or ``$RLKIT_DATA_DIR/math_train.jsonl``). The split uses Python's ``random.Random(42)`` shuffle, not the released
``datasets.train_test_split(test_size=0.1, seed=42)`` (numpy's permutation): the same sizes, other problems.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "\nThink step by step and use the format of '#### {final answer}. ' to complete your answer."
"""What the released data_pre.py appends to every problem (its ``<|eot_id|>`` left out: the chat template ends
the turn)."""


def released_rows(rows: list[dict]) -> list[dict]:
    """``question`` / ``answer`` / ``solution`` rows in the released format from normalised MATH rows."""
    return [{"question": r["question"] + INSTRUCTION, "answer": r["answer"],
             "solution": r["solution"].replace(". ", ".\n") + f"\n#### {r['answer']}."} for r in rows]


def split(rows: list[dict], val_fraction: float = 0.1, seed: int = 42) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_fraction)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def main(argv: list[str] | None = None) -> None:
    from ...data import load_rows
    from ...recipe import DatasetSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for MATH_train.jsonl and MATH_val.jsonl")
    p.add_argument("--path", default=None, help="a local MATH train jsonl (default: $RLKIT_DATA_DIR or the hub)")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    rows = released_rows(load_rows(DatasetSpec(name="math", split="train", path=a.path)))
    train, val = split(rows, seed=a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("MATH_train.jsonl", train), ("MATH_val.jsonl", val)):
        with (a.out / name).open("w") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(train)} train and {len(val)} validation problems in {a.out}")


if __name__ == "__main__":
    main()
