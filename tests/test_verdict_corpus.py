"""The math answer reward against the verdict corpus (tests/verdict_corpus.py): every case gets its expected
verdict from ``verify_answer`` and from the full ``math_accuracy`` reward, with the candidate wrapped in a
completion (``\\boxed{}``, ``<answer>`` tags, "The answer is ...", "#### ..."). Runs in one process; the whole
file takes well under a minute on two CPU cores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdict_corpus import AMBIGUOUS, KINDS, Case, build_cases, summary  # noqa: E402

import rlkit_rewards  # noqa: E402
from rlkit_rewards.math import verify_answer  # noqa: E402
from rlkit_rewards.text import extract_answer  # noqa: E402

MIN_PER_KIND = 10
MIN_EACH_VERDICT = 3  # per kind, both verdicts (the non-finite kind is all non-equivalent by construction)


@pytest.fixture(scope="module")
def corpus(data_dir) -> list[Case]:
    for name in ("gsm8k_test.jsonl", "math500_test.jsonl"):
        if not (data_dir / name).is_file():
            pytest.skip(f"{data_dir / name} not found (the verdict corpus is built from it)")
    return build_cases(data_dir)


def _wrap(case: Case, i: int):
    """The candidate inside a completion; the wrapper rotates with the case index."""
    c = case.candidate
    bare_dollar = "$" in c.replace("\\$", "")
    wrappers = [
        lambda: f"Adding the parts gives the result.\nSo the final answer is $\\boxed{{{c}}}$.",
        lambda: f"<think>work it out</think>\n<answer>{c}</answer>",
        lambda: f"We simplify step by step.\nThe answer is {c}.",
        lambda: (f"Therefore, the answer is ${c}$." if not bare_dollar else f"Answer: {c}"),
        lambda: (f"48/2 = 24\n#### {c}" if case.source_id.startswith("gsm8k") else f"\\boxed{{{c}}}"),
        lambda: [{"role": "assistant", "content": f"Thus the answer is \\boxed{{{c}}}."}],
    ]
    return wrappers[i % len(wrappers)]()


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def _report(bad: list[tuple[Case, object]]) -> str:
    return "\n".join(f"  {c.source_id}: gold={c.gold!r} candidate={c.candidate!r} expected={c.expected} got={got}"
                     for c, got in bad)


def test_corpus_size_and_coverage(corpus):
    assert len(corpus) >= 300
    counts = summary(corpus)
    for kind in KINDS:
        eq, ne = counts[kind]
        assert eq + ne >= MIN_PER_KIND, (kind, counts[kind])
        assert ne >= MIN_EACH_VERDICT, (kind, counts[kind])
        if kind != "nonfinite":
            assert eq >= MIN_EACH_VERDICT, (kind, counts[kind])
    share = sum(c.expected for c in corpus) / len(corpus)
    assert 0.35 <= share <= 0.65, share  # roughly balanced
    assert {c.kind for c in corpus} == set(KINDS)
    assert len({(c.gold, c.candidate) for c in corpus}) == len(corpus)  # no duplicates
    assert all(c.gold.strip() != c.candidate.strip() for c in corpus)
    # an ambiguous form never sneaks into the corpus
    ambiguous = {(g, p) for g, p, _ in AMBIGUOUS}
    assert not [c for c in corpus if (c.gold, c.candidate) in ambiguous]


def test_corpus_is_deterministic(corpus, data_dir):
    assert build_cases(data_dir) == corpus


@pytest.mark.parametrize("kind", KINDS)
def test_verify_answer_verdicts(corpus, kind):
    bad = []
    for case in (c for c in corpus if c.kind == kind):
        got = verify_answer(case.gold, case.candidate)
        if got is not case.expected:
            bad.append((case, got))
    assert not bad, f"{len(bad)} wrong verdicts for {kind}:\n{_report(bad)}"


@pytest.mark.parametrize("kind", KINDS)
def test_math_accuracy_reward_verdicts(corpus, kind):
    indexed = [(i, c) for i, c in enumerate(corpus) if c.kind == kind]
    completions = [_wrap(c, i) for i, c in indexed]
    # the wrapper hands back exactly the candidate
    lost = [(c, extract_answer(_text(w))) for (_, c), w in zip(indexed, completions)
            if extract_answer(_text(w)) != c.candidate.strip()]
    assert not lost, f"extract_answer lost candidates:\n{_report(lost)}"
    reward = rlkit_rewards.get("math_accuracy")
    scores = reward(prompts=["q"] * len(indexed), completions=completions, answer=[c.gold for _, c in indexed])
    bad = [(c, s) for (_, c), s in zip(indexed, scores) if s != (1.0 if c.expected else 0.0)]
    assert not bad, f"{len(bad)} wrong rewards for {kind}:\n{_report(bad)}"
