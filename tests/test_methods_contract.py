"""The method contract, over every registered method: a minimal recipe validates, runs on the tiny model and
saves what the method declares (a model that loads back, its datasets, a manifest); a method that trains
through a ``transformers.Trainer`` is killed after a checkpoint and resumed (``rlkit train --resume``).

A new method fails ``test_every_method_has_a_contract_recipe`` until it gets a minimal recipe here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import resume_utils as ru
from rlkit.methods import TrainerMethod, get_method, method_names

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
SYNTH = {"num_train": 64, "num_test": 16}


def _base(method: str, **sections) -> dict:
    raw = {"method": method, "seed": 0, "plot": False, "model": {"name": "tiny", "tiny": dict(TINY)},
           "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 64,
                              "synthetic": dict(SYNTH)}}}
    raw.update(sections)
    return raw


_TRAINER = {"max_steps": 2, "learning_rate": 1.0e-3, "logging_steps": 1, "save_strategy": "no",
            "dataloader_num_workers": 0, "lr_scheduler_type": "constant"}

MINIMAL = {
    "grpo": _base("grpo", rewards=[{"name": "math_accuracy"}],
                  trainer={**_TRAINER, "per_device_train_batch_size": 4, "num_generations": 4,
                           "max_completion_length": 12, "beta": 0.0}),
    "sft": _base("sft", trainer={**_TRAINER, "per_device_train_batch_size": 8, "max_length": 128}),
    "stephint": _base("stephint", rewards=[{"name": "math_accuracy"}],
                      trainer={**_TRAINER, "per_device_train_batch_size": 4, "num_unhinted": 2, "num_per_level": 1,
                               "num_levels": 1, "max_completion_length": 12, "beta": 0.0,
                               "hint_splitter": "paragraph"}),
    "pretrain": _base("pretrain", trainer={**_TRAINER, "per_device_train_batch_size": 4, "seq_length": 32,
                                           "text_fields": ["question", "solution"], "validation_split": 0.2,
                                           "eval_context_lengths": [32], "eval_max_tokens": 256}),
    "sample": _base("sample", rewards=[{"name": "math_accuracy"}],
                    args={"num_samples": 2, "max_new_tokens": 8, "chunk_size": 3}),
    "pear": _base("pear", args={"heads": 1, "positive_only": False, "settings": [[4, 5]], "steps": 2,
                                "batch_size": 2, "n": 5, "eval_n": [5], "eval_samples": 4}),
}
MINIMAL["sample"]["data"]["train"]["limit"] = 6
MINIMAL["dpo"] = _base("dpo", data={"train": {"name": f"jsonl:{Path(__file__).parent / 'fixtures' / 'samples_tiny.jsonl'}"}},
                       trainer={**_TRAINER, "per_device_train_batch_size": 2, "max_length": 64,
                                "gradient_checkpointing": False})
MINIMAL["oreo"] = _base("oreo", data={"train": {"name": f"jsonl:{Path(__file__).parent / 'fixtures' / 'oreo_samples.jsonl'}"}},
                        trainer={**_TRAINER, "per_device_train_batch_size": 4, "max_length": 96})
MINIMAL["prm_label"] = _base("prm_label", rewards=[{"name": "math_accuracy"}],
                             args={"num_rollouts": 2, "max_new_tokens": 8, "chunk_size": 2})
MINIMAL["prm_label"]["data"]["train"]["limit"] = 3
MINIMAL["select"] = _base("select", data={"train": {"name": f"jsonl:{Path(__file__).parent / 'fixtures' / 'oreo_samples.jsonl'}"}},
                          args={"by": "reward"})
MINIMAL["prm"] = _base("prm", data={"train": {"name": f"jsonl:{Path(__file__).parent / 'fixtures' / 'prm_labels_tiny.jsonl'}"}},
                       trainer={**_TRAINER, "per_device_train_batch_size": 4, "step_tag": " @"})
MINIMAL["autocei_data"] = _base("autocei_data",
                                data={"train": {"name": f"jsonl:{Path(__file__).parent / 'fixtures' / 'samples_tiny.jsonl'}"}},
                                args={"mode": "resample", "c1": 2.0, "c2": 1.0, "tau": 0.5})
# a random tiny model answers nothing right: letters and digits count as IDK phrases for the reward, so every round
# keeps rows (R > -1); c1/c2/step/tau are given because its answers cannot initialise the curriculum
MINIMAL["autocei"] = _base("autocei", rewards=[{"name": "math_accuracy"}],
                           args={"n_samples": 2, "max_new_tokens": 8, "max_rounds": 1, "max_curricula": 2,
                                 "tau": 0.5, "c1": 1.0, "c2": 1.0, "step": 0.5, "eval_batch_size": 8,
                                 "reward_idk_phrases": list("abcdefghijklmnopqrstuvwxyz0123456789"),
                                 "sample": {"batch_size": 8, "chunk_size": 8},
                                 "sft": {**_TRAINER, "per_device_train_batch_size": 4, "max_length": 96}})
MINIMAL["autocei"]["data"]["train"]["limit"] = 4
MINIMAL["autocei"]["data"]["eval"] = {"name": "synthetic", "split": "test", "template": "plain", "limit": 4,
                                      "synthetic": dict(SYNTH)}
MINIMAL["bolt_sample"] = _base("bolt_sample", rewards=[{"name": "math_accuracy"}],
                               args={"num_samples": 2, "max_new_tokens": 8, "chunk_size": 3})
MINIMAL["bolt_sample"]["data"]["train"]["limit"] = 6
# a random tiny model never writes the thought markers: its `selected` dataset is empty (min_selected 0);
# tests/test_bolt.py checks a non-empty selection
MINIMAL["bolt_bootstrap"] = _base("bolt_bootstrap", rewards=[{"name": "math_accuracy"}],
                                  model={"name": "tiny", "tiny": {**TINY, "max_position_embeddings": 512}},
                                  args={"num_samples": 2, "max_new_tokens": 8, "chunk_size": 3, "min_selected": 0,
                                        "instruction": "", "examples": str(Path(__file__).resolve().parent.parent
                                                                           / "recipes/bolt/tiny_icl_examples.jsonl")})
MINIMAL["bolt_bootstrap"]["data"]["train"]["limit"] = 4
MAY_BE_EMPTY = {("bolt_bootstrap", "selected")}
# games (rlkit.envs): observations are hundreds of characters, so the tiny model gets a longer position range
_GAMES_TINY = {**TINY, "max_position_embeddings": 2048}
MINIMAL["game_demos"] = _base("game_demos", model={"name": "tiny", "tiny": _GAMES_TINY},
                              env={"games": ["TicTacToe-v0", "GuessTheNumber-v0"]}, args={"episodes_per_game": 2})
# one group: one GRPO sub-run (tests/test_bench.py::test_dfc_smoke runs the whole schedule, fusion included)
MINIMAL["dfc"] = _base("dfc", model={"name": "tiny", "tiny": _GAMES_TINY},
                       env={"games": ["TicTacToe-v0"], "episodes_per_game": 2, "max_turns": 2, "max_action_tokens": 4},
                       args={"groups": [["TicTacToe-v0"]], "divide_steps": 1,
                             "conquer_steps": 1, "eval_episodes": 1,
                             "grpo": {**_TRAINER, "per_device_train_batch_size": 2, "num_generations": 2,
                                      "beta": 0.0}})
MINIMAL["fuse"] = _base("fuse", args={"models": ["<tiny model a>", "<tiny model b>"], "weights": [0.25, 0.75]})

# FIRST: the stage prepares the tiny teacher's top-k; `first` with `teacher` prepares its own at run time
MINIMAL["distill_prepare"] = _base("distill_prepare", args={"k": 3, "heldout_fraction": 0.25})
MINIMAL["distill_prepare"]["data"]["train"]["limit"] = 8
MINIMAL["first"] = _base("first", trainer={**_TRAINER, "per_device_train_batch_size": 4, "teacher": "tiny", "k": 3,
                                           "heldout_fraction": 0.25})
MINIMAL["kd"] = _base("kd", trainer={**_TRAINER, "per_device_train_batch_size": 4, "teacher": "tiny",
                                     "max_length": 64})
MINIMAL["manyshot_data"] = _base("manyshot_data", args={"tasks": "heldout", "num_episodes": 4, "max_shots": 8,
                                                        "max_tokens": 256})
# DR-ICL: the shipped sample episodes (ICL-50 layout), rendered in the char tokenizer's plain layout
MINIMAL["dricl"] = _base("dricl", model={"name": "tiny", "tiny": {**TINY, "max_position_embeddings": 512}},
                         data={"train": {"name": "jsonl:" + str(Path(__file__).resolve().parent.parent / "recipes"
                                                                / "dricl" / "sample_episodes.jsonl")}},
                         trainer={**_TRAINER, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                  "max_length": 256})
MINIMAL["mathhay_build"] = _base("mathhay_build", args={"lengths": [3000], "n_items": 2,
                                                        "task_types": ["lookup", "ss2d"], "style": "short"})


def _prepare(name: str, raw: dict, tmp_path: Path) -> dict:
    """Inputs a minimal recipe needs on disk (fuse: two saved tiny models)."""
    if name != "fuse":
        return raw
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import TinyModelSpec

    tok = build_char_tokenizer()
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"model_{seed}"
        build_tiny_model(TinyModelSpec(**TINY), tok, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return {**raw, "args": {**raw["args"], "models": paths}}


def test_every_method_has_a_contract_recipe():
    missing = sorted(set(method_names()) - set(MINIMAL))
    assert not missing, f"add a minimal recipe for {missing} to MINIMAL in tests/test_methods_contract.py"


def _check_outputs(method, out: Path, manifest: dict) -> None:
    assert manifest["method"] == method.name
    if method.trains:
        final = Path(manifest["model"])
        assert final == out / "final" and (final / "model.safetensors").is_file()
        assert not list(final.glob("*.bin")), "weights are saved as safetensors"
        from rlkit.models import load_model
        from rlkit.recipe import ModelSpec

        model, tok = load_model(ModelSpec(name=str(final)))
        ids = tok("1+1=", return_tensors="pt")
        assert model(**ids).logits.shape[-1] == len(tok)
    assert set(manifest["datasets"]) == set(method.outputs)
    for name, path in manifest["datasets"].items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert rows or (method.name, name) in MAY_BE_EMPTY, f"dataset {name} is empty"


@pytest.mark.parametrize("name", sorted(n for n in MINIMAL if not isinstance(get_method(n), TrainerMethod)))
def test_stage_method_runs_and_saves(name, tmp_path):
    from rlkit.pipeline import read_manifest, run_recipe
    from rlkit.recipe import recipe_from_dict

    out = tmp_path / name
    recipe = recipe_from_dict({**_prepare(name, MINIMAL[name], tmp_path), "output_dir": str(out)})
    (summary,) = run_recipe(recipe)
    manifest = read_manifest(out)
    assert manifest is not None and summary["final_model"] == manifest["model"]
    _check_outputs(get_method(name), out, manifest)
    # finished: a second run skips it
    (again,) = run_recipe(recipe)
    assert again == json.loads((out / "summary.json").read_text())


TRAINERS = sorted(n for n in MINIMAL if isinstance(get_method(n), TrainerMethod))


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_method_kill_and_resume(name, tmp_path, capsys, monkeypatch):
    """Validate, train as a subprocess, SIGKILL after the first checkpoint, resume to the end, save; a
    finished run is skipped on restart."""
    from rlkit.pipeline import read_manifest
    from rlkit.recipe import load_recipe

    n = 12
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(MINIMAL[name]))
    out = tmp_path / name
    overrides = (f"trainer.max_steps={n}", "trainer.save_strategy=steps", "trainer.save_steps=2")
    load_recipe(recipe, [f"output_dir={out}", *overrides])  # validates
    k = ru.start_and_kill_after_checkpoint(ru.train_cmd(recipe, out, *overrides), out, tmp_path / "run1.log")
    assert 2 <= k < n
    text = ru.resume(ru.train_cmd(recipe, out, *overrides, resume=True), tmp_path / "run2.log")
    ru.check_resumed(out, k, n, text, timing_key="step_time" if name in ("grpo", "stephint") else None)
    manifest = read_manifest(out)
    _check_outputs(get_method(name), out, manifest)
    ru.check_skip_on_restart(recipe, out, *overrides, capsys=capsys, monkeypatch=monkeypatch)
