"""Math evaluation (rlkit/eval/math_eval.py): majority pooling, exact verdict counting with a fake
generator, a real run on a tiny random model, and the output files."""

from __future__ import annotations

import json
import re

import pytest

import rlkit.eval.math_eval as me
from rlkit.eval import GenerationSettings, evaluate_rows, majority, write_outputs


# --------------------------------------------------------------------------------------------------
# majority


def test_majority_pools_equal_numbers():
    assert majority(["1,000", "7", "1000", "7", "1000.0"]) == "1,000"  # 3 votes for one thousand
    assert majority(["2", "2.0", "3", "3", "3"]) == "3"
    assert majority(["5", "$5$", "6"]) in ("5", "$5$")
    assert majority(["0.5", "1/2"]) == "0.5"  # not plain numbers both -> not pooled; tie -> first seen


def test_majority_ties_and_none():
    assert majority(["a", "b"]) == "a"
    assert majority(["b", "a", "a", "b"]) == "b"
    assert majority([None, None]) is None
    assert majority([]) is None
    assert majority([None, "4", None]) == "4"
    assert majority(["\\frac{1}{2}", "x", "\\frac{1}{2}"]) == "\\frac{1}{2}"


# --------------------------------------------------------------------------------------------------
# Verdict counting with controlled outputs

ROWS = [
    {"prompt": "p0", "question": "q0", "answer": "1000"},
    {"prompt": "p1", "question": "q1", "answer": "7"},
    {"prompt": "p2", "question": "q2", "answer": "12"},
]
GREEDY = {"p0": "so \\boxed{1,000}", "p1": "the answer is 8.", "p2": "I do not know"}
SAMPLED = {
    "p0": ["#### 1000", "\\boxed{5}", "\\boxed{5}"],                 # any right; majority 5 wrong
    "p1": ["\\boxed{7}", "<answer>7</answer>", "\\boxed{8}"],        # any right; majority 7 right
    "p2": ["nothing", "\\boxed{11}", "<answer>11</answer>"],          # none right
}


@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def fake(model, tokenizer, prompts, settings, num_samples=1, do_sample=False, progress=True, desc="",
             model_path=None):
        calls.append((list(prompts), num_samples, do_sample))
        if do_sample:
            return [SAMPLED[p][:num_samples] for p in prompts]
        return [[GREEDY[p]] for p in prompts]

    monkeypatch.setattr(me, "generate_texts", fake)
    return calls


def test_greedy_verdicts_exact(fake_generate):
    summary, records = evaluate_rows(None, None, ROWS, GenerationSettings(), samples=0, progress=False)
    assert fake_generate == [(["p0", "p1", "p2"], 1, False)]
    assert summary["n"] == 3
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["unparseable"] == pytest.approx(1 / 3)
    assert not any(k.startswith("maj@") for k in summary)
    assert [r["correct"] for r in records] == [True, False, False]
    assert [r["extracted"] for r in records] == ["1,000", "8", None]
    assert records[0] == {"question": "q0", "gold": "1000", "completion": "so \\boxed{1,000}", "extracted": "1,000",
                          "correct": True}


def test_sampled_verdicts_exact(fake_generate):
    summary, records = evaluate_rows(None, None, ROWS, GenerationSettings(temperature=0.7), samples=3, progress=False)
    assert [(n, s) for _, n, s in fake_generate] == [(1, False), (3, True)]
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["pass@3"] == pytest.approx(2 / 3)
    assert summary["maj@3"] == pytest.approx(1 / 3)
    assert summary["pass@1(sampled)"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert summary["samples"] == 3 and summary["temperature"] == 0.7
    assert [r["majority"] for r in records] == ["5", "7", "11"]
    assert [[s["correct"] for s in r["samples"]] for r in records] == [
        [True, False, False], [True, True, False], [False, False, False]]
    assert records[2]["samples"][0] == {"completion": "nothing", "extracted": None, "correct": False}


def test_chat_prompts_are_rendered(char_tokenizer, monkeypatch):
    seen = []
    monkeypatch.setattr(me, "generate_texts", lambda m, t, prompts, *a, **k: seen.extend(prompts) or [["x"] for _ in prompts])

    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "<chat>" + messages[-1]["content"]

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}, {"prompt": "raw", "answer": "2"}]
    evaluate_rows(None, Tok(), rows, progress=False)
    assert seen == ["<chat>hi", "raw"]


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown generation backend"):
        evaluate_rows(None, None, ROWS, GenerationSettings(backend="tgi"), progress=False)


# --------------------------------------------------------------------------------------------------
# Real generation on a tiny random model


