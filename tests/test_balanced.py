"""The balanced selection of scored samples (``data.train.balance``; OREO A.1): at most max_positive positives and
max_negative negatives per prompt, #pos <= max(#neg, 1), the first by sample_index; applied after ``where``."""

from __future__ import annotations

import json
import random

import pytest

from rlkit.data import DataError, balance_rows, load_rows, load_selected_rows
from rlkit.data.balance import balance_counts
from rlkit.recipe import BalanceSpec, DatasetSpec, RecipeError, build, recipe_from_dict


def _rows(spec: dict[int, list[float]], shuffle: int | None = 0) -> list[dict]:
    """prompt_index -> rewards by sample_index; rows shuffled (so order by sample_index is not file order)."""
    rows = [{"prompt_index": p, "sample_index": k, "reward": r, "status": "ok" if r > 0.5 else "wrong",
             "completion": f"p{p}s{k}", "question": f"q{p}", "answer": "1"}
            for p, rewards in spec.items() for k, r in enumerate(rewards)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(rows)
    return rows


def _kept(rows: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    out: dict[int, tuple[list[int], list[int]]] = {}
    for r in rows:
        pos, neg = out.setdefault(r["prompt_index"], ([], []))
        (pos if r["reward"] > 0.5 else neg).append(r["sample_index"])
    return {p: (sorted(a), sorted(b)) for p, (a, b) in out.items()}


def test_the_paper_rule_on_hand_made_rows():
    rows = _rows({
        0: [1, 1, 1, 1, 1],                    # all positive: keeps one
        1: [1, 0, 1, 1, 1, 0, 1, 1],           # 6 pos / 2 neg: keeps 2 / 2
        2: [0, 1, 0, 0, 1, 0, 0, 1, 0, 0],     # 3 pos / 7 neg: keeps 3 / 4
        3: [0, 0, 0, 0, 0, 0],                 # all negative: keeps 4 negatives
        4: [1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # 5 pos / 6 neg: 4 / 4
    })
    kept = balance_rows(rows, BalanceSpec(), log=False)
    assert _kept(kept) == {
        0: ([0], []),
        1: ([0, 2], [1, 5]),
        2: ([1, 4, 7], [0, 2, 3, 5]),
        3: ([], [0, 1, 2, 3]),
        4: ([0, 2, 3, 4], [1, 6, 7, 8]),
    }
    # the first by sample_index, whatever the file order; kept rows stay in input order
    assert kept == [r for r in rows if r in kept]


def test_counts_and_options():
    assert balance_counts(10, 0) == (1, 0) and balance_counts(0, 10) == (0, 4)
    assert balance_counts(6, 2) == (2, 2) and balance_counts(3, 7) == (3, 4) and balance_counts(1, 1) == (1, 1)
    assert balance_counts(8, 8, 2, 6) == (2, 6) and balance_counts(8, 1, 8, 8) == (1, 1)
    rows = _rows({0: [0.2, 0.7, 0.9, 0.1]}, shuffle=None)
    # threshold: positive means reward > threshold
    kept = balance_rows(rows, {"threshold": 0.8, "max_negative": 1}, log=False)
    assert [r["sample_index"] for r in kept] == [0, 2]  # positives: 2 only; one negative kept, so one positive
    kept = balance_rows(rows, {"max_negative": 1}, log=False)
    assert [r["sample_index"] for r in kept] == [0, 1]  # threshold 0.5: 1 and 2 positive, the first kept
    assert balance_rows(rows, None) is rows


def test_rows_without_sample_fields_are_one_clear_error():
    with pytest.raises(DataError, match="has no 'prompt_index' field.*sample"):
        balance_rows([{"question": "q", "answer": "1", "reward": 1.0}], BalanceSpec())
    with pytest.raises(DataError, match="has no 'reward' field"):
        balance_rows([{"prompt_index": 0, "sample_index": 0}], BalanceSpec())
    with pytest.raises(DataError, match=r"row 1 \(prompt_index 0\) has a null reward"):
        balance_rows([{"prompt_index": 0, "reward": 1.0}, {"prompt_index": 0, "reward": None}], BalanceSpec())


def test_recipe_validates_balance_keys():
    spec = build(DatasetSpec, {"name": "jsonl:x.jsonl", "balance": {}})
    assert spec.balance == BalanceSpec(max_positive=4, max_negative=4, threshold=0.5)
    assert build(DatasetSpec, {"name": "jsonl:x.jsonl"}).balance is None
    base = {"method": "sft", "model": {"name": "tiny"}, "trainer": {"max_steps": 1}}
    with pytest.raises(RecipeError, match=r"data\.train\.balance: unknown key 'max_pos'; did you mean 'max_positive'"):
        recipe_from_dict({**base, "data": {"train": {"name": "jsonl:x.jsonl", "balance": {"max_pos": 4}}}})
    with pytest.raises(RecipeError, match=r"data\.train\.balance: max_negative must be >= 0"):
        recipe_from_dict({**base, "data": {"train": {"name": "jsonl:x.jsonl", "balance": {"max_negative": -1}}}})
    with pytest.raises(RecipeError, match=r"data\.train\.balance\.max_positive: expected an integer"):
        recipe_from_dict({**base, "data": {"train": {"name": "jsonl:x.jsonl", "balance": {"max_positive": "4"}}}})


def test_load_rows_applies_where_then_balance(tmp_path, capsys):
    rows = _rows({0: [1, 1, 0, 0, 0], 1: [1, 0, 1, 1, 1]}, shuffle=None)
    for r in rows:
        r["finish_reason"] = "length" if r["sample_index"] == 0 else "stop"
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(name=f"jsonl:{path}", solution_column="completion", where={"finish_reason": "stop"},
                       balance=BalanceSpec(max_positive=2, max_negative=2))
    raw, _, _ = load_selected_rows(spec)
    # where drops sample 0 of each prompt first; then prompt 0 (1 pos / 3 neg) keeps 1 / 2, prompt 1 (3 / 1) 1 / 1
    assert [(r["prompt_index"], r["sample_index"]) for r in raw] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert "kept 5 of 8 rows over 2 prompts (2 positive, 3 negative)" in capsys.readouterr().out
    normal = load_rows(spec)  # the question/answer/solution rows SFT sees
    assert [r["solution"] for r in normal] == ["p0s1", "p0s2", "p0s3", "p1s1", "p1s2"]
    with pytest.raises(DataError, match="has no 'prompt_index' field"):
        load_rows(DatasetSpec(name="synthetic", balance=BalanceSpec(), limit=4))
