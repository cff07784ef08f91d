"""rlkit_rewards library rewards: format rewards, the Reasoning Pattern Reward (exact phrase lists and the
released-code scoring), question-wise noisy flips, the RPR-calibrated reward model and the verl adapter.
Expected RPR values below are worked out by hand in the comments."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import rlkit_rewards
from rlkit_rewards.calibrated import split_think_answer
from rlkit_rewards.noisy import flip_draw, global_step, prompt_key
from rlkit_rewards.rpr import MATH_PHRASES, OPEN_PHRASES, rep20, rpr_score
from rlkit_rewards.verl import compute_score, make_compute_score

TRAIN = {"trainer_state": SimpleNamespace(global_step=3)}


def test_all_registered():
    names = set(rlkit_rewards.available())
    assert {"think_answer_format", "boxed_format", "rpr", "rpr_open", "noisy", "calibrated_rm"} <= names
    for name in ("think_answer_format", "boxed_format", "rpr", "rpr_open", "noisy"):
        assert rlkit_rewards.get(name).__name__ not in ("", "<lambda>")


# ----------------------------------------------------------------------------------------- format
def test_think_answer_format():
    f = rlkit_rewards.get("think_answer_format")
    comps = [
        "<think>reason</think><answer>42</answer>",                   # 1
        "  <think>\nreason\n</think>\n<answer> 42 </answer>\n",       # 1: whitespace allowed
        "<think>a</think><answer>1</answer><answer>2</answer>",       # 0: two answers (hack)
        "<think>a</think><think>b</think><answer>1</answer>",         # 0: two thinks
        "<think>a</think><answer>1</answer><think>b</think><answer>2</answer>",  # 0: two pairs
        "<answer>1</answer><think>a</think>",                         # 0: wrong order
        "<think>a</think>",                                           # 0: no answer
        "hello <think>a</think><answer>1</answer>",                   # 0: text outside
        "<think>a</think><answer>1</answer> trailing",                # 0: text outside
        "<think></think><answer>1</answer>",                          # 0: empty think
        "<think>a</think><answer>1</answer></answer>",                # 0: stray closing tag
        "reason</think><answer>42</answer>",                          # 0 unless prefilled
    ]
    assert f(prompts=["q"] * len(comps), completions=comps) == [1.0, 1.0] + [0.0] * 10
    g = rlkit_rewards.get("think_answer_format", prefilled_think=True)
    assert g(prompts=["q"] * 3, completions=["reason</think><answer>42</answer>",
                                             "<think>reason</think><answer>42</answer>",  # second <think>
                                             "reason</think><answer>1</answer><answer>2</answer>"]) == [1.0, 0.0, 0.0]
    conv = [[{"role": "assistant", "content": "<think>r</think><answer>1</answer>"}]]
    assert f(prompts=[[{"role": "user", "content": "q"}]], completions=conv) == [1.0]


def test_boxed_format():
    f = rlkit_rewards.get("boxed_format")
    comps = ["so \\boxed{3}", "no answer", "\\boxed{}", "\\boxed{\\frac{1}{2}}", "the answer is 3"]
    assert f(prompts=["q"] * 5, completions=comps) == [1.0, 0.0, 0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------- RPR
def test_phrase_lists_exact():
    assert len(MATH_PHRASES) == 40 and len(set(MATH_PHRASES)) == 40
    assert len(OPEN_PHRASES) == 53 and len(set(OPEN_PHRASES)) == 53
    assert OPEN_PHRASES[:40] == MATH_PHRASES
    # exact strings, including the original typo and the trailing spaces
    for p in ("makes sence", "we can observe ", "we can see ", "first, ", "since we ", "given there ",
              "for instance ", "for example ", "let's focus on"):
        assert p in MATH_PHRASES
    for p in ("1. ", "4. ", "step 1 ", "step 3. ", "step 4 ", "considering the", "i'll", "i should"):
        assert p in OPEN_PHRASES and p not in MATH_PHRASES
    assert all(p == p.lower() for p in OPEN_PHRASES)


def test_rpr_hand_values():
    f = rlkit_rewards.get("rpr")
    # "wait", "i need to", "thus" -> 3 phrases; 10 words < 20 -> no 20-grams -> 3/20
    t1 = "Wait, I need to check. Thus the answer is 5."
    # one phrase, however many times it occurs -> 1/20
    t2 = "wait wait wait WAIT"
    # trailing space matters: "for example" at the end has no space after it -> 0
    t3 = "for example"
    # "first, " needs the comma and the space; "First," at the end has no trailing space -> 0
    t4 = "First,"
    assert f(prompts=["q"] * 4, completions=[t1, t2, t3, t4]) == pytest.approx([0.15, 0.05, 0.0, 0.0])
    # divisor option (the paper's 1/40): 3/40
    assert rlkit_rewards.get("rpr", divisor=40)(prompts=["q"], completions=[t1]) == pytest.approx([0.075])


def test_rpr_cap_at_one():
    text = " ; ".join(MATH_PHRASES[:25])  # >= 25 distinct phrases, no repeated 20-gram -> min(1, k/20) = 1
    assert rep20(text.lower()) == 0.0
    assert rpr_score(text) == 1.0
    assert rpr_score(" ; ".join(MATH_PHRASES[:10])) == pytest.approx(0.5)  # exactly 10 -> 10/20


def test_rep20():
    base = [f"t{i}" for i in range(20)]
    # 40 words -> 21 grams; gram 0 == gram 20 -> 1 repeated distinct gram -> 1/21
    assert rep20(" ".join(base * 2)) == pytest.approx(1 / 21)
    # 60 words -> 41 grams, periodic with period 20 -> all 20 distinct grams repeat -> 20/41
    assert rep20(" ".join(base * 3)) == pytest.approx(20 / 41)
    assert rep20(" ".join(base)) == 0.0 and rep20("") == 0.0
    # 45 words -> 26 grams, 1 repeated; 5 phrases (wait, thus, hence, therefore, consequently) -> 0.25 - 1/26
    text = " ".join(base * 2) + " wait thus hence therefore consequently"
    assert rpr_score(text) == pytest.approx(0.25 - 1 / 26)
    # the penalty can floor the score at 0: 1 phrase (0.05) - 20/41
    assert rpr_score(" ".join(base * 3) + " wait") == 0.0


def test_rpr_user_penalty_and_floor():
    text = "Wait, thus. User: what is 2+2? Therefore"  # wait, thus, therefore -> 0.15; one "user: " -> -1
    assert rlkit_rewards.get("rpr")(prompts=["q"], completions=[text]) == [0.0]  # floored at 0
    assert rlkit_rewards.get("rpr", user_penalty=False)(prompts=["q"], completions=[text]) == pytest.approx([0.15])
    assert rlkit_rewards.get("rpr_open")(prompts=["q"], completions=[text]) == pytest.approx([0.15])
    # "user:" without the trailing space does not count
    assert rpr_score("wait user:") == pytest.approx(0.05)
    # two "user: " occurrences, saturated phrases: 1 - 2 -> 0
    assert rpr_score(" ; ".join(MATH_PHRASES) + " user: a user: b") == 0.0


def test_rpr_open_list():
    text = "1. First, do this. 2. Then I'll do that"
    # open: "1. ", "first, ", "2. ", "i'll" -> 4/20; math: only "first, " -> 1/20
    assert rlkit_rewards.get("rpr_open")(prompts=["q"], completions=[text]) == pytest.approx([0.2])
    assert rlkit_rewards.get("rpr")(prompts=["q"], completions=[text]) == pytest.approx([0.05])


def test_rpr_require_answer_and_conversational():
    f = rlkit_rewards.get("rpr", require_answer=True)
    assert f(prompts=["q"] * 2, completions=["wait", "wait \\boxed{1}"]) == pytest.approx([0.0, 0.05])
    conv = [[{"role": "assistant", "content": "Wait, thus"}]]
    assert rlkit_rewards.get("rpr")(prompts=[[{"role": "user", "content": "q"}]], completions=conv) == pytest.approx([0.1])


# ----------------------------------------------------------------------------------------- noisy
def _flipped(p, prompts, step=3, seed=0):
    f = rlkit_rewards.get("noisy", p=p, seed=seed)
    out = f(prompts=prompts, completions=["\\boxed{1}"] * len(prompts), answer=["1"] * len(prompts),
            trainer_state=SimpleNamespace(global_step=step))
    return [o == 0.0 for o in out]


def test_noisy_flip_rate_and_determinism():
    prompts = [f"question {i}" for i in range(2000)]
    a = _flipped(0.4, prompts)
    assert abs(sum(a) / len(a) - 0.4) < 0.03
    assert _flipped(0.4, prompts) == a                       # same call again, new factory: same decisions
    assert _flipped(0.4, prompts, seed=1) != a               # seed changes decisions
    b = _flipped(0.4, prompts, step=4)
    assert b != a                                            # step changes decisions
    assert abs(sum(b) / len(b) - 0.4) < 0.03
    assert not any(_flipped(0.0, prompts[:100])) and all(_flipped(1.0, prompts[:100]))


def test_noisy_group_flipped_together_and_unparseable():
    f = rlkit_rewards.get("noisy", p=0.5, seed=7)
    prompts, comps, golds = [], [], []
    for q in range(50):
        for c in ["\\boxed{1}", "\\boxed{2}", "\\boxed{1}", "no answer at all"]:
            prompts.append(f"q{q}")
            comps.append(c)
            golds.append("1")
    out = f(prompts=prompts, completions=comps, answer=golds, **TRAIN)
    n_flipped = 0
    for q in range(50):
        g = out[4 * q : 4 * q + 4]
        assert g[3] == 0.0                                   # unparseable: 0, never flipped
        assert g[:3] in ([1.0, 0.0, 1.0], [0.0, 1.0, 0.0])   # the whole group flips together
        n_flipped += g[:3] == [0.0, 1.0, 0.0]
    assert 0 < n_flipped < 50
    # p = 1: every parseable reward flips, unparseable stays 0
    g = rlkit_rewards.get("noisy", p=1.0)
    assert g(prompts=["q"] * 3, completions=["\\boxed{1}", "\\boxed{2}", "nothing"], answer=["1"] * 3,
             **TRAIN) == [0.0, 1.0, 0.0]


def test_noisy_no_flip_in_eval_and_none_kept():
    f = rlkit_rewards.get("noisy", p=1.0)
    kw = dict(prompts=["q", "r"], completions=["\\boxed{1}", "\\boxed{1}"], answer=["1", "1"])
    assert f(**kw) == [1.0, 1.0]                                       # no trainer_state column
    assert f(**kw, trainer_state=None) == [1.0, 1.0]
    assert f(**kw, trainer_state={"global_step": 2}, is_eval=[True, False]) == [1.0, 0.0]
    assert f(**kw, **TRAIN, is_eval=True) == [1.0, 1.0]                # scalar flag for the batch
    assert rlkit_rewards.get("noisy", p=1.0, flip=False)(**kw, **TRAIN) == [1.0, 1.0]
    assert f(prompts=["q"], completions=["\\boxed{1}"], answer=[None], **TRAIN) == [None]


def test_noisy_options():
    # inner reward with options, key column instead of prompt text
    f = rlkit_rewards.get("noisy", inner="math_accuracy", inner_options={"gold_column": "gold"}, p=1.0,
                          key_column="prompt_id")
    assert f(prompts=["a", "b"], completions=["\\boxed{1}"] * 2, gold=["1", "2"], prompt_id=[0, 0],
             **TRAIN) == [0.0, 1.0]
    with pytest.raises(KeyError, match="key_column"):
        f(prompts=["a"], completions=["\\boxed{1}"], gold=["1"], **TRAIN)
    with pytest.raises(ValueError):
        rlkit_rewards.get("noisy", p=1.5)
    assert global_step(None) == 0 and global_step({"global_step": 5}) == 5
    assert global_step(SimpleNamespace(global_step=7)) == 7 and global_step(SimpleNamespace()) == 0
    conv = [{"role": "user", "content": "x"}]
    assert prompt_key(conv) == prompt_key([{"content": "x", "role": "user"}])


# ----------------------------------------------------------------------------------------- calibrated RM
class FakeRM:
    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, prompts, answers):
        self.calls.append((list(prompts), list(answers)))
        return [self.table[a] for a in answers]


def test_calibrated_rm():
    rm = FakeRM({"good": 0.9, "meh": 0.3, "bad": 0.45})
    f = rlkit_rewards.get("calibrated_rm", model=rm)
    comps = [
        "<think>reasoning</think><answer>good</answer>",                  # 0.9 >= tau: unchanged
        "<think>wait, i need to check. thus ok</think> <answer>meh</answer>",
        # think + answer = "wait, i need to check. thus okmeh": wait, i need to, thus -> 0.15 -> 0.3 + 0.015
        "<think>first, let me</think><answer>bad</answer>",              # "first, " -> 0.05 -> 0.45 + 0.005
        "no tags, good",                                                 # broken format -> 0, RM not asked
        "<answer>good</answer>",                                         # no think -> 0
    ]
    out = f(prompts=["p0", "p1", "p2", "p3", "p4"], completions=comps, **TRAIN)
    assert out == pytest.approx([0.9, 0.315, 0.455, 0.0, 0.0])
    assert rm.calls == [(["p0", "p1", "p2"], ["good", "meh", "bad"])]   # the RM sees only the answer text
    # evaluation: no calibration
    assert f(prompts=["p"] * 2, completions=comps[1:3]) == pytest.approx([0.3, 0.45])
    assert f(prompts=["p"] * 2, completions=comps[1:3], **TRAIN, is_eval=[True, False]) == pytest.approx([0.3, 0.455])


def test_calibrated_rm_options():
    rich = "<think>" + " ; ".join(OPEN_PHRASES[:30]) + "</think><answer>x</answer>"
    rm = FakeRM({"x": 0.95, "y": 0.2})
    # tau = 1: 0.95 + 0.1 * 1 -> capped at 1
    assert rlkit_rewards.get("calibrated_rm", model=rm, tau=1.0)(prompts=["p"], completions=[rich], **TRAIN) == [1.0]
    # alpha option, and rpr="rpr" adds the "user: " penalty (bonus 0)
    text = "<think>wait, thus. user: more?</think><answer>y</answer>"
    assert rlkit_rewards.get("calibrated_rm", model=rm, alpha=1.0)(
        prompts=["p"], completions=[text], **TRAIN) == pytest.approx([0.2 + 0.1])
    assert rlkit_rewards.get("calibrated_rm", model=rm, alpha=1.0, rpr="rpr")(
        prompts=["p"], completions=[text], **TRAIN) == pytest.approx([0.2])
    # prefilled <think>
    g = rlkit_rewards.get("calibrated_rm", model=rm, prefilled_think=True)
    assert g(prompts=["p"], completions=["reasoning</think><answer>x</answer>"], **TRAIN) == [0.95]
    assert split_think_answer("<think>a</think><answer> b </answer>") == ("a", " b ")
    assert split_think_answer("<answer>b</answer><think>a</think>") is None
    with pytest.raises(ValueError, match="model"):
        rlkit_rewards.get("calibrated_rm")
    with pytest.raises(ValueError, match="rpr"):
        rlkit_rewards.get("calibrated_rm", model=rm, rpr="nope")


# ----------------------------------------------------------------------------------------- verl
def test_verl_adapter():
    assert compute_score("gsm8k", "so \\boxed{4}", "4") == 1.0
    assert compute_score("gsm8k", "so \\boxed{5}", "4") == 0.0
    assert compute_score("gsm8k", "so \\boxed{5}", None) == 0.0               # None -> 0.0
    assert isinstance(compute_score("gsm8k", "\\boxed{4}", "#### 4", extra_info={"split": "train"}), float)
    f = make_compute_score("rpr")
    assert f("math", "Wait, I need to check. Thus the answer is 5.", "5") == pytest.approx(0.15)
    g = make_compute_score("math_accuracy", gold_column="gold")
    assert g("math", "\\boxed{2}", "ignored", extra_info={"gold": "2"}) == 1.0
    h = make_compute_score("noisy", p=1.0)  # verl items carry no trainer_state: never flipped
    assert h("math", "\\boxed{2}", "2") == 1.0


# ----------------------------------------------------------------------------------------- process-level
def test_no_torch_and_stable_hash_across_processes():
    code = ("import sys, rlkit_rewards; from rlkit_rewards.noisy import flip_draw; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print(repr(flip_draw('some prompt', 12, 3)))")
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1] == repr(flip_draw("some prompt", 12, 3))


def test_calibrated_rm_hf_model_id(tmp_path, char_tokenizer):
    """A model id string is loaded lazily (first call) as a one-label sequence classifier."""
    import math

    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, num_labels=1,
                      pad_token_id=char_tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    f = rlkit_rewards.get("calibrated_rm", model=str(tmp_path), tau=-1e9, device="cpu")
    comps = ["<think>r</think><answer>yes</answer>", "broken", "<think>r</think><answer>no</answer>"]
    out = f(prompts=["q", "q", [{"role": "user", "content": "q"}]], completions=comps, **TRAIN)
    assert out[1] == 0.0 and all(isinstance(x, float) and math.isfinite(x) for x in out)
    assert out == f(prompts=["q", "q", [{"role": "user", "content": "q"}]], completions=comps, **TRAIN)


@pytest.mark.serial  # wall-clock limits: CI runs it alone, after the parallel pass
def test_costly_answers_are_rejected_in_process_quickly():
    """Model output is untrusted: answers far costlier than their gold (megabytes, deep nesting, power towers,
    huge exponents) are rejected before sympy sees them, in-process and fast; legitimate powers still verify."""
    import time

    from rlkit_rewards.math import verify_answer
    from rlkit_rewards.text import extract_answer

    costly = ["1" * 1_000_000, "7^{7^{7^{7}}}", "\\frac{1}{7} + 0 \\cdot 7^{7^{7^{7}}}", "9^9^9^9",
              "{" * 5000 + "1" + "}" * 5000, "\\sqrt{" * 200 + "2" + "}" * 200, "2^{100000000}",
              "10^{10^{10}} - 10^{10^{10}} + 3", "x+" * 400 + "1", "(10^{10})!", "123456!"]
    for answer in costly:
        t0 = time.perf_counter()
        assert verify_answer("3", answer) is False
        assert time.perf_counter() - t0 < 0.5, answer[:40]
    assert verify_answer("2^{2015}", "2^{2015}")
    assert verify_answer("2^{2^{n}}", "2^{2^n}")  # nesting the gold has is allowed
    assert verify_answer("3^{100}", "3^{100}") and not verify_answer("3^{100}", "3^{101}")
    assert verify_answer("120", "5!") and verify_answer("3628800", "10!") and verify_answer("10,\\!080", "10080")
    assert extract_answer("so the answer is \\boxed{3") is None  # unbalanced box: no final answer
    t0 = time.perf_counter()
    assert extract_answer("The answer is x" + " " * 1_000_000 + "y").startswith("x")  # linear, not quadratic
    assert time.perf_counter() - t0 < 0.5
