"""GRPO parity and hooks (rlkit/methods/grpo.py, rlkit/pipeline.py).

With nothing extra turned on, rlkit's GRPO must train exactly like plain ``trl.GRPOTrainer``: same
seed, same tiny model, same synthetic data, same reward -> same first-step loss, grad norm, rewards and
updated weights. The hooks (``extra_token_mask``, ``reward_engine``, ``postprocess_batch``,
``log_method_metric``) must change training in the documented way.

At the first step of GRPO with ``num_iterations=1`` the loss value is close to 0 by construction (the
importance ratio is 1 and group advantages sum to 0), so the tests also compare the grad norm and the
updated parameters, which depend on every part of the step; the reward used varies within a group so
advantages are not all zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlkit_rewards
from rlkit.data import build_dataset
from rlkit.models import build_char_tokenizer, build_tiny_model
from rlkit.recipe import DatasetSpec, TinyModelSpec, recipe_from_dict, resolve_runs

SEED = 42
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
SYNTH = {"num_train": 32, "num_test": 4}
TRAINER = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=16, max_steps=1,
               logging_steps=1, learning_rate=1e-3, save_strategy="no", dataloader_num_workers=0)
COMPARED = ["loss", "grad_norm", "reward", "reward_std", "entropy", "num_tokens", "completions/mean_length"]
TEST_REWARD = "_test_digit_fraction"

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning"),
]


def digit_fraction(prompts, completions, **columns):
    """A reward that differs between the completions of a random model (so advantages are non-zero)."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def _digit_fraction_factory():
    return digit_fraction


def make_parts(seed: int = SEED):
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(**TINY), tok, seed=seed)
    ds = build_dataset(DatasetSpec(name="synthetic", template="plain", synthetic=SYNTH), tok)
    return model, tok, ds


def grpo_config(out: Path, **over):
    from trl import GRPOConfig

    kw = dict(TRAINER, output_dir=str(out), seed=SEED, report_to="none", bf16=False)
    kw.update(over)
    return GRPOConfig(**kw)


def train(trainer_cls, out: Path, reward_funcs=None, **kwargs):
    model, tok, ds = make_parts()
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs or [digit_fraction], args=grpo_config(out),
                          train_dataset=ds, processing_class=tok, **kwargs)
    trainer.train()
    return trainer


def first_log(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert logs, trainer.state.log_history
    return logs[0]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_logs(a: dict, b: dict, keys=COMPARED):
    for key in keys:
        assert key in a and key in b, key
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), f"{key}: {a[key]} != {b[key]}"


@pytest.fixture(scope="module")
def plain_trl(tmp_path_factory):
    """Plain TRL GRPOTrainer, one step: (first log, initial params, trained params)."""
    from trl import GRPOTrainer

    init = params(make_parts()[0])
    trainer = train(GRPOTrainer, tmp_path_factory.mktemp("plain"))
    log = first_log(trainer)
    assert log["grad_norm"] > 0 and log["reward_std"] > 0, "the parity setup must have a non-trivial gradient"
    return log, init, params(trainer.model)


def test_rlkit_grpo_trainer_matches_plain_trl(plain_trl, tmp_path):
    from rlkit.methods.grpo import RLKitGRPOTrainer

    log, init, trained = plain_trl
    trainer = train(RLKitGRPOTrainer, tmp_path)
    mine = first_log(trainer)
    assert_close_logs(log, mine)
    assert not any(k.startswith("rewards/status/") for k in mine)  # no engine -> TRL's own scoring
    new = params(trainer.model)
    assert any(not torch.equal(init[k], trained[k]) for k in init), "one step must change the weights"
    for k in trained:
        torch.testing.assert_close(new[k], trained[k], rtol=1e-6, atol=1e-7, msg=k)


def test_run_one_matches_plain_trl(plain_trl, tmp_path, monkeypatch):
    """The whole recipe path (recipe -> RunSpec -> run_one -> RLKitGRPOTrainer with its default
    RewardEngine) equals plain TRL."""
    from safetensors.torch import load_file

    from rlkit.pipeline import DONE_MARKER, run_one

    # a reward registered for this test only (undone afterwards, so other tests see the real registry)
    monkeypatch.setitem(rlkit_rewards.registry._REGISTRY, TEST_REWARD, _digit_fraction_factory)
    log, _, trained = plain_trl
    recipe = recipe_from_dict({
        "method": "grpo", "seed": SEED, "output_dir": str(tmp_path / "run"), "plot": False,
        "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "template": "plain", "synthetic": SYNTH}},
        "rewards": [{"name": TEST_REWARD}],
        "trainer": dict(TRAINER),
    })
    (run,) = resolve_runs(recipe)
    summary = run_one(run)
    out = tmp_path / "run"
    history = json.loads((out / "log_history.json").read_text())
    mine = next(h for h in history if "loss" in h and "train_runtime" not in h)
    assert_close_logs(log, mine)
    # the rewards went through the default RewardEngine (worker processes), with the same scores as TRL's
    assert sum(mine[f"rewards/status/{s}"] for s in ("ok", "wrong", "unparseable", "timeout", "error")) == 8
    assert mine["rewards/status/timeout"] == 0 and mine["rewards/status/error"] == 0
    final = Path(summary["final_model"])
    assert final == out / "final" and (final / DONE_MARKER).exists()
    saved = {}
    for f in final.glob("*.safetensors"):
        saved.update(load_file(f))
    assert saved, "final model must be saved as safetensors"
    for k, v in saved.items():
        torch.testing.assert_close(v, trained[k], rtol=1e-6, atol=1e-7, msg=k)


