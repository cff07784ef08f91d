"""Shared reward plumbing: recipe-time checks of reward names/options (no model load), the engine's pluggable
answer-status classifier, and the `noisy` reward's paper-faithful `\\boxed{}`-only extraction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import rlkit_rewards
from rlkit_rewards.engine import RewardEngine

from rlkit.recipe import RecipeError, recipe_from_dict


def has_digit(completion) -> bool:  # a top-level function: the engine runs it in its workers
    return any(ch.isdigit() for ch in str(completion))


def test_check_validates_without_building_model_rewards(monkeypatch):
    import rlkit_rewards.calibrated as cal

    monkeypatch.setattr(cal, "hf_reward_model", lambda *a, **k: pytest.fail("the reward model was loaded"))
    rlkit_rewards.check("calibrated_rm", model="org/some-reward-model", tau=0.3)
    with pytest.raises(ValueError, match="rpr must be"):
        rlkit_rewards.check("calibrated_rm", model="org/m", rpr="bad")
    with pytest.raises(ValueError, match="needs option model"):
        rlkit_rewards.check("calibrated_rm")
    with pytest.raises(ValueError, match="no option 'gold_colum'; did you mean 'gold_column'"):
        rlkit_rewards.check("math_accuracy", gold_colum="x")
    with pytest.raises(ValueError, match="flip probability p must be in"):
        rlkit_rewards.check("noisy", p=1.5)
    assert rlkit_rewards.answer_format("math_accuracy") == "math"
    assert rlkit_rewards.answer_format("noisy") == "math"
    assert rlkit_rewards.answer_format("boxed_format") is None


def _raw(rewards) -> dict:
    return {"method": "grpo", "model": {"name": "tiny"}, "data": {"train": {"name": "synthetic"}},
            "rewards": rewards, "trainer": {"per_device_train_batch_size": 8, "num_generations": 4}}


def test_reward_errors_fail_at_recipe_time(monkeypatch):
    import rlkit.models

    monkeypatch.setattr(rlkit.models, "load_model", lambda *a, **k: pytest.fail("validation loaded a model"))
    with pytest.raises(RecipeError, match=r"rewards\[0\]\.options: noisy: extraction must be one of any, boxed"):
        recipe_from_dict(_raw([{"name": "noisy", "options": {"extraction": "latex"}}]))
    with pytest.raises(RecipeError, match=r"rewards\[1\]\.weight: must be a finite number"):
        recipe_from_dict(_raw([{"name": "math_accuracy"}, {"name": "boxed_format", "weight": float("nan")}]))
    recipe_from_dict(_raw([{"name": "calibrated_rm", "options": {"model": "org/rm"}}]))  # no model load


def test_engine_answer_check_is_pluggable():
    funcs = [rlkit_rewards.get("boxed_format")]
    completions = ["no answer at all", "7 apples", "\\boxed{3}"]
    with RewardEngine(num_workers=1, answer_check="math") as engine:
        _, statuses = engine.score(funcs, ["q"] * 3, completions)
    assert statuses == ["unparseable", "unparseable", "ok"]
    with RewardEngine(num_workers=1, answer_check=None) as engine:
        _, statuses = engine.score(funcs, ["q"] * 3, completions)
    assert statuses == ["wrong", "wrong", "ok"]
    with RewardEngine(num_workers=1, answer_check=has_digit) as engine:
        _, statuses = engine.score(funcs, ["q"] * 3, completions)
    assert statuses == ["unparseable", "wrong", "ok"]
    with pytest.raises(ValueError, match="top-level function"):
        RewardEngine(answer_check=lambda c: True)


def test_noisy_boxed_extraction_follows_the_released_code():
    state = SimpleNamespace(global_step=1)
    completions = ["so \\boxed{2}", "#### 2", "the answer is 2", "<answer>2</answer>", "\\boxed{3}"]
    golds = ["2"] * 5
    any_ = rlkit_rewards.get("noisy", p=0.0)
    boxed = rlkit_rewards.get("noisy", p=0.0, extraction="boxed")
    assert any_(["q"] * 5, completions, answer=golds, trainer_state=state) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert boxed(["q"] * 5, completions, answer=golds, trainer_state=state) == [1.0, 0.0, 0.0, 0.0, 0.0]
    flipped = rlkit_rewards.get("noisy", p=1.0, extraction="boxed")
    # a flip turns right into wrong and wrong into right, but a completion with no \boxed{} stays 0
    assert flipped(["q"] * 5, completions, answer=golds, trainer_state=state) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert flipped(["q"] * 5, completions, answer=golds) == [1.0, 0.0, 0.0, 0.0, 0.0]  # no trainer_state: eval


def test_paper_recipe_uses_boxed_extraction(repo_root):
    from rlkit.recipe import load_recipe

    recipe = load_recipe(repo_root / "recipes" / "noisy" / "qwen2.5-7b_math_noisy.yaml")
    (noisy,) = [r for r in recipe.rewards if r.name == "noisy"]
    assert noisy.options["extraction"] == "boxed" and noisy.options["p"] > 0
