"""rlkit trainers score rewards through ``rlkit_rewards.engine.RewardEngine`` by default (recipe section
``reward_engine``), pass TRL's ``trainer_state`` to reward functions in the workers, mark evaluation rows
``is_eval`` (so ``noisy`` never flips there) and log ``rewards/status/*`` each step."""

from __future__ import annotations

import json

import pytest
import torch

from rlkit.recipe import RecipeError, RewardEngineSpec, recipe_from_dict, resolve_runs

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning"),
]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
SYNTH = {"num_train": 32, "num_test": 4}
TRAINER = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=16, max_steps=2,
               logging_steps=1, learning_rate=1e-3, save_strategy="no", dataloader_num_workers=0)
STATUSES = ("ok", "wrong", "unparseable", "timeout", "error")


def step_reward(prompts, completions, trainer_state=None, **columns):
    """Module-level (so workers import it by reference): the global step TRL's trainer_state carries."""
    return [float(trainer_state.global_step) for _ in completions]


def eval_flag_reward(prompts, completions, is_eval=None, **columns):
    return [1.0 if (is_eval and is_eval[0]) else 0.0 for _ in completions]


def _recipe(tmp_path, **top):
    raw = {"method": "grpo", "seed": 0, "output_dir": str(tmp_path / "run"), "plot": False,
           "model": {"name": "tiny", "tiny": TINY},
           "data": {"train": {"name": "synthetic", "template": "plain", "synthetic": SYNTH}},
           "rewards": [{"name": "math_accuracy"}], "trainer": dict(TRAINER)}
    raw.update(top)
    return recipe_from_dict(raw)


def test_reward_engine_section_defaults_overrides_and_errors(tmp_path, monkeypatch):
    (run,) = resolve_runs(_recipe(tmp_path))
    assert run.reward_engine.enabled and run.reward_engine.item_timeout == 10.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert run.reward_engine.resolved_workers() == 8  # capped
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert run.reward_engine.resolved_workers() == 2  # cores shared between the ranks of this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert run.reward_engine.resolved_workers() == 1
    assert RewardEngineSpec(num_workers=3).resolved_workers() == 3

    (run,) = resolve_runs(_recipe(tmp_path, reward_engine={"enabled": False}))
    assert not run.reward_engine.enabled
    staged = recipe_from_dict({
        "seed": 0, "output_dir": str(tmp_path / "s"), "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "template": "plain", "synthetic": SYNTH}},
        "rewards": [{"name": "math_accuracy"}], "reward_engine": {"num_workers": 1, "item_timeout": 3},
        "stages": [{"name": "a", "method": "grpo", "trainer": dict(TRAINER)},
                   {"name": "b", "method": "grpo", "trainer": dict(TRAINER), "reward_engine": {"item_timeout": 7}}]})
    a, b = resolve_runs(staged)
    assert (a.reward_engine.num_workers, a.reward_engine.item_timeout) == (1, 3.0)
    assert (b.reward_engine.num_workers, b.reward_engine.item_timeout) == (1, 7.0)

    with pytest.raises(RecipeError, match="reward_engine.item_timeout: must be a positive"):
        _recipe(tmp_path, reward_engine={"item_timeout": 0})
    with pytest.raises(RecipeError, match="reward_engine: unknown key 'workers'; did you mean 'num_workers'"):
        _recipe(tmp_path, reward_engine={"workers": 2})
    with pytest.raises(RecipeError, match="num_workers: must be at least 1"):
        RewardEngineSpec(num_workers=0).resolved_workers()


def _run(tmp_path, monkeypatch, rewards, **top) -> list[dict]:
    import rlkit_rewards

    from rlkit.pipeline import run_one

    monkeypatch.setitem(rlkit_rewards.registry._REGISTRY, "_test_step", lambda: step_reward)
    (run,) = resolve_runs(_recipe(tmp_path, rewards=rewards, **top))
    run_one(run)
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def test_trainer_state_reaches_rewards_in_workers(tmp_path, monkeypatch):
    """``trainer_state`` goes to the worker processes: the reward is the step it was computed at."""
    logs = _run(tmp_path, monkeypatch, [{"name": "_test_step"}], reward_engine={"num_workers": 1})
    assert [h["reward"] for h in logs] == [0.0, 1.0]
    for h in logs:
        assert sum(h[f"rewards/status/{s}"] for s in STATUSES) == TRAINER["per_device_train_batch_size"]
        assert h["rewards/status/error"] == 0 and h["rewards/status/timeout"] == 0


def test_engine_disabled_uses_trls_scoring(tmp_path, monkeypatch):
    logs = _run(tmp_path, monkeypatch, [{"name": "_test_step"}], reward_engine={"enabled": False})
    assert [h["reward"] for h in logs] == [0.0, 1.0]  # TRL passes its own trainer_state
    assert not any(k.startswith("rewards/status/") for h in logs for k in h)


def _trainer(tmp_path, reward_funcs, engine):
    from trl import GRPOConfig

    from rlkit.data import build_dataset
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import DatasetSpec, TinyModelSpec
    from rlkit.methods.grpo import RLKitGRPOTrainer

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(**TINY), tok, seed=0)
    ds = build_dataset(DatasetSpec(name="synthetic", template="plain", synthetic=SYNTH), tok)
    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **TRAINER)
    return RLKitGRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=ds, processing_class=tok,
                            reward_engine=engine)


def test_eval_rows_are_marked_and_never_flipped(tmp_path):
    """In evaluation the engine gets ``is_eval=True`` per row, so ``noisy`` (p=1: flip everything in
    training) leaves scores alone; in training the same completions are flipped."""
    import rlkit_rewards
    from rlkit_rewards.engine import RewardEngine

    noisy = rlkit_rewards.get("noisy", p=1.0)
    with RewardEngine(num_workers=1, item_timeout=10) as engine:
        trainer = _trainer(tmp_path, [noisy, eval_flag_reward], engine)
        inputs = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
        prompts = [x["prompt"] for x in inputs]
        completions = [" #### 2", " #### 5"]
        ids = [[1, 2], [3, 4]]
        trainer.model.train()
        train_scores = trainer._calculate_rewards(inputs, prompts, completions, ids)
        trainer.model.eval()
        eval_scores = trainer._calculate_rewards(inputs, prompts, completions, ids)
    assert train_scores.tolist() == [[0.0, 0.0], [1.0, 0.0]]  # flipped, not eval
    assert eval_scores.tolist() == [[1.0, 1.0], [0.0, 1.0]]  # true verdicts, eval flag seen
    metrics = trainer._metrics
    assert metrics["train"]["rewards/status/wrong"] == [1.0] and metrics["train"]["rewards/status/ok"] == [1.0]
    assert metrics["eval"]["rewards/status/ok"] == [1.0]


def test_reward_models_fall_back_to_trls_path(tmp_path):
    """An ``nn.Module`` reward (a reward model) is scored by TRL's batched path, not the engine."""

    class Boom:
        def score(self, *a, **k):
            raise AssertionError("the engine must not see reward models")

    class RM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

    trainer = _trainer(tmp_path, [step_reward], Boom())
    trainer.reward_funcs = [RM()]
    called = []
    from trl import GRPOTrainer

    orig = GRPOTrainer._calculate_rewards
    try:
        GRPOTrainer._calculate_rewards = lambda self, *a: called.append(1) or torch.zeros(1, 1)
        trainer._calculate_rewards([{"prompt": "x"}], ["x"], ["y"], [[1]])
    finally:
        GRPOTrainer._calculate_rewards = orig
    assert called == [1]
