"""``method: dpo`` (TRL's DPOTrainer on (correct, incorrect) pairs of a ``sample`` stage) and the rejection-sampling
baseline (``method: sft`` on ``where: {status: ok}`` samples): pair building, recipe checks, and one tiny
pipeline sample -> rs -> dpo through ``rlkit.pipeline.run_recipe``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rlkit_rewards

from rlkit.data import DataError, balance_rows
from rlkit.methods.dpo import build_best_worst_pairs, build_pairs, pair_indices
from rlkit.recipe import BalanceSpec, RecipeError, recipe_from_dict

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
REWARD = "test_dpo_char_parity"


def _row(p: int, k: int, reward: float | None) -> dict:
    return {"prompt_index": p, "sample_index": k, "prompt": f"Q{p}: ", "completion": f"p{p}s{k}", "reward": reward,
            "status": "ok" if reward else "wrong"}


def _pairs_of(pairs: list[dict], p: int) -> list[tuple[int, int]]:
    return [(x["chosen_sample"], x["rejected_sample"]) for x in pairs if x["prompt_index"] == p]


# --------------------------------------------------------------------------------------------------
# Pair building


def test_round_robin_walks_every_pair_once_and_spreads_samples():
    assert pair_indices(3, 3, 6) == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0)]
    assert pair_indices(2, 2, 6) == [(0, 0), (1, 1), (0, 1), (1, 0)]  # only 4 exist
    assert pair_indices(1, 8, 6) == [(0, k) for k in range(6)]
    assert pair_indices(0, 5, 6) == [] and pair_indices(5, 0, 6) == []
    for n_pos in range(1, 7):
        for n_neg in range(1, 7):
            every = pair_indices(n_pos, n_neg, 100)
            assert len(set(every)) == len(every) == n_pos * n_neg
            first = pair_indices(n_pos, n_neg, 6)
            for side, n in ((0, n_pos), (1, n_neg)):  # uses differ by at most one: spread over distinct samples
                uses = [sum(pair[side] == i for pair in first) for i in range(n)]
                assert max(uses) - min(uses) <= 1


def test_pairs_from_hand_made_rows():
    rows = ([_row(0, k, r) for k, r in enumerate([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])]  # 5 pos / 5 neg: capped at 6
            + [_row(1, k, 1.0) for k in range(4)]                                 # all positive: no pair
            + [_row(2, k, 0.0) for k in range(3)]                                 # all negative: no pair
            + [_row(3, k, r) for k, r in enumerate([0, 0, 1])])                   # 1 pos / 2 neg: 2 pairs
    rows = rows[::-1]  # file order does not matter: sample_index does
    pairs, stats = build_pairs(rows, max_pairs_per_prompt=6)
    # positives of prompt 0 by sample_index: 0 2 4 6 8; negatives: 1 3 5 7 9; round-robin diagonal first
    assert _pairs_of(pairs, 0) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (0, 3)]
    assert _pairs_of(pairs, 3) == [(2, 0), (2, 1)]
    assert _pairs_of(pairs, 1) == [] and _pairs_of(pairs, 2) == []
    assert stats == {"rows": 20, "prompts": 4, "prompts_with_pairs": 2, "prompts_all_positive": 1,
                     "prompts_all_negative": 1, "pairs": 8}
    assert [p["prompt_index"] for p in pairs] == [3, 3, 0, 0, 0, 0, 0, 0]  # prompts in order of first appearance
    first = pairs[2]
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("Q0: ", "p0s0", "p0s1")
    assert build_pairs(rows, max_pairs_per_prompt=1)[1]["pairs"] == 2
    # the threshold decides the sides: reward 0.7 is positive at 0.5, negative at 0.8
    mixed = [_row(0, 0, 0.7), _row(0, 1, 0.9), _row(0, 2, 0.1)]
    assert len(build_pairs(mixed)[0]) == 2 and len(build_pairs(mixed, threshold=0.8)[0]) == 2
    assert [p["chosen"] for p in build_pairs(mixed, threshold=0.8)[0]] == ["p0s1", "p0s1"]
    # a BOS the chat template wrote is cut when the tokenizer adds its own
    bos = [dict(r, prompt="<s>" + r["prompt"]) for r in mixed]
    assert build_pairs(bos, bos_token="<s>")[0][0]["prompt"] == "Q0: "


def test_no_pair_and_bad_rows_are_one_clear_error():
    with pytest.raises(DataError, match=r"no prompt .* has both a positive .*2 prompts: 1 all positive, 1 all neg"):
        build_pairs([_row(0, 0, 1.0), _row(0, 1, 1.0), _row(1, 0, 0.0)])
    with pytest.raises(DataError, match=r"dpo: dataset row 0 has no 'completion' field"):
        build_pairs([{"prompt_index": 0, "prompt": "q", "reward": 1.0}])
    with pytest.raises(DataError, match="null reward"):
        build_pairs([_row(0, 0, None)])


def test_best_worst_pairs_from_hand_made_rows():
    """pairs: best_worst (BOLT): one pair per prompt, the best and the worst sample by reward; a format violator
    (format_ok false) ranks below every valid sample whatever its reward; all-equal prompts give no pair."""
    def row(p, k, reward, ok=True):
        return {**_row(p, k, reward), "format_ok": ok}

    rows = ([row(0, k, r) for k, r in enumerate([0.2, 0.9, 0.5, 0.1])]                  # best 1, worst 3
            + [row(1, k, r, ok) for k, (r, ok) in enumerate([(0.2, True), (0.9, False), (0.5, True)])]  # 1 violates
            + [row(2, k, 1.0) for k in range(3)]                                           # all equal: no pair
            + [row(3, 0, None, False), row(3, 1, 0.0), row(3, 2, 1.0), row(3, 3, None, False)]  # last violator
            + [{**_row(4, 0, 0.3)}, {**_row(4, 1, 0.7)}])                                  # no format column: valid
    pairs, stats = build_best_worst_pairs(rows[::-1])
    assert {p: pair for p in range(5) if (pair := _pairs_of(pairs, p))} == \
        {0: [(1, 3)], 1: [(2, 1)], 3: [(2, 3)], 4: [(1, 0)]}
    assert stats["prompts_all_equal"] == 1 and stats["rejected_invalid"] == 2 and stats["pairs"] == 4
    assert [p["rejected_valid"] for p in sorted(pairs, key=lambda p: p["prompt_index"])] == [True, False, False, True]
    with pytest.raises(DataError, match="all rank the same"):
        build_best_worst_pairs([row(0, 0, 1.0), row(0, 1, 1.0)])


def test_recipe_checks():
    base = {"method": "dpo", "model": {"name": "tiny", "tiny": TINY}, "data": {"train": {"name": "jsonl:x.jsonl"}},
            "trainer": {"max_steps": 1}}
    recipe_from_dict(base)
    with pytest.raises(RecipeError, match="dpo trains on scored samples; set data.train to {from: STAGE"):
        recipe_from_dict({**base, "data": {"train": {"name": "synthetic"}}})
    with pytest.raises(RecipeError, match="max_pairs_per_prompt must be at least 1"):
        recipe_from_dict({**base, "trainer": {"max_pairs_per_prompt": 0}})
    with pytest.raises(RecipeError, match="unknown key 'max_pair_per_prompt'; did you mean 'max_pairs_per_prompt'"):
        recipe_from_dict({**base, "trainer": {"max_pair_per_prompt": 3}})
    with pytest.raises(RecipeError, match="args: method 'dpo' trains: its settings go under `trainer:`"):
        recipe_from_dict({**base, "args": {"beta": 0.1}})
    with pytest.raises(RecipeError, match="pairs must be correct_incorrect or best_worst"):
        recipe_from_dict({**base, "trainer": {"pairs": "best"}})
    with pytest.raises(RecipeError, match="trainer.ref_model: with LoRA the reference is the base model"):
        recipe_from_dict({**base, "model": {"name": "tiny", "tiny": TINY, "lora": {"r": 4}},
                          "trainer": {"ref_model": "some/model"}})


# --------------------------------------------------------------------------------------------------
# One tiny pipeline: sample -> rejection sampling (sft on ok rows) -> dpo


def _parity(**_):
    def reward(prompts, completions, **__):
        return [float(sum(map(ord, c)) % 2 == 0) for c in completions]  # about half "correct", whatever the model
    return reward


if REWARD not in rlkit_rewards.available():
    rlkit_rewards.register(REWARD)(_parity)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import rlkit.methods.sft as sft
    from rlkit.pipeline import run_recipe

    out = tmp_path_factory.mktemp("dpo") / "run"
    trainer = {"dataloader_num_workers": 0, "save_strategy": "no", "max_length": 64, "logging_steps": 1,
               "lr_scheduler_type": "constant", "report_to": "none"}
    raw = {
        "seed": 0, "output_dir": str(out), "plot": False, "reward_engine": {"enabled": False},
        "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 6,
                           "synthetic": {"num_train": 16, "num_test": 4}}},
        "rewards": [{"name": REWARD}],
        "trainer": trainer,
        "stages": [
            {"name": "sample", "method": "sample",
             "args": {"num_samples": 6, "max_new_tokens": 12, "temperature": 1.0, "chunk_size": 6}},
            {"name": "rs", "method": "sft",
             "data": {"train": {"from": "sample", "dataset": "samples", "template": "plain",
                                "solution_column": "completion", "where": {"status": "ok"}}},
             "trainer": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
            {"name": "dpo", "method": "dpo", "model": {"from": "sample"},
             "data": {"train": {"from": "sample", "dataset": "samples", "limit": 4,
                                "balance": {"max_positive": 2, "max_negative": 2}}},
             "trainer": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "beta": 0.1,
                         "gradient_checkpointing": False}},
        ],
    }
    seen = {}
    original = sft.sft_dataset

    def counting(spec, tokenizer):
        ds = original(spec, tokenizer)
        seen["rs_rows"] = len(ds)
        return ds

    sft.sft_dataset = counting
    try:
        summaries = run_recipe(recipe_from_dict(raw))
    finally:
        sft.sft_dataset = original
    samples = [json.loads(line) for line in (out / "sample" / "samples.jsonl").read_text().splitlines()]
    return out, {s["stage"]: s for s in summaries}, samples, seen


def test_rejection_sampling_trains_on_the_ok_rows_only(pipeline):
    out, summaries, samples, seen = pipeline
    ok = sum(r["status"] == "ok" for r in samples)
    assert len(samples) == 36 and 0 < ok < 36
    assert seen["rs_rows"] == ok  # the where filter reached the SFT stage
    assert (out / "rs" / "final" / "model.safetensors").is_file()


def test_dpo_stage_builds_pairs_trains_and_saves(pipeline):
    out, summaries, samples, _ = pipeline
    summary = summaries["dpo"]
    expected, _ = build_pairs(balance_rows(samples, BalanceSpec(2, 2), log=False))
    written = [json.loads(line) for line in (out / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert written == expected[:4] and summary["dpo_pairs"] == 4 and summary["dpo_pairs_built"] == len(expected) > 4
    assert all(len(_pairs_of(expected, p)) <= 4 for p in range(6))  # balance: at most 2 x 2 per prompt
    final = out / "dpo" / "final"
    assert (final / "model.safetensors").is_file() and (final / ".rlkit_done").is_file()
    history = [h for h in json.loads((out / "dpo" / "log_history.json").read_text()) if "loss" in h]
    assert len(history) == 4
    # the same 4 pairs every step: policy == reference at step 1 (margin 0, loss log 2), then the chosen
    # log-ratio margin rises and the loss falls
    assert abs(history[0]["rewards/margins"]) < 1e-4 and abs(history[0]["loss"] - 0.6931) < 1e-3
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.05
    assert history[-1]["loss"] < history[0]["loss"]
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name=str(final)))
    assert model(**tok("Q: 1+1=", return_tensors="pt")).logits.shape[-1] == len(tok)
