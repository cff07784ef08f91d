"""Datasets (rlkit/data): benchmark gold extraction on the real files, column errors, jsonl loading,
the synthetic arithmetic task and the prompt templates."""

from __future__ import annotations

import json
import re

import pytest

from rlkit.data import DataError, SyntheticConfig, build_dataset, format_prompt, load_rows, resolve_template
from rlkit.data.benchmarks import amc_gold, gsm8k_gold, math_gold
from rlkit.data.synthetic import generate
from rlkit.data.templates import BOXED_INSTRUCTION
from rlkit.recipe import DatasetSpec

INT_RE = re.compile(r"^-?\d+$")


def raw_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Gold-answer extraction


def test_gold_helpers():
    assert gsm8k_gold("so 999+1=<<999+1=1000>>1000\n#### 1,000") == "1000"
    assert gsm8k_gold("#### -12") == "-12"
    with pytest.raises(ValueError):
        gsm8k_gold("no final line")
    assert math_gold("\\frac{1}{2}") == "\\frac{1}{2}"
    assert math_gold("so it is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert amc_gold(27.0) == "27" and amc_gold(-1.0) == "-1" and amc_gold(2.5) == "2.5" and amc_gold("7") == "7"


@pytest.mark.parametrize("split, fname, n", [("train", "gsm8k_train.jsonl", 7473), ("test", "gsm8k_test.jsonl", 1319)])
def test_gsm8k_real_files(data_file, split, fname, n):
    path = data_file(fname)
    raw = raw_rows(path)
    rows = load_rows(DatasetSpec(name="gsm8k", split=split, path=str(path.parent)))
    assert len(rows) == len(raw) == n
    with_commas = 0
    for r, src in zip(rows, raw):
        final = src["answer"].rsplit("####", 1)[1].strip()
        with_commas += "," in final
        assert r["answer"] == final.replace(",", "")
        assert INT_RE.match(r["answer"]) or re.match(r"^-?\d+\.\d+$", r["answer"]), r["answer"]
        assert r["question"] == src["question"] and r["solution"] == src["answer"]
    assert with_commas > 0  # the real data has "#### 1,000"-style answers; they must come out without commas
    # a specific comma row, checked exactly
    i = next(i for i, s in enumerate(raw) if "," in s["answer"].rsplit("####", 1)[1])
    assert "," not in rows[i]["answer"] and rows[i]["answer"] in raw[i]["answer"].replace(",", "")


def test_gsm8k_via_env_var_and_file_path(data_file, monkeypatch):
    path = data_file("gsm8k_test.jsonl")
    monkeypatch.setenv("RLKIT_DATA_DIR", str(path.parent))
    via_env = load_rows(DatasetSpec(name="gsm8k", split="test", limit=5))
    via_file = load_rows(DatasetSpec(name="gsm8k", split="test", path=str(path), limit=5))
    assert via_env == via_file and len(via_env) == 5
    assert via_env[0]["answer"] == raw_rows(path)[0]["answer"].rsplit("####", 1)[1].strip().replace(",", "")


def test_math500_answer_field(data_file):
    path = data_file("math500_test.jsonl")
    raw = raw_rows(path)
    rows = load_rows(DatasetSpec(name="math500", split="test", path=str(path.parent)))
    assert len(rows) == len(raw) == 500
    assert all(r["answer"] == s["answer"].strip() for r, s in zip(rows, raw))
    assert all(r["question"] == s["problem"] and r["solution"] == s["solution"] for r, s in zip(rows, raw))
    assert rows[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_amc23_float_answers(data_file):
    path = data_file("amc23_test.jsonl")
    raw = raw_rows(path)
    assert isinstance(raw[0]["answer"], float) and raw[0]["answer"] == 27.0
    rows = load_rows(DatasetSpec(name="amc23", split="test", path=str(path.parent)))
    assert len(rows) == 40
    assert rows[0]["answer"] == "27"
    for r, s in zip(rows, raw):
        assert INT_RE.match(r["answer"]), r["answer"]
        assert int(r["answer"]) == s["answer"]
        assert "solution" not in r


def test_aime24(data_file):
    path = data_file("aime24_test.jsonl")
    raw = raw_rows(path)
    rows = load_rows(DatasetSpec(name="aime24", split="test", path=str(path.parent)))
    assert len(rows) == 30
    assert rows[0]["answer"] == "204"
    for r, s in zip(rows, raw):
        assert r["answer"] == s["answer"] and 0 <= int(r["answer"]) <= 999
        assert r["question"] == s["problem"] and r["solution"]


def test_limit_and_unknown_split(data_file):
    path = data_file("math500_test.jsonl")
    assert len(load_rows(DatasetSpec(name="math500", split="test", path=str(path.parent), limit=7))) == 7
    with pytest.raises(DataError, match="no 'train' split"):
        load_rows(DatasetSpec(name="math500", split="train", path=str(path.parent)))


# --------------------------------------------------------------------------------------------------
# Local jsonl files and column errors


def test_missing_column_names_row_and_column(write_jsonl):
    p = write_jsonl([{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}, {"question": "3+3"}])
    with pytest.raises(DataError) as exc:
        load_rows(DatasetSpec(name=f"jsonl:{p}"))
    msg = str(exc.value)
    assert "row 2" in msg and "'answer'" in msg and str(p) in msg


def test_missing_question_in_benchmark_file(write_jsonl):
    p = write_jsonl([{"question": "q", "answer": "x #### 1"}, {"problem": "q2", "answer": "#### 2"}])
    with pytest.raises(DataError, match=r"row 1 has no 'question' column"):
        load_rows(DatasetSpec(name="gsm8k", split="test", path=str(p)))


def test_gsm8k_row_without_final_answer(write_jsonl):
    p = write_jsonl([{"question": "q", "answer": "x #### 1"}, {"question": "q2", "answer": "no hashes"}])
    with pytest.raises(DataError, match=r"row 1: cannot extract the gold answer"):
        load_rows(DatasetSpec(name="gsm8k", split="test", path=str(p)))


def test_jsonl_loading_with_custom_columns(write_jsonl):
    p = write_jsonl([{"q": "What is 2+3?", "gold": 5, "why": "2+3=5"}, {"q": "What is 7-1?", "gold": " 6 ", "why": "7-1=6"}])
    rows = load_rows(DatasetSpec(name=f"jsonl:{p}", question_column="q", answer_column="gold", solution_column="why"))
    assert rows == [
        {"question": "What is 2+3?", "answer": "5", "solution": "2+3=5"},
        {"question": "What is 7-1?", "answer": "6", "solution": "7-1=6"},
    ]
    # default column names
    p2 = write_jsonl([{"question": "a", "answer": "1"}], name="plain.jsonl")
    assert load_rows(DatasetSpec(name=f"jsonl:{p2}")) == [{"question": "a", "answer": "1"}]


def test_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(DatasetSpec(name=f"jsonl:{tmp_path / 'nope.jsonl'}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_rows(DatasetSpec(name=f"jsonl:{bad}"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(DatasetSpec(name=f"jsonl:{empty}"))


# --------------------------------------------------------------------------------------------------
# Synthetic task

CFG = dict(num_train=300, num_test=50, min_ops=1, max_ops=4, max_operand=99, ops="+-*")
LINE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def test_synthetic_deterministic_from_seed():
    cfg = SyntheticConfig(**CFG)
    a = generate(cfg, "train", seed=0)
    assert a == generate(cfg, "train", seed=0)
    assert generate(cfg, "test", seed=0) == generate(cfg, "test", seed=0)
    assert a != generate(cfg, "train", seed=1)
    assert len(a) == 300 and len(generate(cfg, "test", seed=0)) == 50


def test_synthetic_train_test_disjoint():
    cfg = SyntheticConfig(**CFG)
    train = {r["question"] for r in generate(cfg, "train", seed=3)}
    test = [r["question"] for r in generate(cfg, "test", seed=3)]
    assert len(set(test)) == len(test)
    assert not train & set(test)


@pytest.mark.parametrize("ops, allow_negative", [("+-*", False), ("+-", True), ("*", False)])
def test_synthetic_solutions_are_correct(ops, allow_negative):
    cfg = SyntheticConfig(**dict(CFG, ops=ops, allow_negative=allow_negative))
    for split in ("train", "test"):
        for row in generate(cfg, split, seed=5):
            *steps, final = row["solution"].split("\n")
            assert cfg.min_ops <= len(steps) <= cfg.max_ops
            m = re.fullmatch(r"#### (-?\d+)", final)
            assert m and m.group(1) == row["answer"], row
            value = None
            question = ""
            for line in steps:
                lm = LINE.match(line)
                assert lm, line
                a, op, b, c = int(lm[1]), lm[2], int(lm[3]), int(lm[4])
                assert op in ops
                assert c == (a + b if op == "+" else a - b if op == "-" else a * b), line
                if value is None:
                    question = str(a)
                else:
                    assert a == value, "each step starts from the previous result"
                if not allow_negative:
                    assert c >= 0
                question += f"{op}{b}"
                value = c
            assert str(value) == row["answer"]
            assert row["question"] == question


def test_synthetic_through_load_rows():
    spec = DatasetSpec(name="synthetic", split="test", seed=2, synthetic={"num_test": 12, "num_train": 10})
    rows = load_rows(spec)
    assert len(rows) == 12 and rows == generate(SyntheticConfig(num_test=12, num_train=10), "test", seed=2)
    with pytest.raises(DataError, match="data.synthetic"):
        load_rows(DatasetSpec(name="synthetic", synthetic={"num_trian": 3}))
    with pytest.raises(DataError, match="data.synthetic"):
        load_rows(DatasetSpec(name="synthetic", split="validation", synthetic={"num_test": 5}))


# --------------------------------------------------------------------------------------------------
# Templates and build_dataset


def test_templates():
    q = "What is 2+3?"
    assert format_prompt(q, "plain") == "Question: What is 2+3?\nAnswer: "
    chat = format_prompt(q, "chat")
    assert chat == [{"role": "user", "content": f"{q}\n{BOXED_INSTRUCTION}"}]
    assert "\\boxed{}" in BOXED_INSTRUCTION
    chat = format_prompt(q, "chat", system_prompt="Be brief.")
    assert chat[0] == {"role": "system", "content": "Be brief."} and chat[1]["role"] == "user"
    think = format_prompt(q, "think_answer")
    assert isinstance(think, str) and think.endswith(f"{q} Assistant: <think>")
    assert "<answer> answer here </answer>" in think and "\\boxed{}" in think  # braces not eaten by format
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt(q, "fancy")


def test_build_dataset(char_tokenizer):
    spec = DatasetSpec(name="synthetic", split="test", template="auto", synthetic={"num_test": 6, "num_train": 6})
    assert resolve_template("auto", char_tokenizer) == "plain"  # char tokenizer has no chat template
    ds = build_dataset(spec, char_tokenizer)
    assert len(ds) == 6 and {"prompt", "question", "answer", "solution"} <= set(ds.column_names)
    assert all(r["prompt"] == f"Question: {r['question']}\nAnswer: " for r in ds)
    think = build_dataset(DatasetSpec(name="synthetic", split="test", template="think_answer",
                                      synthetic={"num_test": 6, "num_train": 6}), char_tokenizer)
    assert think[0]["prompt"].endswith("Assistant: <think>")
    with pytest.raises(DataError, match="no chat template"):
        build_dataset(DatasetSpec(name="synthetic", split="test", template="chat",
                                  synthetic={"num_test": 6, "num_train": 6}), char_tokenizer)


def test_build_dataset_shuffle_is_seeded():
    base = dict(name="synthetic", split="test", synthetic={"num_test": 30, "num_train": 6}, template="plain")
    plain = build_dataset(DatasetSpec(**base))["question"]
    s1 = build_dataset(DatasetSpec(**base), shuffle=True)["question"]
    assert s1 == build_dataset(DatasetSpec(**base), shuffle=True)["question"]
    assert s1 != plain and sorted(s1) == sorted(plain)


def test_where_keeps_only_matching_rows(tmp_path):
    """`where:` filters the stored rows (e.g. a sample stage's `status: ok`) before `limit`; a field no row has
    is one clear error, not an empty selection."""
    import json

    from rlkit.data import DataError, load_rows
    from rlkit.recipe import DatasetSpec

    path = tmp_path / "samples.jsonl"
    rows = [{"question": f"q{i}", "answer": str(i), "status": "ok" if i % 3 == 0 else "wrong", "k": i % 2}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(DatasetSpec(name=f"jsonl:{path}", where={"status": "ok"}))
    assert [r["question"] for r in got] == ["q0", "q3", "q6", "q9"]
    got = load_rows(DatasetSpec(name=f"jsonl:{path}", where={"status": ["ok", "wrong"], "k": 1}, limit=2))
    assert [r["question"] for r in got] == ["q1", "q3"]
    with pytest.raises(DataError, match="has no field 'stauts'"):
        load_rows(DatasetSpec(name=f"jsonl:{path}", where={"stauts": "ok"}))
    with pytest.raises(DataError, match="no row matches"):
        load_rows(DatasetSpec(name=f"jsonl:{path}", where={"status": "timeout"}))
