"""StepHint trainer (rlkit/trainers/stephint.py): group layout, hinted generation, advantages and the
hint-token rule on hand-made batches, metrics, and end-to-end runs through the recipe path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rlkit.recipe import RecipeError, recipe_from_dict, resolve_runs

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning"),
]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
STEPS = ["3+4=7\n", "7+5=12\n", "12-2=10\n", "#### 10"]
ROW = {"prompt": "Question: 3+4+5-2\nAnswer: ", "question": "3+4+5-2", "answer": "10", "steps": STEPS}


def config(tmp_path, **over):
    from rlkit.methods.stephint import StepHintConfig

    kw = dict(output_dir=str(tmp_path), report_to="none", bf16=False, per_device_train_batch_size=12,
              max_completion_length=8, max_steps=1, logging_steps=1, learning_rate=1e-3, save_strategy="no",
              dataloader_num_workers=0, dataloader_pin_memory=False)
    kw.update(over)
    return StepHintConfig(**kw)


def make_trainer(tmp_path, reward_funcs=None, engine=None, rows=None, **over):
    import datasets

    from rlkit.methods.stephint import StepHintTrainer
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import TinyModelSpec

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(**TINY), tok, seed=0)
    ds = datasets.Dataset.from_list(rows or [dict(ROW) for _ in range(4)])
    return StepHintTrainer(model=model, reward_funcs=reward_funcs or [lambda prompts, completions, **k: [0.0] * len(completions)],
                           args=config(tmp_path, **over), train_dataset=ds, processing_class=tok, reward_engine=engine)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_config_layout_and_errors(tmp_path):
    cfg = config(tmp_path)
    assert cfg.group_size == 12 and cfg.num_generations == 12  # paper: 5 + 2 x 3 + 1
    assert cfg.member_roles() == [0] * 5 + [1, 1, 2, 2, 3, 3] + [-1]
    cfg = config(tmp_path, num_unhinted=11, num_per_level=0, include_reference=True, per_device_train_batch_size=12)
    assert cfg.member_roles() == [0] * 11 + [-1]  # the reference-replay-only baseline
    with pytest.raises(ValueError, match="num_generations .* must equal"):
        config(tmp_path, num_generations=6)
    with pytest.raises(ValueError, match="hint_token_rule"):
        config(tmp_path, hint_token_rule="zero")
    with pytest.raises(ValueError, match="divisible"):  # TRL's own check sees the group size
        config(tmp_path, per_device_train_batch_size=8)


def test_recipe_validation(tmp_path):
    base = {"method": "stephint", "output_dir": str(tmp_path), "model": {"name": "tiny"},
            "data": {"train": {"name": "synthetic"}}, "rewards": [{"name": "math_accuracy"}]}
    (run,) = resolve_runs(recipe_from_dict({**base, "trainer": {"per_device_train_batch_size": 12}}))
    assert run.method == "stephint"
    with pytest.raises(RecipeError, match="num_generations: StepHint sets it to the group size"):
        recipe_from_dict({**base, "trainer": {"per_device_train_batch_size": 12, "num_generations": 8}})
    with pytest.raises(RecipeError, match="hint_token_rule"):
        recipe_from_dict({**base, "trainer": {"per_device_train_batch_size": 12, "hint_token_rule": "x"}})
    with pytest.raises(RecipeError, match="unknown key 'num_unhinted_rollouts'; did you mean 'num_unhinted'"):
        recipe_from_dict({**base, "trainer": {"per_device_train_batch_size": 12, "num_unhinted_rollouts": 4}})


def test_plan_roles_and_prefixes(tmp_path):
    trainer = make_trainer(tmp_path)
    tok = trainer.processing_class
    short = dict(ROW, steps=STEPS[:2])  # a short chain: one hint level only
    plain = dict(ROW, steps=[])
    plan = trainer.build_plan([dict(ROW)] * 12 + [short] * 12 + [plain] * 12)
    assert len(plan) == 36
    full = ids(tok, "".join(STEPS))
    for k, m in enumerate(plan[:12]):
        role = trainer.args.member_roles()[k]
        assert m.role == role
        if role == 0:
            assert m.prefix == [] and not m.reference
        elif role == -1:
            assert m.reference and m.prefix == full + [tok.eos_token_id]
        else:
            assert m.prefix == ids(tok, "".join(STEPS[:role])) and not m.reference
            assert full[: len(m.prefix)] == m.prefix  # levels are prefixes of the reference
    # short chain: every hinted member gets its only level; the reference is the 2-step chain
    for m in plan[12:24]:
        if m.role > 0:
            assert m.prefix == ids(tok, STEPS[0])
        if m.role == -1:
            assert m.prefix[:-1] == ids(tok, "".join(STEPS[:2]))
    assert all(m.prefix == [] and not m.reference for m in plan[24:])  # no steps: plain rollouts


def test_plan_uses_global_position_across_processes(tmp_path, monkeypatch):
    """With 2 processes each holding half a group, member roles follow the global position."""
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    plan = trainer.build_plan([dict(ROW)] * 6)  # second half of a 12-member group
    assert [m.role for m in plan] == [1, 2, 2, 3, 3, -1]


def test_generation_prepends_hints_and_keeps_reference(tmp_path, monkeypatch):
    from rlkit.methods.grpo import RLKitGRPOTrainer

    trainer = make_trainer(tmp_path)
    tok = trainer.processing_class
    seen = {}

    def fake_generate(self, prompt_ids, images, mm, num_generations, has_tool_images=False):
        seen["prompts"], seen["n"] = prompt_ids, num_generations
        return [[7, 8, 9] for _ in prompt_ids], [[-0.1, -0.2, -0.3] for _ in prompt_ids]

    monkeypatch.setattr(RLKitGRPOTrainer, "_generate_single_turn", fake_generate)
    trainer._plan = trainer.build_plan([dict(ROW)] * 12)
    prompt = ids(tok, ROW["prompt"])
    out, logprobs = trainer._generate_single_turn([prompt] * 12, None, {}, 12)
    assert seen["n"] == 1  # one generation per member: vLLM must not merge the members' prompts
    for k, m in enumerate(trainer._plan):
        assert seen["prompts"][k] == prompt + m.prefix
        if m.reference:
            assert out[k] == m.prefix and logprobs[k] == [None] * len(m.prefix)
        else:
            assert out[k] == m.prefix + [7, 8, 9]
            assert logprobs[k] == [None] * len(m.prefix) + [-0.1, -0.2, -0.3]  # NaN: no IS correction on hints
    trainer._plan = None  # evaluation / no plan: TRL's path unchanged
    out, _ = trainer._generate_single_turn([prompt] * 2, None, {}, 12)
    assert seen["n"] == 12


class ScriptedEngine:
    """Scores member k of each group with SCORES[k] and records the completions it saw."""

    SCORES = [0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1]  # unhinted all wrong; level 1 half right; reference right

    def __init__(self):
        self.completions = []

    def score(self, funcs, prompts, completions, completion_ids, columns, kwargs=None):
        self.completions.append(list(completions))
        g = len(self.SCORES)
        scores = [[float(self.SCORES[i % g])] * len(funcs) for i in range(len(completions))]
        return scores, ["ok" if s[0] > 0 else "wrong" for s in scores]


@pytest.mark.parametrize("rule", ["clip", "mask", "none"])
def test_group_advantages_and_hint_token_rule(tmp_path, rule):
    """One real generation + scoring step on a hand-made batch: one group normalization over all 12
    members; hint/reference tokens never get a negative advantage (clip) or leave the loss (mask)."""
    engine = ScriptedEngine()
    trainer = make_trainer(tmp_path, engine=engine, hint_token_rule=rule)
    inputs = [dict(ROW) for _ in range(12)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(inputs)

    # the reward saw hint + continuation text, and the reference member saw the whole reference
    texts = engine.completions[0]
    plan = trainer.build_plan(inputs)
    for k, m in enumerate(plan):
        if m.role > 0:
            assert texts[k].startswith("".join(STEPS[: m.role]))
        if m.role == -1:
            assert texts[k] == "".join(STEPS)

    r = torch.tensor(ScriptedEngine.SCORES, dtype=torch.float32)
    expected = (r - r.mean()) / (r.std() + 1e-4)
    adv = batch["advantages"]
    given = torch.zeros_like(batch["completion_mask"], dtype=torch.bool)
    for k, m in enumerate(plan):
        given[k, : len(m.prefix)] = True
    assert given.any() and (~given & batch["completion_mask"].bool()).any()
    if rule == "clip":
        assert adv.shape == batch["completion_mask"].shape
        full = expected.unsqueeze(1).expand_as(adv)
        want = torch.where(given & (full < 0), torch.zeros_like(full), full)
        torch.testing.assert_close(adv, want, rtol=1e-4, atol=1e-4)
        assert (adv[given] >= 0).all()
        # level-2 and level-3 hinted members scored 0 here: negative advantage on their own tokens only
        k = next(k for k, m in enumerate(plan) if m.role == 1 and ScriptedEngine.SCORES[k] == 0)
        assert (adv[k, ~given[k] & batch["completion_mask"][k].bool()] < 0).all()
        assert "tool_mask" not in batch
    else:
        torch.testing.assert_close(adv, expected, rtol=1e-4, atol=1e-4)
    if rule == "mask":
        mask = batch["tool_mask"]
        assert (mask[given] == 0).all() and (mask[~given] == 1).all()
        assert batch["num_items_in_batch"].item() == (batch["completion_mask"] * mask).sum().item()
    metrics = trainer._metrics["train"]
    assert metrics["stephint/accuracy_level_0"][-1] == 0.0
    assert metrics["stephint/accuracy_level_1"][-1] == 0.5
    assert metrics["stephint/accuracy_level_ref"][-1] == 1.0
    assert metrics["stephint/all_equal_groups"][-1] == 0.0
    assert metrics["stephint/all_equal_unhinted"][-1] == 1.0  # plain GRPO on the 5 unhinted: no signal
    share = metrics["stephint/hint_token_share"][-1]
    assert (share == 0.0) if rule == "mask" else (0.0 < share < 1.0)


def test_eval_has_no_hints(tmp_path):
    engine = ScriptedEngine()
    trainer = make_trainer(tmp_path, engine=engine)
    trainer.model.eval()
    trainer._generate_and_score_completions([dict(ROW) for _ in range(12)])
    assert not any(t.startswith(STEPS[0]) for t in engine.completions[0][:11] if t)
    assert "".join(STEPS) not in engine.completions[0]


def _stephint_recipe(tmp_path, **trainer):
    t = dict(per_device_train_batch_size=12, max_completion_length=12, max_steps=1, logging_steps=1,
             learning_rate=1e-3, save_strategy="no", dataloader_num_workers=0, beta=0.0)
    t.update(trainer)
    return recipe_from_dict({
        "method": "stephint", "seed": 0, "output_dir": str(tmp_path / "run"), "plot": False,
        "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "template": "plain", "limit": 24,
                           "synthetic": {"num_train": 24, "num_test": 4, "max_operand": 12, "slip_rate": 0.9}}},
        "rewards": [{"name": "math_accuracy"}], "reward_engine": {"num_workers": 1}, "trainer": t})


@pytest.mark.parametrize("splitter", ["adaptive", "paragraph"])
def test_end_to_end_builds_hints_and_trains(tmp_path, splitter):
    """recipe -> hints split at the start of the run (cached) -> one StepHint step -> saved model; a second
    run reads the same hints through ``hints_path``."""
    from rlkit.methods.stephint.hints import read_hints
    from rlkit.pipeline import run_one

    (run,) = resolve_runs(_stephint_recipe(tmp_path, hint_splitter=splitter, hint_end_marker="####",
                                           hint_min_step_tokens=2))
    summary = run_one(run)
    out = tmp_path / "run"
    hints = read_hints(out / "hints.jsonl")
    assert len(hints) == 24
    for row in hints:
        assert "".join(row["steps"]) == row["reference"]  # the exact chain, not the slipped solution
        assert row["reference"].endswith(f"#### {row['answer']}")
        assert all(h == "".join(row["steps"][: j + 1]) for j, h in enumerate(row["hints"]))
    logs = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 1 and logs[0]["stephint/accuracy_level_ref"] == 1.0  # the exact chain always verifies
    assert 0 < logs[0]["stephint/hint_token_share"] < 1
    assert sum(logs[0][f"rewards/status/{s}"] for s in ("ok", "wrong", "unparseable", "timeout", "error")) == 12
    assert (out / "final" / ".rlkit_done").exists() and summary["final_model"]

    (run2,) = resolve_runs(_stephint_recipe(tmp_path / "second", hints_path=str(out / "hints.jsonl")))
    run_one(run2)
    assert not (tmp_path / "second" / "run" / "hints.jsonl").exists()  # read, not rebuilt


def test_missing_references_is_a_clear_error(tmp_path, write_jsonl):
    from rlkit.pipeline import run_one

    path = write_jsonl([{"question": f"{i}+1", "answer": str(i + 1)} for i in range(12)])
    recipe = _stephint_recipe(tmp_path)
    (run,) = resolve_runs(recipe)
    run.data.train = dataclasses.replace(run.data.train, name=f"jsonl:{path}", synthetic={}, limit=None)
    with pytest.raises(RecipeError, match="no reference solutions.*rlkit hints build"):
        run_one(run)