def test_extra_token_mask_zero_removes_the_gradient(plain_trl, tmp_path):
    from rlkit.methods.grpo import RLKitGRPOTrainer

    log, init, _ = plain_trl
    seen = []

    class NoTokens(RLKitGRPOTrainer):
        def extra_token_mask(self, batch, inputs):
            seen.append(tuple(batch["completion_mask"].shape))
            return torch.zeros_like(batch["completion_mask"])

    trainer = train(NoTokens, tmp_path)
    mine = first_log(trainer)
    assert seen and seen[0][0] == TRAINER["per_device_train_batch_size"]
    assert mine["loss"] == 0.0 and mine["grad_norm"] == 0.0
    assert log["loss"] != 0.0 and log["grad_norm"] > 0
    # same rollouts as plain TRL (the mask only changes the loss) ...
    assert_close_logs(log, mine, keys=["reward", "reward_std", "num_tokens"])
    # ... but no update: Adam with an all-zero gradient leaves the weights unchanged
    new = params(trainer.model)
    for k in init:
        assert torch.equal(new[k], init[k]), k


def test_extra_token_mask_partial_changes_the_step(plain_trl, tmp_path):
    from rlkit.methods.grpo import RLKitGRPOTrainer

    log, _, _ = plain_trl

    class FirstHalf(RLKitGRPOTrainer):
        def extra_token_mask(self, batch, inputs):
            mask = torch.ones_like(batch["completion_mask"])
            mask[:, mask.shape[1] // 2:] = 0
            return mask

    mine = first_log(train(FirstHalf, tmp_path))
    assert mine["grad_norm"] > 0
    assert mine["grad_norm"] != pytest.approx(log["grad_norm"], rel=1e-3)
    assert_close_logs(log, mine, keys=["reward", "num_tokens"])


class FakeEngine:
    """A reward engine whose scores and statuses the test controls."""

    PATTERN = [(1.0, "ok"), (0.0, "wrong"), (0.0, "unparseable"), (1.0, "ok")]

    def __init__(self):
        self.calls = []

    def score(self, funcs, prompts, completions, completion_ids, columns, kwargs=None):
        self.calls.append(dict(funcs=list(funcs), prompts=list(prompts), completions=list(completions),
                               completion_ids=completion_ids, columns=columns, kwargs=kwargs))
        scores, statuses = [], []
        for i in range(len(prompts)):
            s, st = self.PATTERN[i % len(self.PATTERN)]
            scores.append([s] * len(funcs))
            statuses.append(st)
        return scores, statuses


def must_not_run(prompts, completions, **columns):
    raise AssertionError("with a reward engine, TRL's own serial scoring must not run")


def test_reward_engine_scores_and_status_counts(tmp_path):
    from rlkit.methods.grpo import RLKitGRPOTrainer

    post = []

    class Hooked(RLKitGRPOTrainer):
        def postprocess_batch(self, batch, inputs):
            post.append(batch["advantages"].detach().clone())
            self.log_method_metric("method/advantage_abs_sum", batch["advantages"].abs().sum().item())
            return batch

    engine = FakeEngine()
    trainer = train(Hooked, tmp_path, reward_funcs=[must_not_run], reward_engine=engine)
    log = first_log(trainer)
    n = TRAINER["per_device_train_batch_size"]

    assert len(engine.calls) == 1
    call = engine.calls[0]
    assert call["funcs"] == trainer.reward_funcs and len(call["prompts"]) == len(call["completions"]) == n
    assert len(call["completion_ids"]) == n and all(isinstance(t, int) for t in call["completion_ids"][0])
    assert len(call["columns"]["answer"]) == n and call["columns"]["answer"][0] == call["columns"]["answer"][3]
    assert "question" in call["columns"] and "is_eval" not in call["columns"]
    assert call["kwargs"]["trainer_state"].global_step == 0  # a light, picklable copy of TRL's trainer_state

    assert log["rewards/status/ok"] == 4.0
    assert log["rewards/status/wrong"] == 2.0
    assert log["rewards/status/unparseable"] == 2.0
    assert log["rewards/status/timeout"] == 0.0 and log["rewards/status/error"] == 0.0
    assert log["reward"] == pytest.approx(0.5)  # the engine's scores are the ones trained on
    assert log["rewards/must_not_run/mean"] == pytest.approx(0.5)

    # postprocess_batch saw the advantages computed from the engine's scores, and its metric is logged
    assert len(post) == 1 and post[0].shape == (n,)
    expected = torch.tensor([1.0, 0.0, 0.0, 1.0] * (n // 4))
    groups = expected.view(-1, TRAINER["num_generations"])
    expected_adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(post[0], expected_adv, rtol=1e-4, atol=1e-4)
    assert log["method/advantage_abs_sum"] == pytest.approx(expected_adv.abs().sum().item(), rel=1e-4)
