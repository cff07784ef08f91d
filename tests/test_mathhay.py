"""MathHay: generated items (program answer = stored answer; needed quantities only in the relevant documents),
haystack lengths in SmolLM2's tokens, placements, the solution-program evaluator (never executes), answer
extraction and scoring edge cases, the judge hook, the released-format loader and the build stage's config."""

from __future__ import annotations

import json
import re

import pytest

from rlkit.data import mathhay as mh
from rlkit.eval import mathhay as ev


@pytest.fixture(scope="module")
def char_tok():
    from rlkit.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from rlkit.models import load_tokenizer
    from rlkit.recipe import ModelSpec

    return load_tokenizer(ModelSpec(name="smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def smol_rows(smol_tok, tmp_path_factory):
    """Every task type, 3 items each, at 1500 and 3000 tokens with the paper's default placements (released
    style), plus lookup / sssd items at five single-document placements (short style)."""
    out = tmp_path_factory.mktemp("mh")
    meta = mh.build_mathhay(out / "a", smol_tok, [1500, 3000], None, mh.ALL_TASK_TYPES, 3, seed=5, progress=False)
    rows = mh.load_mathhay(out / "a")
    assert meta["rows"] == len(rows) == 8 * 3 * 2
    meta2 = mh.build_mathhay(out / "b", smol_tok, [2000], ["first", "middle", "last", "p2", "p8"], ["lookup", "sssd"],
                             3, seed=6, progress=False, style="short")
    rows2 = mh.load_mathhay(out / "b" / "items.jsonl")
    assert meta2["rows"] == len(rows2) == 2 * 3 * 5
    return rows, rows2


def _noise_text(row: dict) -> str:
    """The context with the relevant documents cut out."""
    ctx, out, at = row["context"], [], 0
    for pos, doc in sorted(zip(row["positions"], row["relevant_docs"]), key=lambda x: x[0]["char_start"]):
        assert ctx[pos["char_start"]: pos["char_start"] + len(doc)] == doc
        out.append(ctx[at: pos["char_start"]])
        at = pos["char_start"] + len(doc)
    return "".join(out) + ctx[at:]


# ---------------------------------------------------------------------------------------------- items


def test_items_are_consistent(smol_rows):
    rows = smol_rows[0] + smol_rows[1]
    assert {r["task_type"] for r in rows} == set(mh.ALL_TASK_TYPES)
    for r in rows:
        steps, n_docs = mh.TASK_SHAPE[r["task_type"]]
        assert r["steps"] == steps and len(r["relevant_docs"]) == n_docs
        # the program's answer is the stored answer, and the program uses exactly the chosen values
        assert mh.evaluate_solution(r["solution"]) == r["answer"]
        literals = [float(x) for x in re.findall(r"= ([0-9.]+)  #", r["solution"])]
        assert literals == [q["value"] for q in r["quantities"]]
        # every relevant document holds at least one needed quantity; each quantity sits in its own document
        docs = dict(zip(r["relevant_doc_ids"], r["relevant_docs"]))
        assert {q["doc_id"] for q in r["quantities"]} == set(docs)
        noise = _noise_text(r)
        noise_numbers = mh.number_strings(noise)
        for q in r["quantities"]:
            assert q["sentence"] in docs[q["doc_id"]]
            assert f"{q['value_text']} {q['unit']}." in q["sentence"]
            assert q["entity"] in r["question"] and str(q["year"]) in r["question"]
            # nowhere in the noise: not the entity, not the value (as a whole number string)
            assert q["entity"] not in noise
            assert q["value_text"].replace(",", "") not in noise_numbers
            # the phrase the question uses names exactly one sentence of the whole context
            phrase = f"The {q['year']} {q['metric']} of {q['entity']} was"
            assert r["context"].count(phrase) == 1


def test_answers_follow_the_operation(smol_rows):
    for r in smol_rows[0]:
        v = [q["value"] for q in r["quantities"]]
        expect = {"lookup": lambda: v[0], "sub": lambda: v[0] - v[1], "add": lambda: v[0] + v[1],
                  "ratio": lambda: round(v[0] / v[1], 2), "add_sub": lambda: v[0] + v[1] - v[2],
                  "sum_ratio": lambda: round((v[0] + v[1]) / v[2], 2),
                  "diff_ratio": lambda: round((v[0] - v[1]) / v[2], 2),
                  "mean3": lambda: round(sum(v) / 3, 2), "sum_pct": lambda: round((v[0] + v[1]) / v[2] * 100, 2),
                  "pct_change": lambda: round((v[0] - v[1]) / v[1] * 100, 2)}[r["op"]]()
        assert r["answer"] == pytest.approx(expect, rel=1e-12)
        if r["op"] in ("sub", "diff_ratio"):
            assert v[0] > v[1]  # "how much higher": the first is the larger
        # quantities of one question share a metric (hence a unit)
        assert len({q["metric"] for q in r["quantities"]}) == 1


# ---------------------------------------------------------------------------------------------- lengths, placements


def test_lengths_within_one_percent_in_smollm2_tokens(smol_rows, smol_tok):
    for r in smol_rows[0] + smol_rows[1]:
        prompt = ev.render_prompt(r, smol_tok)
        n = len(smol_tok(prompt, add_special_tokens=not prompt.startswith(smol_tok.bos_token))["input_ids"])
        assert n == r["n_tokens"]
        assert abs(n - r["length"]) <= 0.01 * r["length"], (r["id"], n)
    short = smol_rows[1][0]
    assert ev.render_prompt(short, smol_tok).endswith("<|im_start|>assistant\nAnswer:")
    released = smol_rows[0][0]
    text = ev.render_prompt(released, smol_tok)
    assert '"answer"' in text and text.endswith("<|im_start|>assistant\n") and released["question"] in text


def test_placements_put_documents_where_asked(smol_rows):
    rows = smol_rows[1]
    for r in rows:
        (pos,) = r["positions"]
        doc = r["relevant_docs"][0]
        if r["placement"] == "first":
            assert pos["doc_index"] == 0 and r["context"].startswith(doc)
        elif r["placement"] == "last":
            assert pos["doc_index"] == r["n_docs"] - 1 and r["context"].endswith(doc)
        else:
            want = {"middle": 0.5, "p2": 0.2, "p8": 0.8}[r["placement"]]
            # at the document boundary nearest the position: off by at most about one noise document
            assert abs(pos["fraction"] - want) < 0.15, (r["id"], pos)
            assert 0 < pos["doc_index"] < r["n_docs"] - 1
    defaults = {1: "middle", 2: "first-middle", 3: "first-middle-last"}
    for r in smol_rows[0]:
        n = len(r["relevant_docs"])
        assert r["placement"] == defaults[n]
        idx = [p["doc_index"] for p in r["positions"]]
        fr = [p["fraction"] for p in r["positions"]]
        if n == 1:
            assert abs(fr[0] - 0.5) < 0.2
        else:
            assert idx[0] == 0 and r["context"].startswith(r["relevant_docs"][0])
            assert abs(fr[1] - 0.5) < 0.2
        if n == 3:
            assert idx[2] == r["n_docs"] - 1 and r["context"].endswith(r["relevant_docs"][2])


def test_multi_document_placements(char_tok):
    noise = [f"Noise document {chr(65 + i)} has plain words only." for i in range(26)]
    rel = ["RELEVANT ONE here.", "RELEVANT TWO here.", "RELEVANT THREE here."]
    cases = {"first-first": ([0, 1], None), "last-last": (None, None), "first-last": ([0], None),
             "middle-middle": (None, None), "first-middle": ([0], None)}
    for placement in cases:
        hay = mh.build_haystack(rel[:2], noise, char_tok, 800, placement, seed=1)
        idx = [p["doc_index"] for p in hay["positions"]]
        n = len(hay["doc_ids"])
        assert idx[0] < idx[1]  # the first document stays first
        if placement == "first-first":
            assert idx == [0, 1]
        if placement == "last-last":
            assert idx == [n - 2, n - 1]
        if placement == "first-last":
            assert idx == [0, n - 1]
        if placement == "middle-middle":
            assert idx[1] == idx[0] + 1 and abs(hay["positions"][0]["fraction"] - 0.5) < 0.1
        assert abs(hay["n_tokens"] - 800) <= 8
    hay = mh.build_haystack(rel, noise, char_tok, 900, "first-middle-last", seed=2)
    idx = [p["doc_index"] for p in hay["positions"]]
    assert idx[0] == 0 and idx[2] == len(hay["doc_ids"]) - 1 and abs(hay["positions"][1]["fraction"] - 0.5) < 0.1
    # the same seed gives the same noise whatever the placement (a controlled comparison)
    a = mh.build_haystack(rel[:1], noise, char_tok, 700, "first", seed=3)
    b = mh.build_haystack(rel[:1], noise, char_tok, 700, "last", seed=3)
    assert a["noise_ids"] == b["noise_ids"]


def test_placement_names_and_errors(char_tok, tmp_path):
    assert mh.placement_fractions("p3", 2) == [0.3, 0.3]
    assert mh.placement_fractions("first-middle-last", 3) == [0.0, 0.5, 1.0]
    assert mh.placements_for("ss2d", ["first", "first-middle", "first-middle-last"]) == ["first", "first-middle"]
    assert mh.placements_for("3s3d", None) == ["first-middle-last"]
    for bad, n, needle in (("center", 1, "unknown placement"), ("first-middle", 1, "places 2 documents"),
                           ("p11", 1, "unknown placement")):
        with pytest.raises(mh.MathHayError, match=needle) as e:
            mh.placement_fractions(bad, n)
        assert "\n" not in str(e.value)
    with pytest.raises(mh.MathHayError, match="too short"):
        mh.build_haystack(["x" * 500], ["noise words"], char_tok, 200)
    with pytest.raises(mh.MathHayError, match="over the shortest length 500; raise the lengths"):
        mh.build_mathhay(tmp_path / "x", char_tok, [500, 3000], None, ["lookup"], 1, progress=False)
    assert not (tmp_path / "x").exists()  # nothing written
    with pytest.raises(mh.MathHayError, match="none of the placements"):
        mh.build_mathhay("/nonexistent", char_tok, [2000], ["first-middle"], ["lookup"], 1, progress=False)


def test_build_is_deterministic_and_seeded(char_tok, tmp_path):
    args = dict(lengths=[2500], placements=None, task_types=["lookup", "2ssd"], n_items=2, progress=False,
                style="short")
    mh.build_mathhay(tmp_path / "a", char_tok, seed=3, **args)
    mh.build_mathhay(tmp_path / "b", char_tok, seed=3, **args)
    mh.build_mathhay(tmp_path / "c", char_tok, seed=4, **args)
    a, b, c = ((tmp_path / x / "items.jsonl").read_text() for x in "abc")
    assert a == b and a != c
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["rows"] == 4 and meta["style"] == "short" and meta["noise"] == "templates"


def test_noise_files(char_tok, tmp_path):
    text = "\n\n".join(f"Paragraph {i}: the river rose 4{i}.5 metres near the old mill of Tarn." for i in range(60))
    path = tmp_path / "noise.txt"
    path.write_text(text)
    mh.build_mathhay(tmp_path / "o", char_tok, [3000], None, ["lookup"], 3, noise_files=[path], progress=False)
    rows = mh.load_mathhay(tmp_path / "o")
    file_numbers = mh.number_strings(text)
    for r in rows:
        noise = _noise_text(r)
        assert "old mill of Tarn" in noise and "harvest report" not in noise  # only the file's text is noise
        for q in r["quantities"]:
            assert q["value_text"].replace(",", "") not in file_numbers
    small = tmp_path / "small.txt"
    small.write_text("A few words.")
    with pytest.raises(mh.MathHayError, match="fewer than the longest haystack"):
        mh.build_mathhay(tmp_path / "s", char_tok, [3000], None, ["lookup"], 1, noise_files=[small], progress=False)


# ---------------------------------------------------------------------------------------------- the program evaluator


def test_evaluate_solution_arithmetic():
    src = ('def solve():\n    """Docstring."""\n    a = 12.5  # comment\n    b = -2\n    c = a * b + 3 ** 2\n'
           '    c += 1\n    d = max(a, 4, abs(b)) - min(1, 2)\n    answer = round(c / d, 3)\n    return answer\n')
    assert mh.evaluate_solution(src) == round((12.5 * -2 + 9 + 1) / (12.5 - 1), 3)


@pytest.mark.parametrize("body, needle", [
    ("import os\n    return 1", "Import is not allowed"),
    ("x = open('/tmp/mathhay_should_not_exist', 'w')\n    return 1", "call of open is not allowed"),
    ("x = __import__('os').system('true')\n    return 1", "is not allowed"),
    ("x = (1).real\n    return x", "Attribute is not allowed"),
    ("x = 'a'\n    return 1", "only numbers are allowed"),
    ("return y", "used before it is assigned"),
    ("return 1 / 0", "division by zero"),
    ("return 10 ** 100000", "power too large"),
    ("while True:\n        pass\n    return 1", "While is not allowed"),
    ("x = [1, 2]\n    return 1", "List is not allowed"),
    ("x = 1", "no final return"),
    ("return 1\n    x = 2", "return must be the last"),
    ("return round(1.5, 0.5)", "round takes"),
])
def test_evaluate_solution_rejects(body, needle, tmp_path):
    with pytest.raises(mh.SolutionError, match=re.escape(needle)) as e:
        mh.evaluate_solution(f"def solve():\n    {body}\n")
    assert "\n" not in str(e.value)
    import os

    assert not os.path.exists("/tmp/mathhay_should_not_exist")


@pytest.mark.parametrize("src, needle", [
    ("def solve(x):\n    return x\n", "no arguments"),
    ("def other():\n    return 1\n", "def solve()"),
    ("import os\ndef solve():\n    return 1\n", "def solve()"),
    ("def solve(:\n", "not valid Python"),
])
def test_evaluate_solution_rejects_shapes(src, needle):
    with pytest.raises(mh.SolutionError, match=re.escape(needle)):
        mh.evaluate_solution(src)


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text, prefer, value", [
    ('{"reasoning": "7.1 + 2 {so}", "answer": 9.1}', "last", 9.1),
    ('Sure. {"reasoning": {"step": 1}, "answer": "1,234.5 tonnes"} done 77', "last", 1234.5),
    ('{"reasoning": "no idea", "answer": null}', "last", None),
    ('{"reasoning": "x", "answer": 3', "last", 3.0),  # cut off before the brace closes
    ("The answer is $1,234,567.8, as of 2024.", "last", 1234567.8),
    ("Final answer: -3.5", "last", -3.5),
    ("It grew from 2022-2024 by 12.5%", "last", 12.5),
    ("355 billion", "last", 355.0),  # scale words are the judge's business
    ("3.55e11", "last", 3.55e11),
    (" 7.12 tonnes per hectare in 2024.", "first", 7.12),
    (" 7.12 tonnes per hectare in 2024.", "last", 2024.0),
    ("no number here", "last", None),
    ("", "last", None),
])
def test_extract_answer(text, prefer, value):
    got = ev.extract_answer(text, prefer=prefer)
    assert got == (pytest.approx(value) if value is not None else None)


