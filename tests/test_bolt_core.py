"""BOLT's pure pieces: the thought/solution format and its filter, the global percentile cut with best per
query, and the best/worst DPO pairs (rlkit.methods.bolt.core)."""

from __future__ import annotations

import pytest

from rlkit.methods.bolt.core import ThoughtFormat, bootstrap_select, dpo_pair, percentile


def test_format_round_trip_and_violations():
    fmt = ThoughtFormat()
    text = fmt.render(" plan: add, then check ", "The answer is 4.")
    assert fmt.parse(text) == ("plan: add, then check", "The answer is 4.")
    assert fmt.parse("The answer is 4.") is None  # no thoughts
    assert fmt.parse(f"{fmt.start}\nthink\n") is None  # no end marker
    assert fmt.parse(f"{fmt.start}\n\n{fmt.end}\nsolution") is None  # empty thoughts
    assert fmt.parse(f"{fmt.start} t {fmt.end}") is None  # no solution
    assert fmt.parse(f"pre {fmt.start} t {fmt.end} s") is None  # thoughts not first
    assert fmt.parse(f"{fmt.start} t {fmt.end} s {fmt.start} u {fmt.end}") is None  # two blocks
    custom = ThoughtFormat("<think>", "</think>")
    assert custom.parse("<think>a</think>b") == ("a", "b")
    with pytest.raises(ValueError):
        ThoughtFormat("x", "x")


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4, 5], 30) == pytest.approx(2.2)
    assert percentile([10], 30) == 10 and percentile([0, 10], 100) == 10
    with pytest.raises(ValueError):
        percentile([], 30)


def test_bootstrap_keeps_the_best_above_the_global_cut_per_query():
    queries = ["a", "a", "a", "b", "b", "c", "c"]
    scores = [0.9, 0.5, 0.95, 0.1, 0.2, 0.7, 0.99]
    valid = [True, True, True, True, True, True, False]  # c's 0.99 breaks the format
    # the cut: 30th percentile of the valid scores [0.1, 0.2, 0.5, 0.7, 0.9, 0.95] = 0.35
    assert percentile([s for s, v in zip(scores, valid) if v], 30) == pytest.approx(0.35)
    assert bootstrap_select(queries, scores, valid) == [2, 5]  # a's best 0.95; b below the cut; c's valid 0.7
    assert bootstrap_select(["a", "a"], [0.5, 0.5], [True, True]) == [0]  # ties: the earlier
    assert bootstrap_select(["a"], [1.0], [False]) == []


def test_dpo_pairs_are_best_and_worst_with_format_violators_lowest():
    assert dpo_pair([0.2, 0.9, 0.5, 0.1], [True] * 4) == (1, 3)
    assert dpo_pair([0.2, 0.9, 0.5, 0.1], [True, False, True, True]) == (2, 1)  # the violator is rejected
    assert dpo_pair([0.5, 0.5, 0.5], [True] * 3) is None
    assert dpo_pair([0.9, 0.9, 0.1, 0.1], [True] * 4) == (0, 3)  # first best, last worst
