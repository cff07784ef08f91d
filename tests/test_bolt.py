"""BOLT's stages (rlkit.methods.bolt.stage, .reward) and the outcome rewards they take (rlkit.outcome_rewards):
the bootstrap stage end to end on a tiny model (3 in-context examples per prompt, y-only scoring, the selection),
its resume, the ICL-file checks, the reward-model and callable rewards, the format-rule reward, and `{from: STAGE}`
settings (DPO's reference model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rlkit_rewards

from conftest import TINY_SHAPE
from rlkit.methods.bolt.core import ThoughtFormat, bootstrap_select
from rlkit.recipe import RecipeError, recipe_from_dict

FMT = ThoughtFormat()
SEEN = "test_bolt_seen"
SECRET = "SECRETTHOUGHT"
_seen: list[str] = []


def _seen_reward(**_):
    def reward(prompts, completions, **__):
        _seen.extend(completions)
        return [float(len(c) % 5) for c in completions]  # varied scores, so the cut and the best matter
    return reward


if SEEN not in rlkit_rewards.available():
    rlkit_rewards.register(SEEN)(_seen_reward)


def _examples(path: Path, n: int = 10) -> Path:
    rows = [{"query": f"EXQ{k} 1+{k}", "thoughts": f"think {k}", "solution": f"#### {k + 1}"} for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(out: Path, examples: Path, prompts: int = 4) -> dict:
    return {"seed": 0, "output_dir": str(out), "plot": False, "reward_engine": {"enabled": False},
            "model": {"name": "tiny", "tiny": {**TINY_SHAPE, "max_position_embeddings": 512}},
            "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": prompts}},
            "rewards": [{"name": SEEN}],
            "stages": [{"name": "bootstrap", "method": "bolt_bootstrap",
                        "args": {"examples": str(examples), "num_samples": 8, "max_new_tokens": 6,
                                 "chunk_size": 2, "batch_size": 8, "instruction": "Use {start} and {end}."}}]}


@pytest.fixture
def fake_formats(monkeypatch):
    """The tiny model generates for real; even samples are then wrapped in the thought format (thoughts carry a
    secret word), odd ones left as they are (format violators). Records the prompts generated for."""
    import rlkit.rollout.generation as gen

    real, prompts_seen = gen.generate, []

    def generate(model, tokenizer, prompts, settings, num_samples=1, **kw):
        prompts_seen.extend(prompts)
        outs = real(model, tokenizer, prompts, settings, num_samples, **kw)
        for cs in outs:
            for k, c in enumerate(cs):
                if k % 2 == 0:
                    c.text = FMT.render(f"{SECRET} {c.text.strip() or 'x'}", f"the answer {k} {c.text.strip()}")
        return outs

    monkeypatch.setattr(gen, "generate", generate)
    _seen.clear()
    return prompts_seen


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bootstrap_stage_end_to_end(tmp_path, fake_formats):
    from rlkit.pipeline import run_recipe

    examples = _examples(tmp_path / "ex.jsonl")
    out = tmp_path / "run"
    summary = run_recipe(recipe_from_dict(_recipe(out, examples)))[0]
    rows = _rows(out / "bootstrap" / "samples.jsonl")
    assert len(rows) == 4 * 8 and len(fake_formats) == 4
    shots = [json.loads(line) for line in examples.read_text().splitlines()]
    for r in rows:
        inside = [k for k, ex in enumerate(shots) if ex["query"] in r["prompt"]]
        assert len(inside) == 3 and sorted(r["icl_examples"]) == inside  # exactly the 3 recorded examples
        assert r["prompt"].count(FMT.start) == 3 + 1  # one per example, one in the instruction
        assert r["prompt"].endswith(f"Question: {r['question']}\nAnswer: ")
        assert r["format_ok"] == (r["sample_index"] % 2 == 0)
        if r["format_ok"]:
            assert SECRET in r["thoughts"] and r["reward"] == float(len(r["solution"]) % 5)
        else:
            assert r["reward"] is None and r["status"] == "format"
    assert len({tuple(r["icl_examples"]) for r in rows}) > 1  # drawn per query
    # y-only scoring: the reward saw the 16 solutions, never a thought
    assert len(_seen) == 16 and not any(SECRET in s or FMT.start in s for s in _seen)
    kept = bootstrap_select([r["prompt_index"] for r in rows], [r["reward"] or 0.0 for r in rows],
                            [r["format_ok"] for r in rows], 30.0)
    selected = _rows(out / "bootstrap" / "selected.jsonl")
    assert [(s["prompt_index"], s["sample_index"]) for s in selected] == \
        [(rows[i]["prompt_index"], rows[i]["sample_index"]) for i in kept]
    assert all(s["solution"] == FMT.render(s["thoughts"], s["external_solution"]) for s in selected)
    assert summary["selected"] == len(kept) and summary["format_rate"] == 0.5
    # Stage 2 reads them as SFT data: the plain query -> thoughts + solution
    from rlkit.data import load_rows
    from rlkit.recipe import DatasetSpec

    sft_rows = load_rows(DatasetSpec(name=f"jsonl:{out / 'bootstrap' / 'selected.jsonl'}", solution_column="solution"))
    assert all(FMT.parse(r["solution"]) for r in sft_rows)


def test_bootstrap_resumes_only_the_missing_prompts(tmp_path, fake_formats):
    from rlkit.pipeline import run_recipe

    examples = _examples(tmp_path / "ex.jsonl")
    out = tmp_path / "run"
    recipe = _recipe(out, examples, prompts=4)
    run_recipe(recipe_from_dict(recipe))
    path = out / "bootstrap" / "samples.jsonl"
    full = _rows(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:12]) + lines[12][:20])  # prompt 0 whole, prompt 1 cut mid-way, half a line
    (out / "bootstrap" / "manifest.json").unlink()  # as if killed before finishing
    fake_formats.clear()
    run_recipe(recipe_from_dict(recipe))
    assert len(fake_formats) == 3  # prompts 1, 2, 3 generated again, prompt 0 kept
    again = _rows(path)
    assert len(again) == 32 and again[:8] == full[:8]
    assert sorted((r["prompt_index"], r["sample_index"]) for r in again) == [(p, k) for p in range(4) for k in range(8)]


def test_icl_file_checks(tmp_path):
    from rlkit.methods.bolt.stage import DEFAULT_EXAMPLES, load_examples

    shipped = load_examples(None, FMT, 3)
    assert len(shipped) == 10 and DEFAULT_EXAMPLES.is_file()
    assert all(ex["solution"].split("####")[-1].strip().isdigit() for ex in shipped)
    out = tmp_path / "run"
    cases = {
        "missing.jsonl": (None, "not found"),
        "few.jsonl": ([{"query": "q", "thoughts": "t", "solution": "s"}] * 2, "has 2 examples, fewer than n_shots=3"),
        "field.jsonl": ([{"query": "q", "thoughts": "t"}] * 3, "line 1 needs a non-empty text 'solution'"),
        "marker.jsonl": ([{"query": "q", "thoughts": f"t {FMT.end} u", "solution": "s"}] * 3,
                         "line 1 fails the format filter"),
        "json.jsonl": ("{nope", "line 1 is not valid JSON"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        if isinstance(content, list):
            p.write_text("".join(json.dumps(r) + "\n" for r in content))
        elif content:
            p.write_text(content)
        with pytest.raises(RecipeError, match=f"stages.bootstrap.args.examples: .*{message}"):
            recipe_from_dict(_recipe(out, p))


def test_reward_model_reward_scores_with_a_saved_classifier(tmp_path, char_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlkit.outcome_rewards import RewardModelReward

    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                      pad_token_id=char_tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    char_tokenizer.save_pretrained(tmp_path / "rm")
    reward = RewardModelReward(path=str(tmp_path / "rm"), batch_size=2)
    got = reward(prompts=["P: a", "P: b", "P: c"], completions=["x = 1", "yy", "z"], question=["a", "b", "c"])
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for q, c, s in zip("abc", ["x = 1", "yy", "z"], got):  # no chat template: "question\nresponse", the question
        with torch.no_grad():                               # column (not the rendered prompt)
            want = model(**char_tokenizer(f"{q}\n{c}", return_tensors="pt")).logits[0, 0].item()
        assert s == pytest.approx(want, abs=1e-5)
    assert len(set(got)) == 3

    class Out:  # a custom head that returns `score` (ArmoRM) is read there
        def __init__(self, n):
            self.score, self.logits = torch.arange(n, dtype=torch.float32)[:, None] + 7, torch.zeros(n, 1)

    reward._loaded = (reward._loaded[0], lambda **enc: Out(len(enc["input_ids"])), "cpu")
    assert reward(prompts=["a", "b"], completions=["x", "y"]) == [7.0, 8.0]
    with pytest.raises(RecipeError, match="reward_model: output must be auto, score or logits"):
        recipe_from_dict({"method": "sample", "rewards": [{"name": "reward_model", "options": {"path": "x",
                                                                                           "output": "nope"}}]})


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def scaled_length(scale: float = 1.0):
    return lambda prompts, completions, **_: [scale * len(c) for c in completions]


def test_callable_reward():
    from rlkit.rewarding import build_reward_funcs
    from rlkit.recipe import RewardSpec

    plain, factory = build_reward_funcs([RewardSpec("callable", options={"function": "test_bolt:length_reward"}),
                                         RewardSpec("callable", options={"function": "test_bolt:scaled_length",
                                                                         "options": {"scale": 2.0}})])
    assert plain.in_process and plain(prompts=["p", "q"], completions=["ab", "abc"]) == [2.0, 3.0]
    assert factory(prompts=["p"], completions=["ab"]) == [4.0]
    for options, message in (({"function": "test_bolt.length_reward"}, "must look like 'package.module:name'"),
                             ({"function": "test_bolt:nope"}, "'test_bolt' has no 'nope'"),
                             ({"function": "no_such_mod:f"}, "cannot import 'no_such_mod'")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"method": "sample", "rewards": [{"name": "callable", "options": options}]})


def test_thought_solution_reward_scores_the_solution_and_ranks_violators_lowest():
    from rlkit.methods.bolt.reward import ThoughtSolutionReward

    _seen.clear()
    reward = ThoughtSolutionReward(rewards=[{"name": SEEN, "weight": 2.0}])
    texts = [FMT.render(f"{SECRET} 7", "#### 1234"), "#### 4", FMT.render("t", "ab")]
    assert reward(prompts=["p"] * 3, completions=texts, answer=["1", "2", "3"]) == [2.0 * (9 % 5), -1.0, 4.0]
    assert _seen == ["#### 1234", "ab"]
    math = ThoughtSolutionReward(rewards=[{"name": "math_accuracy"}], violation_score=-2)
    assert math(prompts=["p"] * 3, completions=[FMT.render("2+2", "#### 4"), FMT.render("#### 4", "#### 5"), "#### 4"],
                answer=["4", "4", "4"]) == [1.0, 0.0, -2.0]  # the answer in the thoughts does not count
    with pytest.raises(RecipeError, match="thought_solution.rewards\\[0\\].name: unknown reward 'math_acc'"):
        recipe_from_dict({"method": "grpo", "rewards": [{"name": "thought_solution",
                                                         "options": {"rewards": [{"name": "math_acc"}]}}]})


def test_stage_model_settings_resolve_to_an_earlier_stage_model(tmp_path):
    from rlkit.pipeline import _wire
    from rlkit.recipe import resolve_runs

    raw = {"output_dir": str(tmp_path), "model": {"name": "tiny", "tiny": TINY_SHAPE},
           "stages": [{"name": "sft", "method": "sft", "data": {"train": {"name": "synthetic"}}},
                      {"name": "online", "repeat": 2, "stages": [
                          {"name": "dpo", "method": "dpo", "data": {"train": {"name": "jsonl:x.jsonl"}},
                           "trainer": {"pairs": "best_worst", "ref_model": {"from": "sft"}}}]}]}
    runs = resolve_runs(recipe_from_dict(raw))
    done = [(runs[0], {"model": "/m/sft/final"}), (runs[1], {"model": "/m/dpo-1/final"})]
    wired = _wire(runs[2], done, None)
    assert wired.trainer["ref_model"] == "/m/sft/final" and wired.model.name == "/m/dpo-1/final"
    bad = json.loads(json.dumps(raw))
    bad["stages"][1]["stages"][0]["trainer"]["ref_model"] = {"from": "sfx"}
    with pytest.raises(RecipeError, match="stages.dpo.trainer.ref_model.from: 'sfx' is not an earlier stage"):
        recipe_from_dict(bad)
    with pytest.raises(RecipeError, match="`from:` refers to an earlier stage"):
        recipe_from_dict({"method": "dpo", "data": {"train": {"name": "jsonl:x.jsonl"}},
                          "trainer": {"ref_model": {"from": "sft"}}})


def test_shipped_recipes_validate():
    from rlkit.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes" / "bolt"
    for name in ("tiny.yaml", "smollm2_gsm8k_cpu.yaml", "llama3.1-8b-instruct.yaml"):
        load_recipe(root / name)


def test_online_iteration_trains_dpo_on_best_worst_pairs_against_a_named_reference(tmp_path, fake_formats):
    """bolt_sample -> dpo (pairs: best_worst, ref_model: {from: ref}): the pairs are the best and worst of each
    prompt's samples, and the reference is the named stage's model (with the starting model as reference the
    first step's loss would be exactly log 2)."""
    from rlkit.methods.dpo import build_best_worst_pairs
    from rlkit.pipeline import run_recipe

    out = tmp_path / "run"
    trainer = {"dataloader_num_workers": 0, "save_strategy": "no", "max_length": 128, "logging_steps": 1,
               "report_to": "none", "per_device_train_batch_size": 4}
    raw = _recipe(out, _examples(tmp_path / "ex.jsonl"))
    raw["trainer"] = trainer
    raw["stages"] = [
        {"name": "ref", "method": "sft", "data": {"train": {"name": "synthetic", "template": "plain", "limit": 8}},
         "trainer": {"max_steps": 2, "learning_rate": 1e-2}},
        {"name": "sample", "method": "bolt_sample", "model": {"name": "tiny"},
         "args": {"num_samples": 4, "max_new_tokens": 6, "batch_size": 8}},
        {"name": "dpo", "method": "dpo", "data": {"train": {"from": "sample", "dataset": "samples"}},
         "trainer": {"pairs": "best_worst", "ref_model": {"from": "ref"}, "max_steps": 1, "beta": 0.1,
                     "learning_rate": 1e-3, "gradient_checkpointing": False}}]
    run_recipe(recipe_from_dict(raw))
    samples = _rows(out / "sample" / "samples.jsonl")
    assert "icl_examples" not in samples[0] and samples[0]["prompt"] == f"Question: {samples[0]['question']}\nAnswer: "
    expected, _ = build_best_worst_pairs(samples)
    written = _rows(out / "dpo" / "pairs.jsonl")
    assert written == expected and len(written) == 4 and all(p["rejected_valid"] is False for p in written)
    first = next(h for h in json.loads((out / "dpo" / "log_history.json").read_text()) if "loss" in h)
    assert abs(first["loss"] - 0.6931) > 1e-3  # the reference is the sft stage's model, not the policy


def test_an_iteration_without_pairs_keeps_its_model_when_asked(tmp_path):
    """A random tiny model never writes the format: every sample ranks the same, no pair; `no_pairs: keep_model`
    saves the starting model unchanged (the default, error, stops with one line)."""
    import torch

    from rlkit.models import load_model
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import ModelSpec, TinyModelSpec

    out = tmp_path / "run"
    raw = _recipe(out, _examples(tmp_path / "ex.jsonl"))
    raw["trainer"] = {"dataloader_num_workers": 0, "save_strategy": "no", "report_to": "none"}
    raw["stages"] = [{"name": "sample", "method": "bolt_sample", "args": {"num_samples": 2, "max_new_tokens": 4}},
                     {"name": "dpo", "method": "dpo", "data": {"train": {"from": "sample", "dataset": "samples"}},
                      "trainer": {"pairs": "best_worst", "max_steps": 1}}]
    with pytest.raises(Exception, match="all rank the same"):
        run_recipe(recipe_from_dict(raw))
    raw["stages"][1]["trainer"]["no_pairs"] = "keep_model"
    summary = run_recipe(recipe_from_dict(raw))[-1]
    assert summary["dpo_pairs"] == 0
    kept, _ = load_model(ModelSpec(name=str(out / "dpo" / "final")))
    shape = TinyModelSpec(**{**TINY_SHAPE, "max_position_embeddings": 512})
    start, _ = load_model(ModelSpec(name="tiny", tiny=shape), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), start.state_dict().values()))