def test_extract_answer_skips_numbers_of_the_question():
    restated = " The 2024 corn yield of Northfield County was 7.12 tonnes per hectare."
    assert ev.extract_answer(restated, prefer="first") == 2024
    assert ev.extract_answer(restated, prefer="first", skip=[2024.0]) == 7.12
    assert ev.extract_answer("2024 was", prefer="first", skip=[2024.0]) is None
    assert ev.extract_answer('{"answer": 2024}', skip=[2024.0]) == 2024  # a JSON answer is taken as written


def test_score_edge_cases():
    assert ev.score(14.3, 412.5 - 398.2)  # float noise of the program is within rel_tol 1e-9
    assert not ev.score(1.04, 1.0359)
    assert not ev.score(None, 5.0) and ev.score(None, 5.0, none_correct=True)  # released counts None right
    assert not ev.score(5.0, None) and ev.score(5.0, None, none_correct=True)
    assert not ev.score(355.0, 355e9)  # units / scale: only the judge can accept it
    assert ev.score(ev.extract_answer("12,345.6 dollars"), 12345.6)
    assert not ev.score(float("nan"), 1.0) and not ev.score(float("inf"), float("inf"))
    assert ev.score(100.0, 100.00001, rel_tol=1e-6) and not ev.score(100.0, 100.00001)


