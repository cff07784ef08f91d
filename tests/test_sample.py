"""The `sample` method and `rlkit sample`: N scored completions per prompt written as a resumable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlkit.pipeline import run_recipe
from rlkit.recipe import RecipeError, recipe_from_dict

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
FIELDS = {"prompt_index", "sample_index", "question", "answer", "prompt", "completion", "reward", "rewards",
          "status", "prompt_tokens", "completion_tokens", "finish_reason", "model", "seed"}


def _recipe(out: Path, limit: int = 5, rewards=None, engine: bool = False, **args) -> dict:
    """A sample stage on the tiny model; rewards are scored in-process unless ``engine`` (worker start-up costs
    seconds; the engine path is covered by test_in_process_scoring_equals_the_engine)."""
    return {"method": "sample", "seed": 3, "output_dir": str(out), "plot": False,
            "reward_engine": {"enabled": engine},
            "model": {"name": "tiny", "tiny": TINY},
            "data": {"train": {"name": "synthetic", "split": "test", "template": "plain", "limit": limit}},
            "rewards": rewards or [{"name": "math_accuracy"}],
            "args": {"num_samples": 2, "max_new_tokens": 10, "chunk_size": 2, **args}}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_rows_hold_every_field(tmp_path):
    out = tmp_path / "s"
    (summary,) = run_recipe(recipe_from_dict(_recipe(out, steps="newline", temperature=0.8, top_k=5,
                                                     stop=["####"])))
    rows = _rows(out)
    assert len(rows) == 10 and summary["samples"] == 10 and summary["prompts"] == 5
    assert all(FIELDS | {"steps"} <= set(r) for r in rows)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, k) for i in range(5) for k in range(2)]
    for r in rows:
        assert "".join(r["steps"]) == r["completion"]
        assert r["prompt"].startswith("Question: ") and r["prompt_tokens"] == len(r["prompt"])  # char tokenizer
        assert 1 <= r["completion_tokens"] <= 10 and r["finish_reason"] in ("stop", "length")
        assert "####" not in r["completion"]
        assert r["status"] in ("ok", "wrong", "unparseable") and r["rewards"] == {"math_accuracy": r["reward"]}
        assert r["model"] == "tiny" and r["seed"] == 3 and r["solution"]  # the input row's fields are kept
    stored = json.loads((out / "manifest.json").read_text())
    assert stored["datasets"] == {"samples": "samples.jsonl"}  # relative: the run folder can be moved
    from rlkit.pipeline import read_manifest

    manifest = read_manifest(out)
    assert manifest["datasets"] == {"samples": str(out / "samples.jsonl")} and manifest["model"] == "tiny"


def test_resumed_run_writes_what_an_uninterrupted_one_does(tmp_path):
    whole = tmp_path / "whole"
    run_recipe(recipe_from_dict(_recipe(whole)))
    expected = _rows(whole)
    cut = tmp_path / "cut"
    run_recipe(recipe_from_dict(_recipe(cut)))
    # as if killed after the first chunk (2 prompts x 2 samples) while writing the next line
    lines = (cut / "samples.jsonl").read_text().splitlines(keepends=True)
    (cut / "samples.jsonl").write_text("".join(lines[:4]) + lines[4][:25])
    (cut / "manifest.json").unlink()
    (summary,) = run_recipe(recipe_from_dict(_recipe(cut)))
    assert summary["written_now"] == 6
    assert _rows(cut) == expected


def test_resuming_with_other_settings_is_an_error(tmp_path):
    out = tmp_path / "s"
    run_recipe(recipe_from_dict(_recipe(out)))
    (out / "manifest.json").unlink()
    with pytest.raises(RecipeError, match="other settings .*config"):
        run_recipe(recipe_from_dict(_recipe(out, num_samples=3)))


def test_statuses_follow_the_rewards(tmp_path):
    """A format reward first: no math parser decides the status, so nothing is `unparseable`."""
    out = tmp_path / "fmt"
    run_recipe(recipe_from_dict(_recipe(out, rewards=[{"name": "boxed_format"}, {"name": "math_accuracy",
                                                                                "weight": 2.0}])))
    rows = _rows(out)
    assert {r["status"] for r in rows} <= {"ok", "wrong"}
    for r in rows:
        assert set(r["rewards"]) == {"boxed_format", "math_accuracy"}
        assert r["reward"] == pytest.approx(r["rewards"]["boxed_format"] + 2.0 * r["rewards"]["math_accuracy"])


def test_in_process_scoring_equals_the_engine(tmp_path):
    a, b = tmp_path / "engine", tmp_path / "local"
    run_recipe(recipe_from_dict(_recipe(a, limit=3, engine=True)))
    run_recipe(recipe_from_dict(_recipe(b, limit=3)))
    assert _rows(a) == _rows(b)


def test_recipe_errors():
    with pytest.raises(RecipeError, match=r"args: unknown key 'num_sample'; did you mean 'num_samples'"):
        recipe_from_dict({**_recipe(Path("x")), "args": {"num_sample": 2}})
    with pytest.raises(RecipeError, match="temperature 0 is greedy"):
        recipe_from_dict({**_recipe(Path("x")), "args": {"num_samples": 2, "temperature": 0}})
    with pytest.raises(RecipeError, match="vLLM cannot load the in-memory 'tiny' model"):
        recipe_from_dict({**_recipe(Path("x")), "args": {"backend": "vllm"}})
    with pytest.raises(RecipeError, match="sample needs at least one reward"):
        recipe_from_dict({**_recipe(Path("x")), "rewards": []})
    with pytest.raises(RecipeError, match="is not a trainer: its settings go under `args:`"):
        recipe_from_dict({**_recipe(Path("x")), "trainer": {"max_steps": 1}})
    with pytest.raises(RecipeError, match=r"rewards\[0\]\.options: reward 'math_accuracy' has no option 'gold'"):
        recipe_from_dict({**_recipe(Path("x")), "rewards": [{"name": "math_accuracy", "options": {"gold": 1}}]})


@pytest.mark.slow
def test_cli_sample_smollm2_gsm8k(tmp_path, data_file, capsys):
    """`rlkit sample` on the built-in SmolLM2-135M-Instruct and GSM8K test problems."""
    from rlkit.cli import main

    data_file("gsm8k_test.jsonl")
    out = tmp_path / "smol"
    assert main(["sample", "--model", "smollm2-135m-instruct", "--data", "gsm8k", "--split", "test",
                 "--path", str(data_file("gsm8k_test.jsonl")), "--limit", "4", "--num-samples", "2",
                 "--max-new-tokens", "48", "--temperature", "0.7", "--out", str(out), "--steps", "newline"]) == 0
    assert '"samples": 8' in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 8 and {r["prompt_index"] for r in rows} == {0, 1, 2, 3}
    assert all(r["prompt_tokens"] > 20 and 1 <= r["completion_tokens"] <= 48 for r in rows)
    assert all(r["model"] == "smollm2-135m-instruct" and "<|im_start|>" in r["prompt"] for r in rows)
    assert {r["status"] for r in rows} <= {"ok", "wrong", "unparseable"}
    assert json.loads((out / "summary.json").read_text())["samples"] == 8
