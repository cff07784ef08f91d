"""ER-PRM step labels (`method: prm_label`, `rlkit prm label`): the label math, the stage's rows, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import rlkit_rewards
from rlkit.methods.prm.labels import (er_label, er_label_from_p, hard_label, merge_short_steps, soft_label,
                                      solution_steps, step_labels)
from rlkit.pipeline import run_recipe
from rlkit.recipe import RecipeError, recipe_from_dict

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
PLAN_FIELDS = {"prompt", "completion", "answer", "steps", "labels", "labels_er", "labels_hard", "labels_soft",
               "step_correct", "step_rollouts", "correct", "eta", "label_model", "row_index"}
PARITY = "test_prm_last_char_parity"


def _parity_reward():
    """1 when the solution's last character has an even code: a random tiny model's continuations are then
    correct about half the time, so the labels are not all 0 (no tiny model solves arithmetic)."""

    def reward(prompts, completions, **_):
        return [float(bool(c) and ord(c[-1]) % 2 == 0) for c in completions]

    return reward


if PARITY not in rlkit_rewards.available():
    rlkit_rewards.register(PARITY)(_parity_reward)


# --------------------------------------------------------------------------------------------------
# label math


def test_eta_limits_give_the_mean_and_the_max():
    ys = [0.0, 1.0, 1.0, 0.0, 0.0]
    assert er_label(ys, 0) == soft_label(ys) == pytest.approx(0.4)
    assert er_label(ys, 1e-9) == pytest.approx(0.4, abs=1e-8)
    assert er_label(ys, 1e-4) == pytest.approx(0.4, abs=1e-4)
    assert er_label(ys, 1e4) == pytest.approx(1.0, abs=1e-3)
    assert er_label(ys, math.inf) == hard_label(ys) == 1.0
    values = [er_label(ys, eta) for eta in (0, 0.1, 0.5, 1, 2, 5, 20, 100, 1e3)]
    assert values == sorted(values) and 0.4 < values[3] < 1.0  # monotone in eta, strictly between at eta 1
    reals = [0.3, -0.2, 0.9]  # any real values (target: reward)
    assert er_label(reals, 1e-9) == pytest.approx(sum(reals) / 3, abs=1e-8)
    assert er_label(reals, 1e5) == pytest.approx(0.9, abs=1e-4)
    assert er_label([1.0] * 4, 3.0) == 1.0 and er_label([0.0] * 4, 3.0) == 0.0


def test_labels_of_a_hand_made_rollout_table_equal_the_formula():
    table = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    for eta in (0.5, 1.0, 3.0):
        labels = step_labels(table, final=1.0, eta=eta)
        assert labels["er"][:-1] == pytest.approx([math.log(sum(math.exp(eta * y) for y in ys) / 4) / eta
                                                   for ys in table], rel=1e-12)
        assert labels["hard"] == [1.0, 0.0, 1.0, 1.0, 1.0] and labels["soft"] == [0.5, 0.0, 0.75, 1.0, 1.0]
        assert labels["er"][-1] == 1.0
    assert step_labels([], final=0.0) == {"er": [0.0], "hard": [0.0], "soft": [0.0]}
    assert step_labels(table, final=0.0, eta=1.0, round_to=3)["er"] == [0.62, 0.0, 0.828, 1.0, 0.0]


def test_the_p_form_agrees_with_the_rollout_form():
    for n in (1, 2, 16):
        for k in range(n + 1):
            ys = [1.0] * k + [0.0] * (n - k)
            for eta in (0, 1e-6, 0.3, 1, 2, 10, 29, 31, 200, 1e6, math.inf):
                assert er_label_from_p(k / n, eta) == pytest.approx(er_label(ys, eta), rel=1e-12, abs=1e-12)
    # the released calculate_score.py's normalize_score (eta an int there), then round(label, 3)
    def released(labels: list[int], eta: int) -> float:
        total = labels.count(0) / len(labels) * math.exp(eta * 0) + labels.count(1) / len(labels) * math.exp(eta)
        return round(math.fabs(1 / eta * math.log(total)), 3)

    for k in range(17):
        for eta in (1, 2, 5):
            assert er_label_from_p(k / 16, eta, round_to=3) == released([1] * k + [0] * (16 - k), eta)
    assert er_label_from_p(3 / 16, 1, round_to=3) == 0.279
    with pytest.raises(ValueError, match="eta must be >= 0"):
        er_label_from_p(0.5, -1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        er_label_from_p(1.5, 1)


def test_no_absolute_value_for_negative_rewards():
    """The released code takes |label|: a no-op for 0/1 rollouts (the log's argument is >= 1), but it would turn
    all-wrong rollouts scored -1 into +1. The label here keeps its sign."""
    assert er_label([0, 0, 1], 1.0) >= 0 and er_label([-1.0, -1.0], 1.0) == -1.0
    assert -1.0 < er_label([-1.0, 1.0], 1.0) < 1.0


def test_steps_rebuild_the_solution():
    text = "a=1\nb=22\nccc=333\nd\n#### 4"
    assert solution_steps(text) == ["a=1\n", "b=22\n", "ccc=333\n", "d\n", "#### 4"]
    merged = solution_steps(text, min_step_chars=8)
    assert merged == ["a=1\nb=22\n", "ccc=333\n", "d\n#### 4"] and "".join(merged) == text
    capped = solution_steps(text, max_steps=2)
    assert capped == ["a=1\n", "b=22\nccc=333\nd\n#### 4"]
    assert merge_short_steps(["abc", "d"], 10) == ["abcd"] and merge_short_steps(["x", "y"], 0) == ["x", "y"]
    assert solution_steps("") == []


# --------------------------------------------------------------------------------------------------
# the stage


def _recipe(out: Path, data: dict | None = None, reward: str = PARITY, **args) -> dict:
    return {"method": "prm_label", "seed": 3, "output_dir": str(out), "plot": False,
            "reward_engine": {"enabled": False},
            "model": {"name": "tiny", "tiny": TINY},
            "data": {"train": data or {"name": "synthetic", "split": "test", "template": "plain", "limit": 3}},
            "rewards": [{"name": reward}],
            "args": {"num_rollouts": 3, "max_new_tokens": 6, "chunk_size": 1, **args}}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]


SAMPLES = [  # a sample stage's rows: two samples of one prompt share their first step
    {"prompt_index": 0, "sample_index": 0, "prompt": "Question: 1+2+0\nAnswer: ", "completion": "1+2=3\n3+0=3\n#### 3",
     "answer": "3", "reward": 1.0, "status": "ok"},
    {"prompt_index": 0, "sample_index": 1, "prompt": "Question: 1+2+0\nAnswer: ", "completion": "1+2=3\n3+0=4\n#### 4",
     "answer": "3", "reward": 0.0, "status": "wrong"},
    {"prompt_index": 1, "sample_index": 0, "prompt": "Question: 5-1\nAnswer: ", "completion": "5-1=4\n#### 4",
     "answer": "4", "reward": 1.0, "status": "ok"},
]


def test_rows_of_a_sample_stage_get_labels_that_match_their_counts(tmp_path, write_jsonl):
    data = {"name": f"jsonl:{write_jsonl(SAMPLES)}"}
    out = tmp_path / "lab"
    (summary,) = run_recipe(recipe_from_dict(_recipe(out, data, chunk_size=8, eta=2.0)))
    rows = _rows(out)
    assert [r["row_index"] for r in rows] == [0, 1, 2]
    assert summary["rows"] == 3 and summary["steps"] == 8
    assert summary["rollouts_generated"] == 4 * 3  # 5 prefixes, the shared first step sampled once
    assert rows[0]["step_correct"][0] == rows[1]["step_correct"][0]
    for r, src in zip(rows, SAMPLES):
        assert PLAN_FIELDS <= set(r) and r["sample_index"] == src["sample_index"] and r["reward"] == src["reward"]
        assert "".join(r["steps"]) == r["completion"] == src["completion"]
        n = len(r["steps"])
        assert all(len(r[k]) == n for k in ("labels", "labels_er", "labels_hard", "labels_soft", "step_correct",
                                            "step_rollouts"))
        assert r["step_rollouts"] == [3] * (n - 1) + [0] and r["eta"] == 2.0 and r["label_model"] == "tiny"
        assert r["correct"] == int(ord(r["completion"][-1]) % 2 == 0)  # the solution's own status
        assert r["labels"] == r["labels_er"]
        for k in range(n - 1):
            p = r["step_correct"][k] / r["step_rollouts"][k]
            assert r["labels_soft"][k] == pytest.approx(p)
            assert r["labels_hard"][k] == float(r["step_correct"][k] > 0)
            assert r["labels_er"][k] == pytest.approx(er_label_from_p(p, 2.0))
        assert r["labels_er"][-1] == r["labels_hard"][-1] == r["labels_soft"][-1] == r["correct"]
    assert 0 < summary["mean_label_soft"] < 1  # the parity reward gives mixed rollouts
    assert sum(r["step_correct"][k] for r in rows for k in range(len(r["steps"]) - 1)) > 0
    assert json.loads((out / "labels.meta.json").read_text())["config"]["num_rollouts"] == 3

    # without sharing every prefix gets its own rollouts; hard labels in the labels column
    own = tmp_path / "own"
    (summary,) = run_recipe(recipe_from_dict(_recipe(own, data, chunk_size=8, dedupe_prefixes=False, kind="hard")))
    assert summary["rollouts_generated"] == 5 * 3
    assert all(r["labels"] == r["labels_hard"] for r in _rows(own))


def test_a_resumed_run_writes_what_an_uninterrupted_one_does(tmp_path):
    whole = tmp_path / "whole"
    run_recipe(recipe_from_dict(_recipe(whole)))
    expected = _rows(whole)
    assert len(expected) == 3 and any(0 < v < 1 for r in expected for v in r["labels_er"])
    cut = tmp_path / "cut"
    run_recipe(recipe_from_dict(_recipe(cut)))
    lines = (cut / "labels.jsonl").read_text().splitlines(keepends=True)
    (cut / "labels.jsonl").write_text(lines[0] + lines[1][:40])  # killed while writing the second chunk
    (cut / "manifest.json").unlink()
    (summary,) = run_recipe(recipe_from_dict(_recipe(cut)))
    assert summary["written_now"] == 2 and summary["rows"] == 3
    assert _rows(cut) == expected

    (whole / "manifest.json").unlink()
    with pytest.raises(RecipeError, match="other settings .*config"):
        run_recipe(recipe_from_dict(_recipe(whole, eta=2.0)))


def test_target_reward_and_a_null_reward(tmp_path, write_jsonl):
    data = {"name": f"jsonl:{write_jsonl(SAMPLES[2:])}"}
    out = tmp_path / "rw"
    run_recipe(recipe_from_dict(_recipe(out, data, target="reward")))
    (row,) = _rows(out)
    assert len(row["step_rewards"]) == 1 and len(row["step_rewards"][0]) == 3
    assert row["labels_soft"][0] == pytest.approx(sum(row["step_rewards"][0]) / 3)
    no_gold = {"name": f"jsonl:{write_jsonl([{**SAMPLES[2], 'answer': None}], 'nogold.jsonl')}"}
    from rlkit.data import DataError

    with pytest.raises(DataError, match="row 0: no reward applies"):
        run_recipe(recipe_from_dict(_recipe(tmp_path / "ng", no_gold, reward="math_accuracy")))


def test_recipe_errors_are_one_line():
    cases = [({"kind": "max"}, r"args\.kind"), ({"eta": -1.0}, "eta must be >= 0"),
             ({"num_rollouts": 0}, "num_rollouts must be at least 1"),
             ({"num_rollouts": 2, "temperature": 0}, "temperature 0 is greedy"),
             ({"backend": "vllm"}, "vLLM cannot load the in-memory 'tiny' model"),
             ({"num_rollout": 2}, "did you mean 'num_rollouts'"), ({"max_steps": 0}, "max_steps must be at least 1")]
    for args, match in cases:
        with pytest.raises(RecipeError, match=match) as e:
            recipe_from_dict({**_recipe(Path("x")), "args": args})
        assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="prm_label needs at least one reward"):
        recipe_from_dict({**_recipe(Path("x")), "rewards": []})


def test_cli_prm_label(tmp_path, write_jsonl, capsys):
    from rlkit.cli import main

    out = tmp_path / "cli"
    assert main(["prm", "label", "--model", "tiny", "--data", f"jsonl:{write_jsonl(SAMPLES)}", "--out", str(out),
                 "--num-rollouts", "2", "--max-new-tokens", "4", "--eta", "0.5", "--kind", "soft"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["rows"] == 3 and summary["datasets"] == {"labels": str(out / "labels.jsonl")}
    rows = _rows(out)
    assert len(rows) == 3 and all(r["labels"] == r["labels_soft"] and r["eta"] == 0.5 for r in rows)
    assert all(r["step_rollouts"][:-1] == [2] * (len(r["steps"]) - 1) for r in rows)
    assert all(r["correct"] == (r["status"] == "ok") for r in rows)  # math_accuracy agrees with the sample rows
    assert json.loads((out / "summary.json").read_text())["rows"] == 3