def test_parse_judgement():
    assert ev.parse_judgement("Yes, the same value.")
    assert not ev.parse_judgement("No. Yes would be wrong.")
    assert ev.parse_judgement('{"reasoning": "no difference", "output": "Yes"}')
    assert not ev.parse_judgement("Yesterday maybe")
    assert not ev.parse_judgement("")


# ---------------------------------------------------------------------------------------------- evaluation


def _rows(char_tok, tmp_path, n=3):
    mh.build_mathhay(tmp_path / "ev", char_tok, [1500, 2500], ["middle"], ["lookup"], n, seed=0, progress=False,
                     style="short")
    return mh.load_mathhay(tmp_path / "ev")


def test_evaluate_scores_and_judges(char_tok, tmp_path, monkeypatch):
    """Scripted completions through the rollout entry point: extraction, scoring, the judge only for numeric
    misses with a number, the summary cells."""
    from rlkit.rollout import Completion, generation

    rows = _rows(char_tok, tmp_path)
    seen = {}

    def fake_generate(model, tokenizer, prompts, settings, **kw):
        # prompts come in the order of the rows evaluated; completion kinds cycle: right, wrong, no number
        seen["prompts"], seen["kv"] = prompts, settings.kv_cache
        by_prompt = {ev.render_prompt(r, tokenizer): r["answer"] for r in rows}
        return [[Completion([f" {by_prompt[p]:,} units", " 1.0", " none"][i % 3], [])] for i, p in enumerate(prompts)]

    monkeypatch.setattr(generation, "generate", fake_generate)
    settings = generation.GenerationSettings(max_new_tokens=8, kv_cache="marker")

    class M:
        config = type("C", (), {"max_position_embeddings": 4096})()

    summary, records = ev.evaluate_mathhay(M(), char_tok, rows, settings, progress=False)
    assert seen["kv"] == "marker" and all(p.endswith("Answer:") for p in seen["prompts"])
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for i, rec in enumerate(records):
        assert rec["correct"] is (i % 3 == 0) and rec["judge"] is None and (rec["pred"] is None) == (i % 3 == 2)
    assert summary["n"] == len(rows) == 6 and summary["accuracy"] == pytest.approx(2 / 6)
    assert set(summary["by_length"]) == {1500, 2500} and summary["no_answer"] == pytest.approx(2 / 6)
    assert {(c["length"], c["placement"]) for c in summary["cells"]} == {(1500, "middle"), (2500, "middle")}
    # a judge that says Yes: only numeric misses that have a number are judged (and flipped)
    judged = []
    _, records = ev.evaluate_mathhay(M(), char_tok, rows, settings, judge=lambda recs: judged.extend(recs) or
                                     [True] * len(recs), progress=False)
    assert {r["id"] for r in judged} == {r["id"] for r in records if not r["numeric_correct"] and r["pred"] is not None}
    assert all(r["correct"] == (r["pred"] is not None) for r in records)
    # too long for the context: skipped and listed
    summary, records = ev.evaluate_mathhay(M(), char_tok, rows, settings, max_context=2000, progress=False)
    assert {r["length"] for r in records} == {1500} and len(summary["skipped"]) == 3


