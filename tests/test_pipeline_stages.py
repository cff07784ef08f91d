"""Stages that pass data: manifests, `from:` references to an earlier stage's model and datasets, repeated
blocks with an iteration index, recipe inheritance (`base:`), and a 3-iteration sample -> SFT pipeline that
is killed mid-iteration and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import resume_utils as ru
from rlkit.recipe import RecipeError, load_recipe, recipe_from_dict, resolve_runs

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}


def loop_recipe(out: Path, iterations: int = 3) -> dict:
    """SFT warm-up, then N x (sample 2 completions for 6 prompts -> SFT on them from the warm-up model)."""
    return {
        "seed": 0, "output_dir": str(out), "plot": False,
        "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 32,
                           "synthetic": {"num_train": 32, "num_test": 8}}},
        "rewards": [{"name": "math_accuracy"}],
        "trainer": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1.0e-3, "logging_steps": 1,
                    "save_strategy": "no", "dataloader_num_workers": 0, "max_length": 128},
        "stages": [
            {"name": "warmup", "method": "sft"},
            {"repeat": iterations, "stages": [
                {"name": "sample", "method": "sample", "data": {"train": {"limit": 6}},
                 "args": {"num_samples": 2, "max_new_tokens": 16, "chunk_size": 3}},
                {"name": "sft", "method": "sft", "model": {"from": "warmup"},
                 "data": {"train": {"from": "sample", "dataset": "samples", "template": "plain",
                                    "solution_column": "completion"}}},
            ]},
        ],
    }


def test_repeat_blocks_unroll_with_iteration_names_seeds_and_dirs(tmp_path):
    raw = loop_recipe(tmp_path)
    raw["stages"][1]["stages"][0]["args"]["stop"] = ["STOP{iteration}"]
    runs = resolve_runs(recipe_from_dict(raw))
    assert [r.name for r in runs] == ["warmup", "sample-1", "sft-1", "sample-2", "sft-2", "sample-3", "sft-3"]
    assert [r.seed for r in runs] == [0, 0, 0, 1, 1, 2, 2]
    assert [r.iteration for r in runs] == [None, 1, 1, 2, 2, 3, 3]
    assert runs[3].output_dir == str(tmp_path / "sample-2")
    assert runs[5].args["stop"] == ["STOP3"]
    assert runs[2].data.train.source == "sample" and runs[2].data.train.dataset == "samples"
    assert runs[2].data.train.limit is None  # a `from:` section does not inherit the top-level data section


def test_stage_overrides_reach_stages_inside_blocks(tmp_path):
    p = tmp_path / "loop.yaml"
    p.write_text(yaml.safe_dump(loop_recipe(tmp_path)))
    runs = resolve_runs(load_recipe(p, ["stages.sample.args.num_samples=3", "stages.warmup.trainer.max_steps=1"]))
    assert all(r.args["num_samples"] == 3 for r in runs if r.stage == "sample")
    assert runs[0].trainer["max_steps"] == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stages"][1]["stages"][1]["data"]["train"].update({"from": "sampel"}),
     r"stages\.sft\.data\.train\.from: 'sampel' is not an earlier stage; did you mean 'sample'"),
    (lambda r: r["stages"][1]["stages"][1]["data"]["train"].update({"dataset": "rows"}),
     r"stages\.sft\.data\.train\.dataset: stage 'sample' writes samples, not 'rows'"),
    (lambda r: r["stages"][1]["stages"][1].update({"model": {"from": "sft"}}),
     r"stages\.sft\.model\.from: 'sft' is not an earlier stage"),
    (lambda r: r["stages"][1]["stages"][0].update({"data": {"train": {"from": "warmup", "dataset": "x"}}}),
     r"stage 'warmup' \(method sft\) writes no dataset"),
    (lambda r: r["stages"][1].update({"repeat": 0}), r"stages\[1\]: `stages` inside a stage needs `repeat: N`"),
    (lambda r: r["stages"][1]["stages"].append({"repeat": 2, "stages": []}), r"cannot be nested"),
    (lambda r: r["stages"][1]["stages"][0]["args"].update({"num_sample": 1}),
     r"stages\.sample\.args: unknown key 'num_sample'; did you mean 'num_samples'"),
])
def test_reference_and_block_errors(tmp_path, mutate, message):
    raw = loop_recipe(tmp_path)
    mutate(raw)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw)


def test_from_needs_stages():
    with pytest.raises(RecipeError, match="a recipe without `stages` has none"):
        recipe_from_dict({"method": "sft", "model": {"name": "tiny"},
                          "data": {"train": {"from": "x", "dataset": "samples"}}})


def test_inheritance_merges_stages_by_name(tmp_path):
    base = loop_recipe(tmp_path / "out")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(yaml.safe_dump(base))
    child = {"base": "base.yaml", "seed": 5, "output_dir": str(tmp_path / "child"),
             "stages": [{"name": "warmup", "trainer": {"max_steps": 7}},
                        {"name": "eval_sample", "method": "sample", "args": {"num_samples": 1, "temperature": 0}}]}
    p = tmp_path / "recipes" / "child.yaml"
    p.write_text(yaml.safe_dump(child))
    runs = resolve_runs(load_recipe(p))
    assert runs[0].name == "warmup" and runs[0].trainer["max_steps"] == 7 and runs[0].method == "sft"
    assert runs[-1].name == "eval_sample" and runs[0].seed == 5
    assert runs[0].output_dir == str(tmp_path / "child" / "warmup")
    (tmp_path / "recipes" / "base.yaml").write_text(yaml.safe_dump({"base": "child.yaml", "method": "sft"}))
    with pytest.raises(RecipeError, match="form a cycle"):
        load_recipe(p)
    p.write_text(yaml.safe_dump({"base": "missing.yaml"}))
    with pytest.raises(RecipeError, match="base recipe 'missing.yaml' not found"):
        load_recipe(p)


def test_shipped_recipes_may_inherit(repo_root):
    """A recipe variant that only overrides what changes loads like the file it extends."""
    base = resolve_runs(load_recipe(repo_root / "recipes" / "expert_iteration" / "tiny.yaml"))
    runs = resolve_runs(load_recipe(repo_root / "recipes" / "expert_iteration" / "tiny_more_samples.yaml"))
    assert [r.name for r in base] == ["sft", "sample-1", "refine-1", "sample-2", "refine-2", "sample-3", "refine-3"]
    assert [r.name for r in runs][-2:] == ["sample-4", "refine-4"]
    assert all(r.args["num_samples"] == 8 for r in runs if r.stage == "sample")
    assert [r.trainer for r in runs[:3]] == [r.trainer for r in base[:3]]


def test_named_model_is_not_chained(tmp_path, monkeypatch):
    from rlkit import pipeline

    raw = {"seed": 0, "output_dir": str(tmp_path), "model": {"name": "tiny", "tiny": TINY},
           "data": {"train": {"name": "synthetic", "template": "plain"}},
           "trainer": {"max_steps": 1},
           "stages": [{"name": "a", "method": "sft"}, {"name": "b", "method": "sft"},
                      {"name": "c", "method": "sft", "model": {"name": "other/model"}},
                      {"name": "d", "method": "sft", "model": {"from": "a"}}]}
    seen = []

    def fake_run_one(run, resume=None, **kw):
        seen.append((run.name, run.model.name))
        final = str(Path(run.output_dir) / "final")
        return {"stage": run.name, "final_model": final, "manifest": {"model": final, "datasets": {}}}

    monkeypatch.setattr(pipeline, "run_one", fake_run_one)
    pipeline.run_recipe(recipe_from_dict(raw))
    assert seen == [("a", "tiny"), ("b", str(tmp_path / "a" / "final")), ("c", "other/model"),
                    ("d", str(tmp_path / "a" / "final"))]


def test_sample_sft_loop_killed_mid_iteration_restarts_and_skips_what_finished(tmp_path):
    out = tmp_path / "loop"
    recipe = tmp_path / "loop.yaml"
    recipe.write_text(yaml.safe_dump(loop_recipe(out)))
    cmd = [sys.executable, "-m", "rlkit", "train", str(recipe)]
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ru.ROOT, env=ru.env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + ru.RUN_TIMEOUT
    try:  # kill once iteration 2 has sampled (its SFT stage is about to run or running)
        while not (out / "sample-2" / "manifest.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"pipeline exited early (rc={proc.returncode}):\n{log1.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"no sample-2 manifest after {ru.RUN_TIMEOUT}s:\n{log1.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "sample-3").exists()
    text = ru.resume(cmd, tmp_path / "run2.log")
    for name in ("warmup", "sample-1", "sft-1", "sample-2"):
        assert f"stage {name!r} already finished" in text, name
    for name in ("sft-2", "sample-3", "sft-3"):
        assert f"stage {name!r} already finished" not in text and f"{name!r}: method=" in text, name
    for it in (1, 2, 3):
        sft = json.loads((out / f"sft-{it}" / "summary.json").read_text())
        assert sft["data"]["train"] == f"jsonl:{out / f'sample-{it}' / 'samples.jsonl'}"
        assert sft["model"] == str(out / "warmup" / "final")  # model: {from: warmup}
        sample = json.loads((out / f"sample-{it}" / "summary.json").read_text())
        expected_model = str(out / ("warmup" if it == 1 else f"sft-{it - 1}") / "final")
        assert sample["model"] == expected_model  # sampling follows the latest policy
        rows = [json.loads(line) for line in (out / f"sample-{it}" / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and {r["seed"] for r in rows} == {it - 1}
    from rlkit.pipeline import read_manifest

    assert read_manifest(out / "sft-3")["model"] == str(out / "sft-3" / "final")
    # a finished stage whose own output is gone runs again
    import shutil

    shutil.rmtree(out / "sft-3" / "final")
    assert read_manifest(out / "sft-3") is None and read_manifest(out / "sample-3") is not None
