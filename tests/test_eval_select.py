"""Best-of-N selection (rlkit/eval/select.py) and ``rlkit eval --samples N --select SPEC``: the selection rules
on hand-made candidates, best-of-n curves, the selector inside ``evaluate_rows`` with controlled samples, and one
end-to-end run on a tiny saved policy with a tiny saved PRM (and ORM)."""

from __future__ import annotations

import json
import math

import pytest

import rlkit.eval.math_eval as me
from rlkit.config import ConfigError
from rlkit.eval.select import Selector, best_of_n, curve_ns, parse_select, select_index

TAG = " @"  # a step tag the character-level tokenizer can write


def cand(correct, extracted=None, score=None):
    return {"correct": correct, "extracted": extracted, "score": score}


# --------------------------------------------------------------------------------------------------
# Parsing and the rules


def test_parse_select():
    assert parse_select("prm:/a/b") == ("prm", "/a/b")
    assert parse_select("orm:runs/x:y") == ("orm", "runs/x:y")  # only the first colon splits
    assert parse_select("majority") == ("majority", None) and parse_select("first") == ("first", None)
    for bad, message in (("best", "use prm:DIR, orm:DIR, majority or first"), ("prm", "needs the model folder"),
                         ("prm:", "needs the model folder"), ("majority:x", "takes no folder")):
        with pytest.raises(ConfigError) as e:
            parse_select(bad)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_select_by_score_ties_and_nan():
    assert select_index([cand(0, score=0.2), cand(1, score=0.9), cand(0, score=0.9)], "score") == 1  # tie: first
    assert select_index([cand(0, score=float("nan")), cand(1, score=-5.0)], "score") == 1  # NaN never wins
    assert select_index([cand(0, score=None), cand(1, score=0.0)], "score") == 1
    assert select_index([cand(0, score=float("nan")), cand(1, score=float("nan"))], "score") == 0
    assert select_index([cand(0, score=3.0)], "score") == 0


def test_select_by_majority_and_first():
    # "1000" and "1,000" pool (equal numbers): 3 votes against 2 for "5"; the first candidate of the bucket wins
    answers = ["5", "1,000", "5", "1000", "1000.0"]
    assert select_index([cand(0, a) for a in answers], "majority") == 1
    assert select_index([cand(0, a) for a in ["b", "a", "a", "b"]], "majority") == 0  # tie: the answer seen first
    assert select_index([cand(0, a) for a in [None, "4", None, "7"]], "majority") == 1
    assert select_index([cand(0, None), cand(0, None)], "majority") == 0  # nothing extracted: the first
    assert select_index([cand(0, "x", 0.1), cand(1, "y", 0.9)], "first") == 0
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_index([cand(0)], "best")
    with pytest.raises(ValueError, match="no candidate"):
        select_index([], "first")


def test_best_of_n_curves_on_hand_made_candidates():
    problems = [
        # scores: the best of the first 1, 2, 4 candidates is #0 (wrong), #1 (right), #3 (wrong)
        [cand(False, "3", 0.1), cand(True, "4", 0.5), cand(True, "4", 0.3), cand(False, "3", 0.8)],
        # the right one comes last: only n = 4 sees it
        [cand(False, "1", 0.4), cand(False, "2", 0.2), cand(False, "1", 0.1), cand(True, "9", 0.9)],
        # all right
        [cand(True, "6", 0.0), cand(True, "6", 0.0), cand(True, "6.0", 0.0), cand(True, "6", 0.0)],
    ]
    assert best_of_n(problems, [1, 2, 4], "score") == {1: 1 / 3, 2: 2 / 3, 4: 2 / 3}
    # majority: p0 n=2 is a 1-1 tie -> "3" (seen first, wrong); n=4 a 2-2 tie -> "3"; p1 majority "1" (wrong)
    assert best_of_n(problems, [1, 2, 4], "majority") == {1: 1 / 3, 2: 1 / 3, 4: 1 / 3}
    assert best_of_n(problems, [1, 4], "first") == {1: 1 / 3, 4: 1 / 3}
    with pytest.raises(ValueError, match="fewer than n = 5"):
        best_of_n(problems, [5])
    with pytest.raises(ValueError, match="at least 1"):
        best_of_n(problems, [0])
    assert curve_ns(16) == [1, 2, 4, 8, 16] and curve_ns(6) == [1, 2, 4, 6] and curve_ns(1) == [1]