def test_evaluate_through_a_tiny_model(char_tok, tmp_path):
    """The real rollout path (HF generate on a tiny random model) and the written report."""
    from rlkit.models import build_tiny_model
    from rlkit.recipe import TinyModelSpec
    from rlkit.rollout import GenerationSettings

    from conftest import TINY_SHAPE

    rows = [r for r in _rows(char_tok, tmp_path, n=2) if r["length"] == 1500]
    model = build_tiny_model(TinyModelSpec(**dict(TINY_SHAPE, max_position_embeddings=2048)), char_tok)
    summary = ev.run_mathhay_eval(model, char_tok, rows, GenerationSettings(max_new_tokens=3, batch_size=2),
                                  tmp_path / "report", label="tiny", progress=False, write=None)
    assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "report" / "mathhay_records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["completion"]) <= 3 for r in records)
    assert (tmp_path / "report" / "mathhay.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "mathhay.json").read_text())["label"] == "tiny"


def test_judge_records_prompt_and_parse(char_tok, monkeypatch):
    from rlkit.rollout import Completion, generation

    recs = [{"solution": "def solve():\n    return 355e9\n", "answer": 355e9,
             "completion": '{"reasoning": "400 - 45 = 355 billion", "answer": 355}', "pred": 355.0},
            {"solution": "def solve():\n    return 2\n", "answer": 2.0, "completion": "3", "pred": 3.0}]
    seen = []

    def fake_generate(model, tokenizer, prompts, settings, **kw):
        seen.extend(prompts)
        return [[Completion("Yes", [])], [Completion("No, 3 is not 2.", [])]]

    monkeypatch.setattr(generation, "generate", fake_generate)
    assert ev.judge_records(recs, object(), char_tok) == [True, False]
    assert "400 - 45 = 355 billion" in seen[0] and "Answer 1: 355000000000.0" in seen[0]
    assert "return 355e9" in seen[0] and "Answer 2: 355.0" in seen[0]


def test_summarize_and_plot(tmp_path):
    recs = [{"task_type": t, "length": L, "placement": p, "correct": c, "pred": 1.0}
            for t, L, p, c in [("lookup", 1000, "first", True), ("lookup", 1000, "last", False),
                               ("sssd", 2000, "first", True), ("sssd", 2000, "first", True)]]
    s = ev.summarize(recs)
    assert s["accuracy"] == 0.75 and s["by_length"] == {1000: 0.5, 2000: 1.0}
    assert s["by_placement"] == {"first": 1.0, "last": 0.0} and s["by_task_type_length"]["sssd"] == {2000: 1.0}
    assert {"task_type": "sssd", "length": 2000, "placement": "first", "accuracy": 1.0, "n": 2} in s["cells"]
    path = ev.plot_mathhay({"none": {1000: 0.5, 2000: 0.25}, "polar": {"1000": 0.4, "2000": 0.2}}, tmp_path / "p.png",
                           "t")
    assert path.stat().st_size > 1000
    with pytest.raises(mh.MathHayError):
        ev.summarize([])


# ---------------------------------------------------------------------------------------------- loading


def _released(tmp_path):
    docs = [{"Document": f"Irrelevant document number {i} talks about weather and words."} for i in range(8)]
    (tmp_path / "documents.json").write_text(json.dumps(docs))
    items = [
        {"Topic": "Financial Market Analysis", "Subtopic": "s", "Query": "q", "Document_ID": "DOC_0",
         "Document": "Acme EBIT was $12,792 million and WACC 11.8%.", "Summarized_Document": "short",
         "task_type": "sssd",
         "Task": {"relevant_quantity_cells": [{"quantity_cell": ["Acme EBIT", "$12,792 million"]}],
                  "question": "What is one third of Acme's EBIT?", "solution": "def solve():\n    return 12792 / 3\n",
                  "steps": 1, "answer": 4264.0},
         "Irrelevant_Documents_Indexs": [3, 1, 4, 0, 5, 2, 6, 7]},
        {"Topic": "Sports Performance Analytics", "Document_ID1": "DOC_1", "Document_ID2": "DOC_2",
         "Document1": "Team A scored 88 points.", "Document2": "Team B scored 80 points.", "task_type": "ss2d",
         "Task": {"question": "How many more points did A score?", "solution": "def solve():\n    return 88 - 80\n",
                  "answer": 8},
         "Irrelevant_Documents_Indexs": [7, 6, 5, 4, 3, 2, 1, 0]},
    ]
    path = tmp_path / "full_haystack_question_sssd.json"
    path.write_text(json.dumps(items))
    return path


def test_released_format_loads(char_tok, tmp_path):
    path = _released(tmp_path)
    items = mh.released_items(path)
    assert [i["task_type"] for i in items] == ["sssd", "ss2d"] and items[1]["answer"] == 8.0
    assert items[1]["relevant_docs"] == ["Team A scored 88 points.", "Team B scored 80 points."]
    rows = mh.load_mathhay(path, tokenizer=char_tok, lengths=[600])
    assert [r["placement"] for r in rows] == ["middle", "first-middle"]
    a, b = rows
    assert "Acme EBIT was $12,792 million" in a["context"] and abs(a["n_tokens"] - 600) <= 6
    assert b["context"].startswith("Team A scored 88 points.") and "Team B scored 80 points." in b["context"]
    # the released noise order is kept: the first noise document of item 0 is DOC 3
    noise_a = _noise_text(a)
    assert noise_a.strip().startswith("Irrelevant document number 3")
    assert a["answer"] == 4264.0 and mh.evaluate_solution(a["solution"]) == 4264.0


def test_released_format_errors(char_tok, tmp_path):
    path = _released(tmp_path)
    (tmp_path / "documents.json").unlink()
    with pytest.raises(mh.MathHayError, match="documents file") as e:
        mh.load_mathhay(path, tokenizer=char_tok, lengths=[600])
    assert "\n" not in str(e.value)
    path = _released(tmp_path)
    with pytest.raises(mh.MathHayError, match="a tokenizer, lengths"):
        mh.load_mathhay(path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Topic": "x"}]))
    with pytest.raises(mh.MathHayError, match="missing Task.question"):
        mh.load_mathhay(bad, tokenizer=char_tok, lengths=[600])


def test_our_format_errors(tmp_path):
    with pytest.raises(mh.MathHayError, match="no items.jsonl"):
        mh.load_mathhay(tmp_path)
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"id": "a", "task_type": "sssd", "length": 1, "placement": "first", "context": "",
                             "question": "q"}) + "\n")
    with pytest.raises(mh.MathHayError, match=r"x.jsonl:1: missing field 'answer'"):
        mh.load_mathhay(f)


