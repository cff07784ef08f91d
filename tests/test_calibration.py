"""Calibration in ``rlkit eval`` (rlkit/eval/calibration.py): ECE on constructed predictors with hand values,
the answer span, token log-probabilities from the rollout layer checked against a separate teacher-forced pass,
and ``rlkit eval --calibration`` end to end on a tiny model trained for a few seconds to answer ``#### N``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import TINY_SHAPE

from rlkit.eval.calibration import (answer_span, completion_confidence, ece, reliability, reliability_diagram,
                                    token_span)

# --------------------------------------------------------------------------------------------------
# ECE and the reliability table on constructed predictors


def test_ece_perfectly_calibrated_is_zero():
    # 10 answers at 0.3 with 3 right, 10 at 0.8 with 8 right, 4 at 1.0 all right, 5 at 0.0 all wrong
    conf = [0.3] * 10 + [0.8] * 10 + [1.0] * 4 + [0.0] * 5
    correct = [1] * 3 + [0] * 7 + [1] * 8 + [0] * 2 + [1] * 4 + [0] * 5
    assert ece(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # two confidences sharing the bin (0.6, 0.7]: their mean, 0.65, matches the bin's accuracy 13/20
    assert ece([0.62, 0.68] * 10, [1] * 13 + [0] * 7) == pytest.approx(0.0, abs=1e-12)


def test_ece_over_confident_equals_hand_value():
    # 10 answers at 0.9 with 6 right (gap 0.3), 5 at 0.6 with 2 right (gap 0.2): (10 * 0.3 + 5 * 0.2) / 15
    conf = [0.9] * 10 + [0.6] * 5
    correct = [True] * 6 + [False] * 4 + [True] * 2 + [False] * 3
    assert ece(conf, correct) == pytest.approx((10 * 0.3 + 5 * 0.2) / 15)
    # confidences in one bin average before the gap is taken: 0.92 and 0.98 -> mean 0.95, accuracy 0.5
    assert ece([0.92, 0.98], [1, 0]) == pytest.approx(0.45)
    # tensors (FIRST's token-level ECE passes them) give the same value
    assert ece(torch.tensor(conf), torch.tensor(correct)) == pytest.approx((10 * 0.3 + 5 * 0.2) / 15)
    # with one bin ECE is |mean confidence - accuracy|
    assert ece(conf, correct, bins=1) == pytest.approx(abs((9 + 3) / 15 - 8 / 15))


def test_reliability_bins_edges_and_errors():
    table = reliability([0.0, 0.1, 0.3, 0.30001, 1.0], [0, 1, 1, 0, 1], bins=10)
    assert [b["count"] for b in table] == [2, 0, 1, 1, 0, 0, 0, 0, 0, 1]  # (lo, hi], 0 in the first bin
    assert table[0]["accuracy"] == 0.5 and table[0]["confidence"] == pytest.approx(0.05)
    assert table[1]["accuracy"] is None and table[1]["confidence"] is None
    assert (table[2]["lo"], table[2]["hi"]) == (0.2, 0.3)
    assert table[3]["accuracy"] == 0.0 and table[9]["accuracy"] == 1.0
    assert [b["count"] for b in reliability([0.2, 0.4, 0.6, 0.8], [1] * 4, bins=5)] == [1, 1, 1, 1, 0]
    for bad, msg in (([1.2], "in \\[0, 1\\]"), ([float("nan")], "in \\[0, 1\\]"), ([], "no predictions")):
        with pytest.raises(ValueError, match=msg):
            ece(bad, [1] * len(bad))
    with pytest.raises(ValueError, match="2 confidences but 1"):
        ece([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="positive integer"):
        ece([0.1], [1], bins=0)


def test_reliability_diagram_png(tmp_path):
    path = reliability_diagram([0.9] * 10 + [0.6] * 5, [1] * 6 + [0] * 4 + [1] * 2 + [0] * 3,
                               tmp_path / "sub" / "rel.png", title="constructed")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# --------------------------------------------------------------------------------------------------
# The answer span and the confidence arithmetic


@pytest.mark.parametrize("text, expected", [
    ("7 then 5 so \\boxed{5} and 5", (19, 20)),           # the boxed 5, not the first or the last 5
    ("x #### 42\n", (7, 9)),
    ("42 is it. The answer is $42$. ok", (25, 27)),      # after the trigger, inside the dollars
    ("<answer>B</answer> then B", (8, 9)),
    ("nothing here", None),
])
def test_answer_span(text, expected):
    assert answer_span(text) == expected


def test_completion_confidence_products(char_tokenizer):
    tok = char_tokenizer
    text = "1+2=3\n#### 13"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    lps = [-0.01 * (i + 1) for i in range(len(ids))]
    got = completion_confidence(ids, lps, tok, text, "answer")
    assert got["confidence_tokens"] == [11, 13]  # the characters "1", "3" of "13" (one token per character)
    assert got["confidence"] == pytest.approx(math.exp(lps[11] + lps[12]))
    seq = completion_confidence(ids, lps, tok, text, "sequence")
    assert seq["confidence"] == pytest.approx(math.exp(sum(lps))) and seq["confidence_tokens"] == [0, len(ids)]
    assert completion_confidence(ids, lps, tok, "no answer", "answer") == {"confidence": None,
                                                                             "confidence_tokens": None}
    with pytest.raises(ValueError, match="no token log-probabilities"):
        completion_confidence(ids, None, tok, text)
    with pytest.raises(ValueError, match="unknown confidence"):
        completion_confidence(ids, lps, tok, text, "verbal")


def test_token_span_multi_character_tokens():
    class Tok:  # tokens that decode to several characters, and a special token that decodes to nothing
        pieces = {0: "The", 1: " answer", 2: " is", 3: " 12", 4: "5", 5: ".", 9: ""}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    text = "The answer is 125."
    start, end = answer_span(text)
    assert text[start:end] == "125"
    assert token_span(Tok(), [0, 1, 2, 3, 4, 5, 9], start, end) == (3, 5)  # " 12" and "5"
    assert token_span(Tok(), [0, 1, 2, 3, 4, 5, 9], 0, 1) == (0, 1)


# --------------------------------------------------------------------------------------------------
# On a tiny model: the rollout layer's log-probabilities, and `rlkit eval --calibration`

SYN = {"num_train": 300, "num_test": 12, "min_ops": 1, "max_ops": 1, "max_operand": 9}


@pytest.fixture(scope="module")
def answering_model():
    """A tiny Llama (TINY_SHAPE) trained ~3 s to write ``#### N`` after a synthetic question: its answers parse,
    some right and most wrong, with confidences strictly between 0 and 1."""
    from rlkit.data import build_dataset
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import DatasetSpec, TinyModelSpec

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=0)
    rows = build_dataset(DatasetSpec(name="synthetic", split="train", template="plain", synthetic=SYN),
                         tok).to_list()
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    seqs = [p + tok(f"#### {r['answer']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p, r in zip(prompts, rows)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):  # right padding; loss on the answer only
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p): len(s)] = torch.tensor(s[len(p):])
        mask[i, : len(s)] = 1
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and spares a shared machine
    try:
        for _ in range(60):
            b = torch.randint(0, len(seqs), (32,), generator=gen)
            model(input_ids=ids[b], attention_mask=mask[b], labels=labels[b]).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tok


def _test_rows(tok):
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec

    return build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", synthetic=SYN),
                         tok).to_list()


def test_answer_confidence_matches_teacher_forced_pass(answering_model):
    from rlkit.eval.math_eval import evaluate_rows
    from rlkit.rollout import GenerationSettings, generate

    model, tok = answering_model
    rows = _test_rows(tok)
    settings = GenerationSettings(max_new_tokens=10, batch_size=5)  # 12 prompts: batches padded on the left
    plain = generate(model, tok, [r["prompt"] for r in rows], settings, progress=False)
    assert all(c[0].logprobs is None for c in plain), "log-probabilities are opt-in"
    summary, records = evaluate_rows(model, tok, rows, settings, progress=False, calibration="answer")
    seq_summary, seq_records = evaluate_rows(model, tok, rows, settings, progress=False, calibration="sequence")
    assert [r["completion"] for r in records] == [c[0].text for c in plain]  # same greedy text with log-probs on
    checked = 0
    for row, rec, seq in zip(rows, records, seq_records):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        gen_ids = tok(rec["completion"], add_special_tokens=False)["input_ids"]
        gen_ids = gen_ids + [tok.eos_token_id] * (len(gen_ids) < 10)  # ended: the EOS token was generated
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + gen_ids])).logits[0, len(prompt) - 1: -1]
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(gen_ids)[:, None])[:, 0].tolist()
        assert seq["confidence"] == pytest.approx(math.exp(sum(lp)), rel=1e-4, abs=1e-9)
        if rec["extracted"] in (None, ""):
            assert rec["confidence"] is None
            continue
        # the answer's characters, found here independently: one token per character, what the last "####"
        # line holds (the extraction's rule for these completions)
        span = range(*[m.span(1) for m in re.finditer(r"####\s*([^\n]+)", rec["completion"])][-1])
        assert rec["completion"][span.start: span.stop] == rec["extracted"]
        want = math.exp(sum(lp[i] for i in span))
        assert rec["confidence_tokens"] == [span.start, span.stop]
        assert rec["confidence"] == pytest.approx(want, rel=1e-4)
        # the check can tell a span shifted by one token, or the sequence probability, from the answer's
        assert abs(math.exp(sum(lp[i - 1] for i in span)) - want) > 1e-3
        assert abs(math.exp(sum(lp)) - want) > 1e-3
        assert 0 < rec["confidence"] < 1
        checked += 1
    assert checked >= 6, "the trained tiny model should answer most questions in the #### format"
    scored = [r for r in records if r["confidence"] is not None]
    assert summary["confidence"] == "answer" and summary["calibration_n"] == len(scored)
    assert summary["ece"] == pytest.approx(ece([r["confidence"] for r in scored], [r["correct"] for r in scored]))
    assert summary["mean_confidence"] == pytest.approx(sum(r["confidence"] for r in scored) / len(scored))
    assert seq_summary["calibration_n"] == len(rows)


def test_cli_eval_calibration_end_to_end(answering_model, tmp_path, capsys):
    from rlkit.cli import main

    model, tok = answering_model
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    out = tmp_path / "eval"
    base = ["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--template", "plain", "--max-new-tokens", "10",
            "--limit", "12"] + [f"--synthetic={k}={v}" for k, v in SYN.items()]
    assert main(base + ["--calibration", "--ece-bins", "5", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    png = out / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["confidence"] == "answer" and summary["ece_bins"] == 5 and len(summary["reliability"]) == 5
    scored = [r for r in records if r["confidence"] is not None]
    assert summary["calibration_n"] == len(scored) >= 6
    assert summary["ece"] == pytest.approx(ece([r["confidence"] for r in scored], [r["correct"] for r in scored],
                                               bins=5))
    printed = json.loads(capsys.readouterr().out)
    assert printed["outputs"]["reliability"] == str(png)
    # user errors: one line, exit 2, before any model loads
    for extra, msg in ((["--backend", "vllm"], "--calibration needs --backend hf"),
                       (["--ece-bins", "0"], "--ece-bins must be a positive integer"),
                       (["--decoder", "value_search", "--value-model", str(tmp_path)], "greedy decoder")):
        assert main(base + ["--calibration"] + extra + ["--output-dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------
# `rlkit distill prepare` (FIRST's teacher top-k, rlkit/methods/first/topk.py) through the CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Llama (TINY_SHAPE) with the char tokenizer, saved as a checkpoint folder."""
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import TinyModelSpec

    tok = build_char_tokenizer()
    ckpt = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=0).save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    return ckpt