# --------------------------------------------------------------------------------------------------
# The selector inside evaluate_rows (controlled samples)

ROWS = [{"prompt": "p0", "question": "q0", "answer": "1000"}, {"prompt": "p1", "question": "q1", "answer": "7"},
        {"prompt": "p2", "question": "q2", "answer": "12"}]
SAMPLED = {"p0": ["#### 1000", "\\boxed{5}", "\\boxed{5}"],           # majority 5: wrong
           "p1": ["\\boxed{8.0}", "<answer>7</answer>", "\\boxed{7}"],  # majority 7: right
           "p2": ["nothing", "<answer>12</answer>", "\\boxed{12}"]}       # majority 12: right


@pytest.fixture
def fake_generate(monkeypatch):
    def fake(model, tokenizer, prompts, settings, num_samples=1, do_sample=False, progress=True, desc="",
             model_path=None):
        return [SAMPLED[p][:num_samples] if do_sample else ["x"] for p in prompts]

    monkeypatch.setattr(me, "generate_texts", fake)


class LengthPRM:
    """A PRM-like scorer: steps are lines, a step scores 1 / (its length); aggregate min (as a PRM)."""

    aggregate = "min"

    def __init__(self):
        self.calls = 0

    def split(self, text):
        from rlkit.rollout.steps import split_steps

        return split_steps(text, "newline")

    def score_batch(self, prompts, steps_lists):
        self.calls += 1
        return [[1 / len(s) for s in steps] for steps in steps_lists]


def test_selectors_in_evaluate_rows(fake_generate):
    summary, records = me.evaluate_rows(None, None, ROWS, samples=3, progress=False, selector=Selector("majority"))
    assert summary["bon@3"] == summary["maj@3"] == pytest.approx(2 / 3) and summary["select"] == "majority"
    assert [r["selected"] for r in records] == [1, 1, 1] and [r["bon_correct"] for r in records] == [False, True, True]
    # n = 2: p0's 1-1 tie goes to "1000" (seen first, right), p1's to "8.0" (wrong), p2's only answer is 12
    assert summary["bon_curve"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3), "3": pytest.approx(2 / 3)}
    summary, records = me.evaluate_rows(None, None, ROWS, samples=3, progress=False, selector=Selector("first"))
    assert summary["bon@3"] == pytest.approx(1 / 3) and [r["selected"] for r in records] == [0, 0, 0]
    prm = LengthPRM()
    summary, records = me.evaluate_rows(None, None, ROWS, samples=3, progress=False,
                                        selector=Selector("prm", prm, "DIR"))
    assert prm.calls == 1 and summary["select"] == "prm:DIR"  # one batch for every candidate of every problem
    # the shortest completion scores highest: "#### 1000" (9 characters, tied with "\\boxed{5}": the first wins),
    # "\\boxed{7}" (9), "nothing" (7)
    assert [r["selected"] for r in records] == [0, 2, 0] and [r["bon_correct"] for r in records] == [True, True, False]
    assert summary["bon@3"] == pytest.approx(2 / 3)
    s = records[0]["samples"][0]
    assert s["step_scores"] == [1 / 9] and s["score"] == 1 / 9 and s["steps"] == 1
    assert set(s) == {"completion", "extracted", "correct", "steps", "step_scores", "score"}
    with pytest.raises(ValueError, match="needs samples"):
        me.evaluate_rows(None, None, ROWS, samples=0, progress=False, selector=Selector("first"))