# ---------------------------------------------------------------------------------------------- the stage


def test_stage_config_checks():
    from rlkit.config import ConfigError, build
    from rlkit.methods.mathhay_build import MathHayBuildConfig

    cfg = build(MathHayBuildConfig, {"lengths": [1000, 2000], "task_types": ["lookup", "ss2d"],
                                     "placements": ["first", "first-last"]})
    assert cfg.lengths == [1000, 2000] and cfg.style == "released"
    for bad, needle in (({"task_types": ["sssd", "nope"]}, "unknown task type 'nope'"),
                        ({"lengths": [10]}, "at least 64"),
                        ({"task_types": ["lookup"], "placements": ["first-middle"]}, "none of the placements"),
                        ({"placements": ["centre"]}, "unknown placement"),
                        ({"noise_files": ["/no/such/file.txt"]}, "does not exist")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            build(MathHayBuildConfig, bad, "args")


# ---------------------------------------------------------------------------------------------- command line


def test_patch_specs_parse_and_reject(tmp_path):
    from rlkit.cli import patch_specs
    from rlkit.config import ConfigError

    assert patch_specs([]) is None
    assert patch_specs(["pear:coefficients=[[0, 1, 0.5]]"]) == [{"name": "pear", "coefficients": [[0, 1, 0.5]]}]
    spec = tmp_path / "p.yaml"
    spec.write_text("- {name: pear, coefficients: [[1, 0, 0.25]]}\n")
    assert patch_specs([str(spec)]) == [{"name": "pear", "coefficients": [[1, 0, 0.25]]}]
    with pytest.raises(ConfigError, match="no such file"):
        patch_specs([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="NAME:key=value"):
        patch_specs(["pear:coefficients"])
    with pytest.raises(ConfigError, match="unknown key 'foo'"):
        patch_specs(["pear:foo=1"])


def test_cli_build_then_eval_with_a_patch(char_tok, tmp_path, capsys):
    """``rlkit mathhay build`` then ``rlkit eval --benchmark mathhay:DIR --patch pear:...`` on a saved tiny model:
    the short style picks the newline stop and 32 new tokens, the patch reaches the model (the report records it),
    and the summary, completions and plot are written; the mathhay-only flags are refused elsewhere."""
    from rlkit.cli import main
    from rlkit.models import build_tiny_model
    from rlkit.recipe import TinyModelSpec

    from conftest import TINY_SHAPE

    model_dir = tmp_path / "tiny"
    build_tiny_model(TinyModelSpec(**dict(TINY_SHAPE, max_position_embeddings=1024)), char_tok).save_pretrained(model_dir)
    char_tok.save_pretrained(model_dir)
    items = tmp_path / "items"
    assert main(["mathhay", "build", "--tokenizer", str(model_dir), "--out", str(items), "--lengths", "800",
                 "--n-items", "2", "--task-types", "lookup", "--style", "short", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--benchmark", f"mathhay:{items}", "--output-dir", str(out),
                 "--patch", "pear:coefficients=[[1, 0, 0.5]]", "--batch-size", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["patches"] == [{"name": "pear", "coefficients": [[1, 0, 0.5]]}]
    assert set(summary["by_length"]) == {"800"}
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 2 and all("\n" not in c["completion"] for c in completions)
    assert (out / "mathhay.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--benchmark", "gsm8k", "--judge", "x"]) == 2
    assert "apply to --benchmark mathhay" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--games", "Nim-v0", "--patch", "pear"]) == 2
    assert "--patch applies to --benchmark" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--benchmark", f"mathhay:{items}", "--samples", "4"]) == 2
    assert "greedy answers only" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--benchmark", f"mathhay:{tmp_path / 'none'}"]) == 2
