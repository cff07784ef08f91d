"""The PRM (ER-PRM's soft-label trainer and the step scorer it saves): layout, loss at exactly the step tags,
training, saving/loading, resume, the ORM baseline and the recipe-level method."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from rlkit.models import load_model
from rlkit.process_reward import (ProcessRewardModel, aggregate_scores, encode_tagged, is_prm_dir, load_step_scorer,
                                  two_logits)
from rlkit.recipe import ModelSpec, TinyModelSpec

FIXTURE = Path(__file__).parent / "fixtures" / "prm_labels_tiny.jsonl"
ROWS = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
TAG = " @"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec(name="tiny", tiny=TinyModelSpec(**TINY)), seed=0)


def _args(out, **kw):
    from rlkit.methods.prm.trainer import PRMConfig

    base = dict(output_dir=str(out), step_tag=TAG, per_device_train_batch_size=4, learning_rate=3e-3,
                lr_scheduler_type="constant", max_steps=6, logging_steps=1, save_strategy="no", report_to="none",
                dataloader_pin_memory=False, use_cpu=True, seed=0)
    base.update(kw)
    return PRMConfig(**base)


def test_tagged_layout_puts_the_tag_before_the_separator(tiny):
    _, tok = tiny
    ids, pos = encode_tagged(tok, "Q: 1+2\n", ["1+2=3\n", "#### 3"], TAG)
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith("Q: 1+2\n1+2=3 @\n#### 3 @")
    assert len(pos) == 2 and pos[-1] == len(ids) - 1
    assert tok.decode(ids[pos[0] - 1:pos[0] + 1]) == " @" and tok.decode([ids[pos[0] + 1]]) == "\n"


def test_two_logits_equal_the_full_forward(tiny):
    lm, tok = tiny
    ids = torch.tensor([tok("1+2=3 @\n4 @")["input_ids"]])
    mask = torch.ones_like(ids)
    rows, cols = torch.tensor([0, 0]), torch.tensor([3, ids.shape[1] - 1])
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    fast = two_logits(lm, ids, mask, rows, cols, (plus, minus))
    full = lm(input_ids=ids, attention_mask=mask).logits[0, cols][:, [plus, minus]]
    torch.testing.assert_close(fast, full.float(), rtol=1e-5, atol=1e-5)


def test_loss_is_soft_label_cross_entropy_at_exactly_the_step_tags(tiny, tmp_path):
    from rlkit.methods.prm.trainer import PRMCollator, PRMTrainer, tokenize_prm_rows

    lm, tok = tiny
    args = _args(tmp_path)
    items = tokenize_prm_rows(ROWS[:3], tok, args)
    batch = PRMCollator(tok.pad_token_id)(items)
    trainer = PRMTrainer(model=copy.deepcopy(lm), args=args, train_dataset=items, processing_class=tok)
    loss = trainer.compute_loss(trainer.model, batch)
    # by hand: full logits, the tag positions found by searching the ids for the tag token, CE with [v, 1-v]
    tag_id = tok(" @", add_special_tokens=False)["input_ids"][-1]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    terms = []
    with torch.no_grad():
        for row, item in zip(ROWS[:3], items):
            ids = torch.tensor([item["input_ids"]])
            logits = lm(input_ids=ids).logits[0]
            where = [j for j, t in enumerate(item["input_ids"]) if t == tag_id]
            assert len(where) == len(row["steps"])
            for j, v in zip(where, row["labels"]):
                logp = torch.log_softmax(logits[j, [plus, minus]], dim=-1)
                terms.append(-(v * logp[0] + (1 - v) * logp[1]))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_training_learns_the_labels_and_saves_a_loadable_prm(tiny, tmp_path):
    from rlkit.methods.prm.trainer import PRMTrainer

    lm, tok = tiny
    trainer = PRMTrainer(model=copy.deepcopy(lm), args=_args(tmp_path, max_steps=40), train_dataset=ROWS,
                         processing_class=tok)
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < 0.5 * losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    assert is_prm_dir(tmp_path / "saved")
    prm = load_step_scorer(tmp_path / "saved")
    assert isinstance(prm, ProcessRewardModel) and prm.step_tag == TAG and prm.aggregate == "min"
    wrong = [r for r in ROWS if not r["correct"]]
    right = [r for r in ROWS if r["correct"]]
    s_wrong = prm.solution_scores([r["prompt"] for r in wrong], [r["steps"] for r in wrong])
    s_right = prm.solution_scores([r["prompt"] for r in right], [r["steps"] for r in right])
    assert max(s_wrong) < min(s_right)
    # the StepScorer protocol, the batch call and whole-text scoring agree
    r = ROWS[1]
    one = prm.score(r["prompt"], r["steps"])
    assert one == pytest.approx(prm.score_batch([r["prompt"]], [r["steps"]])[0], abs=1e-6)
    assert prm.score_texts([r["prompt"]], [r["completion"]])[0] == pytest.approx(min(one), abs=1e-6)
    assert all(0.0 <= s <= 1.0 for s in one)


def test_resume_continues_exactly(tiny, tmp_path):
    from rlkit.methods.prm.trainer import PRMTrainer

    lm, tok = tiny

    def run(out, resume=None):
        args = _args(out, max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine")
        t = PRMTrainer(model=copy.deepcopy(lm), args=args, train_dataset=ROWS, processing_class=tok)
        t.train(resume_from_checkpoint=resume)
        return t

    whole = run(tmp_path / "whole")
    assert is_prm_dir(tmp_path / "whole" / "checkpoint-2")  # a checkpoint is a loadable PRM
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_orm_has_one_tag_per_solution_labelled_by_correctness(tiny, tmp_path):
    from rlkit.methods.prm.trainer import tokenize_prm_rows

    _, tok = tiny
    items = tokenize_prm_rows(ROWS[:4], tok, _args(tmp_path, kind="orm"))
    assert [len(x["tag_index"]) for x in items] == [1] * 4
    assert [x["tag_label"][0] for x in items] == [float(r["correct"]) for r in ROWS[:4]]
    orm = ProcessRewardModel(tiny[0], tok, step_tag=TAG, kind="orm")
    r = ROWS[0]
    assert len(orm.score_batch([r["prompt"]], [r["steps"]])[0]) == 1
    prefix_scores = orm.score(r["prompt"], r["steps"])
    assert len(prefix_scores) == len(r["steps"])
    whole = orm.score_batch([r["prompt"]], [["".join(r["steps"])]])[0][0]
    assert prefix_scores[-1] == pytest.approx(whole, abs=1e-6)


def test_aggregates():
    s = [0.9, 0.5, 0.8]
    assert aggregate_scores(s, "min") == 0.5 and aggregate_scores(s, "last") == 0.8
    assert aggregate_scores(s, "mean") == pytest.approx(2.2 / 3) and aggregate_scores(s, "product") == pytest.approx(0.36)
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_scores(s, "max")


def test_bad_tag_and_label_tokens_are_one_line_errors(tiny, tmp_path):
    from rlkit.methods.prm.trainer import tokenize_prm_rows
    from rlkit.models import ModelError

    _, tok = tiny
    with pytest.raises(ModelError, match="step_tag ' ки'.*cannot write it"):
        tokenize_prm_rows(ROWS, tok, _args(tmp_path, step_tag=" ки"))
    with pytest.raises(ModelError, match="exactly one token"):
        tokenize_prm_rows(ROWS, tok, _args(tmp_path, label_tokens=["++", "-"]))
    with pytest.raises(Exception, match="not a saved|neither"):
        load_step_scorer(tmp_path)


def test_prm_recipe_stage_writes_a_prm_and_skips_policy_eval(tmp_path):
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    raw = {"method": "prm", "seed": 0, "plot": False, "output_dir": str(tmp_path / "run"),
           "model": {"name": "tiny", "tiny": TINY},
           "data": {"train": {"name": f"jsonl:{FIXTURE}"},
                    "eval": {"name": "synthetic", "split": "test", "template": "plain", "limit": 4}},
           "eval": {"enabled": True},
           "trainer": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                       "step_tag": TAG, "save_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0}}
    summary = run_recipe(recipe_from_dict(raw))[0]
    final = tmp_path / "run" / "final"
    assert is_prm_dir(final) and "before" not in summary and "after" not in summary
    meta = json.loads((final / "prm.json").read_text())
    assert meta["info"]["rows"] == len(ROWS) and meta["kind"] == "prm"


def test_prm_refuses_a_benchmark_as_training_data():
    from rlkit.config import RecipeError
    from rlkit.recipe import recipe_from_dict

    raw = {"method": "prm", "model": {"name": "tiny", "tiny": TINY},
           "data": {"train": {"name": "synthetic"}}, "trainer": {"max_steps": 1}}
    with pytest.raises(RecipeError, match="labelled rows"):
        recipe_from_dict(raw)


@pytest.fixture(scope="module")
def saved_prm(tiny, tmp_path_factory):
    """A tiny PRM trained for a few steps on the fixture rows, saved."""
    from rlkit.methods.prm.trainer import PRMTrainer

    lm, tok = tiny
    out = tmp_path_factory.mktemp("prm")
    trainer = PRMTrainer(model=copy.deepcopy(lm), args=_args(out, max_steps=30), train_dataset=ROWS,
                         processing_class=tok)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return out / "final"


def test_prm_reward_option_errors_are_one_line():
    from rlkit.config import RecipeError
    from rlkit.rewarding import check_rewards
    from rlkit.recipe import RewardSpec

    with pytest.raises(RecipeError, match=r"rewards\[0\].options: reward 'prm' needs option 'path'"):
        check_rewards([RewardSpec(name="prm")])
    with pytest.raises(RecipeError, match="has no option 'bogus'"):
        check_rewards([RewardSpec(name="prm", options={"path": "x", "bogus": 1})])
    with pytest.raises(RecipeError, match="aggregate must be"):
        check_rewards([RewardSpec(name="prm", options={"path": "x", "aggregate": "max"})])


def test_prm_reward_scores_in_process_beside_the_engine(saved_prm):
    from rlkit.process_reward import PRMReward
    from rlkit.rewarding import build_reward_funcs, make_reward_engine, score_mixed
    from rlkit.recipe import RewardEngineSpec, RewardSpec

    specs = [RewardSpec(name="math_accuracy"), RewardSpec(name="prm", options={"path": str(saved_prm)})]
    funcs = build_reward_funcs(specs)
    assert isinstance(funcs[1], PRMReward) and funcs[1].__name__ == "prm"
    engine = make_reward_engine(RewardEngineSpec(num_workers=1), specs)
    try:
        rows = ROWS[:4]
        per_func, status = score_mixed(engine, funcs, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                                       None, {"answer": [r["answer"] for r in rows]})
    finally:
        engine.close()
    prm = load_step_scorer(saved_prm)
    expected = prm.solution_scores([r["prompt"] for r in rows], [prm.split(r["completion"]) for r in rows])
    assert [p[1] for p in per_func] == pytest.approx(expected, abs=1e-6)
    assert [p[0] for p in per_func] == [float(r["correct"]) for r in rows]
    assert status == ["ok" if r["correct"] else "wrong" for r in rows]


def test_grpo_trains_with_a_prm_reward(saved_prm, tmp_path):
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    raw = {"method": "grpo", "seed": 0, "plot": False, "output_dir": str(tmp_path / "grpo"),
           "model": {"name": str(saved_prm)},
           "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 8,
                              "synthetic": {"num_train": 16, "num_test": 4}}},
           "rewards": [{"name": "math_accuracy"}, {"name": "prm", "options": {"path": str(saved_prm)}}],
           "reward_engine": {"num_workers": 1},
           "trainer": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4,
                       "max_completion_length": 8, "beta": 0.0, "logging_steps": 1, "save_strategy": "no",
                       "dataloader_num_workers": 0}}
    run_recipe(recipe_from_dict(raw))
    history = json.loads((tmp_path / "grpo" / "log_history.json").read_text())
    logged = {k for h in history for k in h}
    assert "rewards/prm/mean" in logged and "rewards/math_accuracy_reward/mean" in logged


def test_select_keeps_the_best_scored_completion_per_prompt(saved_prm, tmp_path):
    from rlkit.methods.select import group_best
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    assert group_best([{"g": 0}, {"g": 0}, {"g": 1}, {"g": 1}], [0.2, 0.7, 0.5, 0.5], 1, "g") == [(1, 0), (2, 0)]
    assert group_best([{"g": 0}, {"g": 0}], [0.2, 0.7], 2, "g", min_score=0.5) == [(1, 0)]
    rows = [dict(r, prompt_index=i // 3) for i, r in enumerate(ROWS)]
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"method": "select", "seed": 0, "plot": False, "output_dir": str(tmp_path / "sel"),
           "model": {"name": "tiny", "tiny": TINY}, "data": {"train": {"name": f"jsonl:{data}"}},
           "args": {"scorer": str(saved_prm)}}
    summary = run_recipe(recipe_from_dict(raw))[0]
    kept = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert len(kept) == len(ROWS) // 3 and summary["kept"] == len(kept)
    prm = load_step_scorer(saved_prm)
    for k in kept:
        group = [r for r in rows if r["prompt_index"] == k["prompt_index"]]
        scores = prm.solution_scores([r["prompt"] for r in group], [r["steps"] for r in group])
        assert k["score"] == pytest.approx(max(scores), abs=1e-6)
        assert k["step_scores"] == pytest.approx(prm.score(k["prompt"], k["steps"]), abs=1e-6)
    # the stage's own model as the scorer (model: {from: prm} in a recipe); a policy there is refused
    raw2 = dict(raw, output_dir=str(tmp_path / "sel2"), model={"name": str(saved_prm)}, args={})
    run_recipe(recipe_from_dict(raw2))
    assert (tmp_path / "sel2" / "selected.jsonl").read_text() == (tmp_path / "sel" / "selected.jsonl").read_text()
    from rlkit.models import ModelError

    with pytest.raises(ModelError, match="select: .*neither a process reward model"):
        run_recipe(recipe_from_dict(dict(raw, output_dir=str(tmp_path / "sel3"), args={})))


def test_eta_recomputes_er_labels_from_the_rollout_counts(tiny, tmp_path):
    from rlkit.methods.prm.labels import er_label_from_p
    from rlkit.methods.prm.trainer import tokenize_prm_rows

    _, tok = tiny
    row = ROWS[1]  # a correct row: step_correct [3, 4, 0] of [4, 4, 0]
    for eta in (0.0, 1.0, 20.0):
        got = tokenize_prm_rows([row], tok, _args(tmp_path, eta=eta))[0]["tag_label"]
        assert got == pytest.approx([er_label_from_p(0.75, eta), er_label_from_p(1.0, eta), 1.0])
    assert tokenize_prm_rows([row], tok, _args(tmp_path, eta=0.0))[0]["tag_label"][0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="eta recomputes"):
        _args(tmp_path, eta=1.0, kind="orm")