# --------------------------------------------------------------------------------------------------
# End to end: rlkit eval --samples N --select prm:DIR on a tiny saved policy and PRM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch
    from conftest import TINY_SHAPE

    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.process_reward import ProcessRewardModel
    from rlkit.recipe import TinyModelSpec

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    root = tmp_path_factory.mktemp("select")
    policy = build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=0)
    policy.save_pretrained(root / "policy", safe_serialization=True)
    tok.save_pretrained(root / "policy")
    for kind, seed in (("prm", 1), ("orm", 2)):
        lm = build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=seed)
        with torch.no_grad():  # wider weights: the scores differ between candidates
            for p in lm.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        ProcessRewardModel(lm, tok, step_tag=TAG, kind=kind).save_pretrained(root / kind)
    return {k: str(root / k) for k in ("policy", "prm", "orm")}


def _run(saved, tmp_path, select, capsys):
    from rlkit.cli import main

    out = tmp_path / select.split(":")[0]
    argv = ["eval", "--model", saved["policy"], "--benchmark", "synthetic", "--limit", "3", "--template", "plain",
            "--samples", "4", "--temperature", "1.0", "--max-new-tokens", "10", "--select", select,
            "--output-dir", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    return printed, records


def test_eval_select_prm_end_to_end(saved, tmp_path, capsys):
    from rlkit.process_reward import ProcessRewardModel

    summary, records = _run(saved, tmp_path, f"prm:{saved['prm']}", capsys)
    assert summary["select"] == f"prm:{saved['prm']}" and set(summary["bon_curve"]) == {"1", "2", "4"}
    assert summary["bon@4"] == sum(r["bon_correct"] for r in records) / 3
    prm = ProcessRewardModel.from_pretrained(saved["prm"])
    assert all(len(r["samples"]) == 4 for r in records)
    for rec in records:
        texts = [s["completion"] for s in rec["samples"]]
        steps = [prm.split(t) for t in texts]
        assert [s["steps"] for s in rec["samples"]] == [len(x) for x in steps]
        for s in rec["samples"]:
            assert s["score"] == (min(s["step_scores"]) if s["step_scores"] else 0.0)
        scores = [s["score"] for s in rec["samples"]]
        assert rec["selected"] == scores.index(max(scores))
        assert rec["bon_correct"] == rec["samples"][rec["selected"]]["correct"]
    assert len({s["score"] for r in records for s in r["samples"]}) > 1, "the check needs scores that differ"
    # the written scores are the PRM's own solution scores of the rendered prompts
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec

    rows = build_dataset(DatasetSpec(name="synthetic", split="test", limit=3, template="plain"), prm.tokenizer)
    rendered = [r["prompt"] for r in rows.to_list()]
    rec = records[0]
    texts = [s["completion"] for s in rec["samples"]]
    expected = prm.solution_scores([rendered[0]] * 4, [prm.split(t) for t in texts])
    assert [s["score"] for s in rec["samples"]] == pytest.approx(expected, abs=1e-6)


def test_eval_select_orm_and_kind_mismatch(saved, tmp_path, capsys):
    from rlkit.cli import main

    summary, records = _run(saved, tmp_path, f"orm:{saved['orm']}", capsys)
    assert all(len(s["step_scores"]) == 1 for r in records for s in r["samples"] if s["completion"])
    assert not math.isnan(summary["bon@4"])
    argv = ["eval", "--model", saved["policy"], "--benchmark", "synthetic", "--limit", "1", "--samples", "2",
            "--select", f"prm:{saved['orm']}", "--output-dir", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is an ORM" in err and f"orm:{saved['orm']}" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("extra, message", [
    (["--select", "majority"], "give --samples N"),
    (["--samples", "2", "--select", "prm:POLICY"], "not a PRM/ORM folder"),
    (["--samples", "2", "--select", "vote"], "use prm:DIR, orm:DIR, majority or first"),
    (["--samples", "2", "--select", "first", "--decoder", "value_search", "--value-model", "x"], "give --samples N"),
])
def test_eval_select_user_errors(extra, message, saved, tmp_path, capsys):
    from rlkit.cli import main

    extra = [x.replace("POLICY", saved["policy"]) for x in extra]
    argv = ["eval", "--model", saved["policy"], "--benchmark", "synthetic", "--output-dir", str(tmp_path), *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlkit: error: ") and len(err.splitlines()) == 1 and message in err, err
