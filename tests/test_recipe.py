"""Recipe loading and validation (rlkit/recipe.py, rlkit/methods) and the CLI's error path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlkit.recipe import (
    DatasetSpec,
    LoraSpec,
    ModelSpec,
    Recipe,
    RecipeError,
    TinyModelSpec,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
    resolve_runs,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


def grpo_raw(**trainer) -> dict:
    tr = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16, "max_steps": 1}
    tr.update(trainer)
    return {
        "method": "grpo",
        "seed": 3,
        "output_dir": "runs/test",
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "num_hidden_layers": 2}},
        "data": {"train": {"name": "synthetic", "template": "plain"}},
        "rewards": [{"name": "math_accuracy"}],
        "trainer": tr,
    }


def staged_raw() -> dict:
    return {
        "seed": 7,
        "output_dir": "runs/staged",
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "num_hidden_layers": 2}},
        "data": {"train": {"name": "synthetic", "template": "plain", "limit": 100}},
        "rewards": [{"name": "math_accuracy"}],
        "eval": {"enabled": False, "max_new_tokens": 32},
        "trainer": {"logging_steps": 5, "dataloader_num_workers": 0},
        "stages": [
            {"name": "sft", "method": "sft",
             "trainer": {"max_steps": 10, "logging_steps": 50}, "eval": {"before": False},
             "data": {"train": {"limit": 20}}},
            {"name": "grpo", "method": "grpo",
             "model": {"tiny": {"num_hidden_layers": 1}},
             "trainer": {"max_steps": 4, "per_device_train_batch_size": 8, "num_generations": 4},
             "rewards": [{"name": "math_accuracy", "weight": 2.0}]},
        ],
    }


def write_recipe(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def error_of(raw: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw)
    msg = str(exc.value)
    assert "\n" not in msg, f"recipe errors must be one line, got: {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------------
# Typed loading


def test_valid_recipe_builds_typed_objects():
    r = recipe_from_dict(grpo_raw())
    assert isinstance(r, Recipe)
    assert r.method == "grpo" and r.seed == 3
    assert isinstance(r.model, ModelSpec) and isinstance(r.model.tiny, TinyModelSpec)
    assert r.model.tiny.hidden_size == 64 and r.model.tiny.num_hidden_layers == 2
    assert r.model.tiny.num_attention_heads == TinyModelSpec().num_attention_heads  # defaults kept
    assert isinstance(r.data.train, DatasetSpec) and r.data.train.template == "plain"
    assert r.rewards[0].name == "math_accuracy" and r.rewards[0].weight == 1.0
    assert r.trainer["num_generations"] == 4


def test_lora_section_builds_lora_spec():
    raw = grpo_raw()
    raw["model"]["lora"] = {"r": 4, "alpha": 8}
    r = recipe_from_dict(raw)
    assert isinstance(r.model.lora, LoraSpec)
    assert (r.model.lora.r, r.model.lora.alpha, r.model.lora.target_modules) == (4, 8, "all-linear")


@pytest.mark.parametrize(
    "mutate, where, bad, suggestion",
    [
        (lambda r: r.update(seeed=1), "recipe", "seeed", "seed"),
        (lambda r: r.update(ouput_dir="x"), "recipe", "ouput_dir", "output_dir"),
        (lambda r: r["model"].update(nme="tiny"), "recipe.model", "nme", "name"),
        (lambda r: r["model"]["tiny"].update(hiden_size=32), "recipe.model.tiny", "hiden_size", "hidden_size"),
        (lambda r: r["data"]["train"].update(splt="test"), "recipe.data.train", "splt", "split"),
        (lambda r: r["data"].update(evl={}), "recipe.data", "evl", "eval"),
        (lambda r: r["rewards"][0].update(wieght=2.0), "recipe.rewards[0]", "wieght", "weight"),
        (lambda r: r["trainer"].update(learnig_rate=1e-5), "trainer", "learnig_rate", "learning_rate"),
        (lambda r: r["trainer"].update(num_generation=4), "trainer", "num_generation", "num_generations"),
    ],
)
def test_unknown_key_names_nearest(mutate, where, bad, suggestion):
    raw = grpo_raw()
    mutate(raw)
    msg = error_of(raw)
    assert msg.startswith(f"{where}:"), msg
    assert repr(bad) in msg
    assert f"did you mean {suggestion!r}" in msg, msg


def test_unknown_key_without_near_match_lists_valid_keys():
    raw = grpo_raw()
    raw["model"]["zzzzzz"] = 1
    msg = error_of(raw)
    assert "'zzzzzz'" in msg and "valid keys" in msg and "name" in msg


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.update(seed="abc"), "recipe.seed: expected an integer, got 'abc'"),
        (lambda r: r.update(plot="yes"), "recipe.plot: expected true/false"),
        (lambda r: r["model"]["tiny"].update(hidden_size=64.5), "recipe.model.tiny.hidden_size: expected an integer"),
        (lambda r: r["model"].update(dtype="fp8"), "recipe.model.dtype: 'fp8' is not one of"),
        (lambda r: r["data"]["train"].update(template="fancy"), "recipe.data.train.template: 'fancy' is not one of"),
        (lambda r: r.update(rewards={"name": "math_accuracy"}), "recipe.rewards: expected a list"),
        (lambda r: r.update(model="tiny"), "recipe.model: expected a mapping"),
        (lambda r: r["trainer"].update(max_steps="ten"), "trainer.max_steps: expected an integer, got 'ten'"),
        (lambda r: r["trainer"].update(learning_rate="fast"), "trainer.learning_rate: expected a number"),
        (lambda r: r["trainer"].update(num_generations=True), "trainer.num_generations: expected an integer"),
    ],
)
def test_wrong_types_fail_with_one_line(mutate, fragment):
    raw = grpo_raw()
    mutate(raw)
    assert fragment in error_of(raw)


def test_exponent_floats_without_dot_are_numbers(tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string; recipes and overrides still mean a number.
    raw = grpo_raw()
    raw["trainer"]["learning_rate"] = "1e-5"
    p = write_recipe(tmp_path, raw)
    assert "1e-5" in p.read_text()
    r = load_recipe(p)
    from rlkit.methods import get_method

    cfg = get_method("grpo").make_config(resolve_runs(r)[0])
    assert cfg.learning_rate == pytest.approx(1e-5)
    r2 = load_recipe(p, ["trainer.learning_rate=3e-4"])
    assert get_method("grpo").make_config(resolve_runs(r2)[0]).learning_rate == pytest.approx(3e-4)


def test_grpo_batch_not_divisible_fails():
    msg = error_of(grpo_raw(per_device_train_batch_size=6, num_generations=4))
    assert msg.startswith("trainer:") and "num_generations" in msg and "divisible" in msg


def test_impossible_combination_fails_before_model_load(tmp_path, monkeypatch, capsys):
    import rlkit.models
    from rlkit.cli import main

    class LoadedModel(Exception):
        pass

    def boom(*args, **kwargs):
        raise LoadedModel("load_model was called")

    monkeypatch.setattr(rlkit.models, "load_model", boom)
    monkeypatch.chdir(tmp_path)
    bad = write_recipe(tmp_path, grpo_raw(per_device_train_batch_size=6, num_generations=4), "bad.yaml")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlkit: error: trainer:") and "num_generations" in err
    assert len(err.splitlines()) == 1
    # Control: a valid recipe does reach model loading, so the patch above is effective.
    good = write_recipe(tmp_path, grpo_raw(), "good.yaml")
    with pytest.raises(LoadedModel):
        main(["train", str(good)])


def test_reserved_trainer_keys_rejected():
    msg = error_of(grpo_raw(output_dir="elsewhere"))
    assert msg.startswith("trainer.output_dir:") and "top-level `output_dir`" in msg
    msg = error_of(grpo_raw(seed=1))
    assert msg.startswith("trainer.seed:") and "top-level `seed`" in msg


def test_unknown_method_suggested():
    raw = grpo_raw()
    raw["method"] = "grop"
    msg = error_of(raw)
    assert "unknown method 'grop'" in msg and "did you mean 'grpo'" in msg and "sft" in msg


def test_missing_method_lists_methods():
    raw = grpo_raw()
    del raw["method"]
    msg = error_of(raw)
    assert "no `method`" in msg and "grpo" in msg


def test_unknown_reward_suggested():
    raw = grpo_raw()
    raw["rewards"] = [{"name": "math_acuracy"}]
    msg = error_of(raw)
    assert "unknown reward 'math_acuracy'" in msg and "did you mean 'math_accuracy'" in msg


def test_grpo_needs_a_reward():
    raw = grpo_raw()
    raw["rewards"] = []
    assert "needs at least one reward" in error_of(raw)


def test_method_and_stages_exclusive():
    raw = staged_raw()
    raw["method"] = "grpo"
    assert "not both" in error_of(raw)


def test_stage_names_unique_and_required():
    raw = staged_raw()
    raw["stages"][1]["name"] = "sft"
    assert "unique" in error_of(raw)
    raw = staged_raw()
    del raw["stages"][0]["method"]
    assert error_of(raw).startswith("stages[0]:")


def test_stage_trainer_validated_against_its_method():
    raw = staged_raw()
    raw["stages"][1]["trainer"]["num_generations"] = 3  # 8 % 3 != 0
    msg = error_of(raw)
    assert msg.startswith("stages.grpo.trainer:") and "num_generations" in msg
    raw = staged_raw()
    raw["stages"][0]["trainer"]["learnig_rate"] = 1.0
    msg = error_of(raw)
    assert msg.startswith("stages.sft.trainer:") and "did you mean 'learning_rate'" in msg


# --------------------------------------------------------------------------------------------------
# Overrides and staged merging


def test_dotted_overrides(tmp_path):
    p = write_recipe(tmp_path, grpo_raw())
    r = load_recipe(p, ["trainer.max_steps=3", "model.tiny.hidden_size=32", "data.train.limit=10",
                        "trainer.report_to=[]", "seed=11", "eval.enabled=true"])
    assert r.trainer["max_steps"] == 3
    assert r.model.tiny.hidden_size == 32
    assert r.data.train.limit == 10
    assert r.trainer["report_to"] == []
    assert r.seed == 11 and r.eval.enabled is True
    # A new section is created by an override.
    r = load_recipe(p, ["model.lora.r=4"])
    assert isinstance(r.model.lora, LoraSpec) and r.model.lora.r == 4


def test_override_errors(tmp_path):
    p = write_recipe(tmp_path, grpo_raw())
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(p, ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="did you mean 'max_steps'"):
        load_recipe(p, ["trainer.max_step=3"])
    with pytest.raises(RecipeError, match="expected an integer"):
        load_recipe(p, ["trainer.max_steps=three"])
    with pytest.raises(RecipeError, match="not a section"):
        load_recipe(p, ["seed.x=1"])


def test_parse_overrides_yaml_values():
    parsed = dict((".".join(k), v) for k, v in parse_overrides(["a.b=3", "a.c=true", "a.d=[1, 2]", "a.e=hi", "a.f="]))
    assert parsed == {"a.b": 3, "a.c": True, "a.d": [1, 2], "a.e": "hi", "a.f": ""}


def test_stage_override(tmp_path):
    p = write_recipe(tmp_path, staged_raw())
    runs = {r.name: r for r in resolve_runs(load_recipe(p, ["stages.grpo.trainer.max_steps=2"]))}
    assert runs["grpo"].trainer["max_steps"] == 2
    assert runs["sft"].trainer["max_steps"] == 10  # other stage untouched
    with pytest.raises(RecipeError, match="no stage named 'grop'.*did you mean 'grpo'"):
        load_recipe(p, ["stages.grop.trainer.max_steps=2"])


def test_staged_recipe_merges_stage_sections_over_top_level():
    runs = resolve_runs(recipe_from_dict(staged_raw()))
    assert [r.name for r in runs] == ["sft", "grpo"]
    sft, grpo = runs
    assert (sft.method, grpo.method) == ("sft", "grpo")
    # trainer: stage keys win, top-level keys are inherited
    assert sft.trainer == {"logging_steps": 50, "dataloader_num_workers": 0, "max_steps": 10}
    assert grpo.trainer["logging_steps"] == 5 and grpo.trainer["dataloader_num_workers"] == 0
    assert grpo.trainer["max_steps"] == 4
    # nested sections deep-merge
    assert sft.data.train.limit == 20 and sft.data.train.template == "plain"
    assert grpo.data.train.limit == 100
    assert grpo.model.tiny.num_hidden_layers == 1 and grpo.model.tiny.hidden_size == 64
    assert sft.model.tiny.num_hidden_layers == 2
    assert sft.eval.before is False and sft.eval.max_new_tokens == 32
    assert grpo.eval.before is True
    # rewards: replaced by the stage when given
    assert sft.rewards[0].weight == 1.0 and grpo.rewards[0].weight == 2.0
    # each stage gets its own output folder and the recipe seed
    assert Path(sft.output_dir) == Path("runs/staged/sft") and Path(grpo.output_dir) == Path("runs/staged/grpo")
    assert sft.seed == grpo.seed == 7


def test_stage_section_unknown_key():
    raw = staged_raw()
    raw["stages"][1]["model"] = {"tiny": {"hiden_size": 3}}
    msg = error_of(raw)
    assert "stages[1](grpo).model.tiny" in msg and "did you mean 'hidden_size'" in msg


def test_trainer_config_passthrough_and_defaults():
    from rlkit.methods import get_method

    run = resolve_runs(recipe_from_dict(grpo_raw(learning_rate=2e-5, beta=0.1)))[0]
    cfg = get_method("grpo").make_config(run)
    assert cfg.learning_rate == pytest.approx(2e-5) and cfg.beta == pytest.approx(0.1)
    assert cfg.num_generations == 4 and cfg.max_completion_length == 16
    assert Path(cfg.output_dir) == Path("runs/test") and cfg.seed == 3
    assert cfg.report_to in ("none", [], ["none"])
    import torch

    if not torch.cuda.is_available():
        assert cfg.bf16 is False


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("method: [grpo\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("- just a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(p)


# --------------------------------------------------------------------------------------------------
# Shipped recipes

_GPU_ONLY = re.compile(r"bf16|fp16|gpu|cuda|vllm|deepspeed|fsdp|nccl", re.IGNORECASE)


def _needs_gpu(raw: dict) -> bool:
    text = yaml.safe_dump(raw)
    return bool(re.search(r"use_vllm: true|bf16: true|fp16: true|deepspeed|fsdp|vllm_mode", text))


def test_shipped_recipes_found():
    assert (REPO / "recipes" / "quickstart.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_recipe_validates(path):
    raw = yaml.safe_load(path.read_text())
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        if _needs_gpu(raw) and _GPU_ONLY.search(str(e)):
            pytest.xfail(f"GPU-only recipe cannot validate on this machine: {e}")
        raise
    assert recipe.description.strip(), "every shipped recipe needs a description (shown by `rlkit recipes`)"
    assert resolve_runs(recipe)


# --------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "rlkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_cli_recipes_lists_shipped_recipes():
    out = _cli("recipes")
    assert out.returncode == 0, out.stderr
    for p in SHIPPED:
        rel = str(p.relative_to(REPO))
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(rel)), None)
        assert line is not None, f"{rel} missing from `rlkit recipes`:\n{out.stdout}"
        desc = str(yaml.safe_load(p.read_text()).get("description", "")).strip().splitlines()
        if desc:
            assert desc[0][:30] in line


def test_cli_error_exit_code_and_one_line(tmp_path):
    out = _cli("train", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlkit: error: ") and "not found" in lines[0], out.stderr
    bad = write_recipe(tmp_path, dict(grpo_raw(), seeed=1))
    out = _cli("train", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["rlkit: error: recipe: unknown key 'seeed'; did you mean 'seed'?"], out.stderr


def test_cli_main_bad_override(tmp_path, capsys):
    from rlkit.cli import main

    p = write_recipe(tmp_path, grpo_raw())
    assert main(["train", str(p), "trainer.learnig_rate=1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rlkit: error: trainer: unknown key 'learnig_rate'; did you mean 'learning_rate'?"


def test_resume_from_checkpoint_key_accepts_true_and_paths(tmp_path):
    import yaml

    from rlkit.recipe import RecipeError, load_recipe

    base = {"method": "grpo", "model": {"name": "tiny"}, "rewards": [{"name": "math_accuracy"}],
            "trainer": {"per_device_train_batch_size": 8, "num_generations": 4}}
    for value in (True, "latest", str(tmp_path)):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, "trainer": {**base["trainer"], "resume_from_checkpoint": value}}))
        load_recipe(path)
    path.write_text(yaml.safe_dump({**base, "trainer": {**base["trainer"], "resume_from_checkpoint": 3}}))
    with pytest.raises(RecipeError, match="resume_from_checkpoint"):
        load_recipe(path)


def test_stage_reward_errors_name_the_stage(tmp_path):
    import yaml

    from rlkit.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "stages": [
        {"name": "rl", "method": "grpo", "rewards": [{"name": "math_acuracy"}],
         "trainer": {"per_device_train_batch_size": 8, "num_generations": 4}}]}))
    with pytest.raises(RecipeError, match=r"stages\.rl\.rewards\[0\]\.name.*math_accuracy"):
        load_recipe(path)