def _synthetic_rows(tokenizer, n=4):
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec

    spec = DatasetSpec(name="synthetic", split="test", template="plain", synthetic={"num_test": n, "num_train": 4})
    return build_dataset(spec, tokenizer).to_list()


def test_evaluate_rows_tiny_model(tiny_model):
    model, tok = tiny_model
    model.eval()
    rows = _synthetic_rows(tok, n=5)
    assert len({len(r["prompt"]) for r in rows}) > 1  # prompts of different lengths get sorted and padded
    settings = GenerationSettings(max_new_tokens=8, batch_size=8)
    summary, records = evaluate_rows(model, tok, rows, settings, samples=0, progress=False)
    assert summary["n"] == 5 and 0.0 <= summary["pass@1"] <= 1.0
    assert {"n", "pass@1", "unparseable", "seconds"} <= set(summary)
    assert summary["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 5)
    assert len(records) == 5
    for rec, row in zip(records, rows):
        assert set(rec) == {"question", "gold", "completion", "extracted", "correct"}
        assert rec["gold"] == row["answer"] and rec["question"] == row["question"]
        assert isinstance(rec["completion"], str)
        assert len(tok(rec["completion"], add_special_tokens=False)["input_ids"]) <= 8
    # greedy decoding is deterministic, and completions come back in the rows' order
    again, rec2 = evaluate_rows(model, tok, rows[::-1], settings, progress=False)
    assert [r["completion"] for r in rec2[::-1]] == [r["completion"] for r in records]
    assert tok.padding_side == "left" and not model.training


def test_evaluate_rows_tiny_model_sampled(tiny_model):
    model, tok = tiny_model
    model.train()
    rows = _synthetic_rows(tok, n=3)
    summary, records = evaluate_rows(model, tok, rows, GenerationSettings(max_new_tokens=6, batch_size=4),
                                     samples=2, progress=False)
    assert model.training, "evaluation must restore train mode"
    assert {"pass@1", "pass@2", "maj@2", "pass@1(sampled)", "samples"} <= set(summary)
    assert summary["samples"] == 2
    assert summary["pass@2"] >= summary["pass@1(sampled)"]
    for rec in records:
        assert len(rec["samples"]) == 2 and "majority" in rec
        assert all(set(s) == {"completion", "extracted", "correct"} for s in rec["samples"])


def test_write_outputs(tmp_path, fake_generate):
    summary, records = evaluate_rows(None, None, ROWS, samples=3, progress=False)
    comp, summ = write_outputs(tmp_path / "out" / "eval", summary, records)
    assert comp.name == "completions.jsonl" and summ.name == "summary.json"
    lines = comp.read_text().splitlines()
    assert [json.loads(x) for x in lines] == records
    assert json.loads(summ.read_text()) == summary


# --------------------------------------------------------------------------------------------------
# `rlkit eval` end to end on a saved tiny checkpoint, and its user errors


def test_run_eval_on_saved_checkpoint(tiny_model, tmp_path):
    from rlkit.eval.run import run_eval

    model, tok = tiny_model
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    out = tmp_path / "eval"
    summary = run_eval(model=str(ckpt), benchmark="synthetic", limit=3, max_new_tokens=4, batch_size=4,
                       template="plain", output_dir=str(out))
    assert summary["n"] == 3 and summary["benchmark"] == "synthetic" and summary["model"] == str(ckpt)
    assert len((out / "completions.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["pass@1"] == summary["pass@1"]
    # --synthetic: the task's options (a tiny recipe's operands), so the questions are that distribution's
    from rlkit.cli import main

    out2 = tmp_path / "eval_small"
    assert main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--limit", "20", "--max-new-tokens", "2",
                 "--template", "plain", "--synthetic", "max_operand=5", "--synthetic", "max_ops=2",
                 "--output-dir", str(out2)]) == 0
    questions = [json.loads(x)["question"] for x in (out2 / "completions.jsonl").read_text().splitlines()]
    numbers = [int(n) for q in questions for n in re.findall(r"\d+", q)]
    assert len(questions) == 20 and max(numbers) <= 5 and all(q.count("+") + q.count("-") <= 2 for q in questions)
    assert main(["eval", "--model", str(ckpt), "--benchmark", "gsm8k", "--synthetic", "max_operand=5"]) == 2


@pytest.mark.parametrize("model", ["tiny", "/no/such/model/dir"])
def test_cli_eval_user_errors_exit_2(model, capsys, tmp_path):
    from rlkit.cli import main

    assert main(["eval", "--model", model, "--benchmark", "synthetic", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlkit: error: ") and len(err.splitlines()) == 1, err
