"""rlkit_rewards basics: the registry, math_accuracy on plain and conversational completions, and the
package's promise not to import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rlkit_rewards
from rlkit_rewards.math import gold_of, verify_answer
from rlkit_rewards.text import completion_text, extract_answer, last_boxed, parse_number


def test_registry_lists_math_accuracy():
    assert "math_accuracy" in rlkit_rewards.available()
    assert rlkit_rewards.available() == sorted(rlkit_rewards.available())
    f = rlkit_rewards.get("math_accuracy")
    assert callable(f) and f.__name__ and f.__name__ != "<lambda>"  # TRL names metrics after __name__


def test_math_accuracy_plain():
    f = rlkit_rewards.get("math_accuracy")
    completions = ["so \\boxed{2}", "the answer is 3.", "#### 1,000", "no answer here", "<answer>4</answer>",
                   "\\boxed{-5}"]
    golds = ["2", "2", "1000", "5", "4.0", "-5"]
    assert f(prompts=["q"] * 6, completions=completions, answer=golds) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_math_accuracy_conversational():
    f = rlkit_rewards.get("math_accuracy")
    prompts = [[{"role": "user", "content": "1+1?"}]] * 2
    completions = [[{"role": "assistant", "content": "It is \\boxed{2}."}],
                   [{"role": "assistant", "content": "It is \\boxed{3}."}]]
    assert f(prompts=prompts, completions=completions, answer=["2", "2"]) == [1.0, 0.0]


def test_math_accuracy_gold_forms():
    f = rlkit_rewards.get("math_accuracy")
    # None / empty gold -> not applicable; GSM8K-style solution cells reduce to their final answer
    out = f(prompts=["q"] * 4, completions=["\\boxed{42}"] * 4, answer=[None, "", "6*7=42\n#### 42", "  42 "])
    assert out == [None, None, 1.0, 1.0]
    assert gold_of(None) is None and gold_of("x #### 1,000") == "1,000" and gold_of("   ") is None


def test_math_accuracy_symbolic():
    f = rlkit_rewards.get("math_accuracy")
    gold = "\\frac{\\pi}{2}"
    out = f(prompts=["q"] * 3, completions=["\\boxed{\\frac{\\pi}{2}}", "\\boxed{\\pi/2}", "\\boxed{\\pi}"],
            answer=[gold] * 3)
    assert out == [1.0, 1.0, 0.0]


def test_math_accuracy_options():
    f = rlkit_rewards.get("math_accuracy", gold_column="gold")
    assert f(prompts=["q"], completions=["\\boxed{7}"], gold=["7"]) == [1.0]
    with pytest.raises(KeyError, match="'gold'"):
        f(prompts=["q"], completions=["\\boxed{7}"], answer=["7"])
    loose = rlkit_rewards.get("math_accuracy", rel_tol=0.01)
    strict = rlkit_rewards.get("math_accuracy")
    assert loose(prompts=["q"], completions=["\\boxed{100.5}"], answer=["100"]) == [1.0]
    assert strict(prompts=["q"], completions=["\\boxed{100.5}"], answer=["100"]) == [0.0]


def test_get_errors_name_nearest():
    with pytest.raises(ValueError, match="unknown reward 'math_acuracy'; did you mean 'math_accuracy'"):
        rlkit_rewards.get("math_acuracy")
    with pytest.raises(ValueError, match="has no option 'gold_colum'; did you mean 'gold_column'"):
        rlkit_rewards.get("math_accuracy", gold_colum="x")


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        rlkit_rewards.register("math_accuracy")(lambda: None)


def test_text_helpers():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed 5") == "5" and last_boxed("no box") is None and last_boxed("\\boxed{open") is None
    assert extract_answer("<answer> 3 </answer> then \\boxed{4}") == "4"
    assert extract_answer("The answer is: 12.\nok") == "12"
    assert extract_answer("nothing") is None
    assert parse_number("1,000") == 1000.0 and parse_number("$5") == 5.0 and parse_number("50\\%") == 50.0
    assert parse_number("1,00") is None and parse_number("x") is None and parse_number("-") is None
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    assert verify_answer("1000", "1,000.0") and not verify_answer("1000", "1001")


def test_import_does_not_pull_torch():
    code = "import rlkit_rewards, sys; rlkit_rewards.get('math_accuracy'); assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # and it does not import rlkit either (the reward package stands alone)
    code = "import rlkit_rewards, sys; assert not [m for m in sys.modules if m.split('.')[0] == 'rlkit'], 'rlkit imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