def test_cli_distill_prepare(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from rlkit.cli import main
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    out = tmp_path / "topk"
    base = ["distill", "prepare", "--teacher", str(tiny_checkpoint), "--data", "synthetic", "--limit", "10",
            "--template", "plain", "--max-length", "96", "--batch-size", "4"]
    assert main(base + ["--out", str(out), "--k", "3", "--heldout-fraction", "0.2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "topk_meta.json").read_text())
    index = [json.loads(x) for x in (out / "topk.jsonl").read_text().splitlines()]
    tensors = load_file(str(out / "topk.safetensors"))
    assert meta["k"] == 3 and meta["rows"] == len(index) == 10 and meta["heldout_rows"] == 2
    assert printed["tokens"] == meta["tokens"] == tensors["ids"].shape[0] and tensors["logprobs"].shape[1] == 3
    assert meta["tau_source"].startswith("auto") and meta["teacher"] == str(tiny_checkpoint)
    # the stored log-probs are the teacher's top-3 at the response positions of the first row
    model, _ = load_model(ModelSpec(name=str(tiny_checkpoint)))
    row = index[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)[row["prompt_length"] - 1: len(row["input_ids"]) - 1]
    top = lp.topk(3, -1)
    assert torch.allclose(tensors["logprobs"][row["start"]: row["end"]], top.values, atol=1e-4)
    # a fixed temperature, and user errors as one line with exit 2
    assert main(base + ["--out", str(tmp_path / "fixed"), "--tau", "1.5", "--no-other"]) == 0
    assert json.loads((tmp_path / "fixed" / "topk_meta.json").read_text())["tau"] == {"topk": 1.5, "other": 1.5}
    capsys.readouterr()
    for extra, msg in ((["--tau", "-1"], "tau must be 'auto' or a positive number"), (["--k", "0"], "k must be")):
        assert main(base + ["--out", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------
# `rlkit eval --manyshot` (rlkit/eval/manyshot.py) through the CLI


def test_cli_eval_manyshot(tiny_checkpoint, tmp_path, capsys):
    from rlkit.cli import main
    from rlkit.data.manyshot import task_names

    task = task_names("heldout")[0]
    out = tmp_path / "ms"
    assert main(["eval", "--model", str(tiny_checkpoint), "--manyshot", task, "--shots", "0,1,60", "--items", "3",
                 "--max-new-tokens", "4", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index("\n{") + 1:])  # after the one-line accuracy report
    summary = json.loads((out / "manyshot.json").read_text())
    assert printed["accuracy"] == summary["accuracy"]
    # 0 and 1 shots fit the tiny model's 128-token context; 60 demonstrations do not and are reported skipped
    assert set(summary["accuracy"]) == {"0", "1"} and summary["skipped"] == {task: [60]}
    assert summary["items"] == 3
    assert len((out / "manyshot_records.jsonl").read_text().splitlines()) == 6
    assert (out / "manyshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ICL-50 episodes from a jsonl: the last demonstration of each episode is the query
    pairs = [("ab", "ba"), ("cd", "dc"), ("ef", "fe")]
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text("".join(json.dumps({"id": i, "messages": [
        m for x, y in pairs[i:] + pairs[:i] for m in ({"role": "user", "content": x},
                                                      {"role": "assistant", "content": y, "loss": 1})]}) + "\n"
        for i in range(3)))
    assert main(["eval", "--model", str(tiny_checkpoint), "--manyshot", str(episodes), "--shots", "0,1",
                 "--items", "3", "--max-new-tokens", "3", "--output-dir", str(tmp_path / "ms2")]) == 0
    assert set(json.loads((tmp_path / "ms2" / "manyshot.json").read_text())["accuracy"]) == {"0", "1"}
    capsys.readouterr()
    for argv, msg in ((["--manyshot", "no_such_task"], "no_such_task"),
                      (["--manyshot", str(tmp_path / "none.jsonl")], "no such episode file"),
                      (["--benchmark", "synthetic", "--shots", "0,1"], "apply to --manyshot"),
                      (["--manyshot", task, "--benchmark", "synthetic"], "one of --benchmark, --games and --manyshot"),
                      (["--manyshot", task, "--calibration"], "--calibration applies to --benchmark")):
        assert main(["eval", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "x")] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
