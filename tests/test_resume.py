"""Resuming and restarting: checkpoint choice (a save cut off mid-way is skipped), clear errors on bad resume
paths, finished stages skipped on restart and feeding the next, and the final save. The kill-and-resume runs
of every training method are in tests/test_methods_contract.py (helpers in tests/resume_utils.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------------------
# Unit tests (no training)


def _fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_resume_skips_checkpoint_cut_off_while_saving(tmp_path):
    from rlkit.pipeline import _resume_arg, last_complete_checkpoint

    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert _resume_arg(True, str(tmp_path)) is None  # nothing saved yet: start fresh
    _fake_checkpoint(tmp_path, 2)
    good = _fake_checkpoint(tmp_path, 10)
    cut = _fake_checkpoint(tmp_path, 11)
    (cut / "trainer_state.json").write_text("")  # killed while trainer_state.json itself was being written
    _fake_checkpoint(tmp_path, 12, complete=False)  # killed during the save of step 12
    (tmp_path / "checkpoint-99.tmp").mkdir()
    assert last_complete_checkpoint(str(tmp_path)) == str(good)
    assert _resume_arg(True, str(tmp_path)) == str(good)
    assert _resume_arg("latest", str(tmp_path)) == str(good)
    assert _resume_arg(None, str(tmp_path)) is None
    assert _resume_arg(str(good), str(tmp_path)) == str(good)


def test_resume_from_bad_path_is_a_clear_error(tmp_path):
    from rlkit.pipeline import _resume_arg
    from rlkit.recipe import RecipeError

    with pytest.raises(RecipeError, match="not a checkpoint folder"):
        _resume_arg(str(tmp_path / "nope"), str(tmp_path))
    partial = _fake_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(RecipeError, match="trainer_state.json"):
        _resume_arg(str(partial), str(tmp_path))


def _staged_recipe(out: Path):
    from rlkit.recipe import recipe_from_dict

    return recipe_from_dict({
        "seed": 0,
        "output_dir": str(out),
        "model": {"name": "tiny", "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}},
        "data": {"train": {"name": "synthetic", "template": "plain"}},
        "rewards": [{"name": "math_accuracy"}],
        "trainer": {"max_steps": 2},
        "stages": [
            {"name": "sft", "method": "sft", "trainer": {"per_device_train_batch_size": 8}},
            {"name": "grpo", "method": "grpo",
             "trainer": {"per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 16}},
        ],
    })


def test_finished_stage_is_skipped_and_feeds_the_next(tmp_path, monkeypatch):
    from rlkit import pipeline

    recipe = _staged_recipe(tmp_path)
    sft_final = tmp_path / "sft" / "final"
    sft_final.mkdir(parents=True)
    (sft_final / pipeline.DONE_MARKER).write_text("done\n")
    (tmp_path / "sft" / "summary.json").write_text(json.dumps({"stage": "sft", "final_model": str(sft_final)}))

    calls = []

    def fake_run_one(run, resume=None, **kwargs):
        calls.append((run, resume))
        return {"stage": run.name, "final_model": str(Path(run.output_dir) / "final")}

    monkeypatch.setattr(pipeline, "run_one", fake_run_one)
    results = pipeline.run_recipe(recipe, resume=True)
    assert [r.name for r, _ in calls] == ["grpo"]  # sft was not run again
    run, resume = calls[0]
    assert run.model.name == str(sft_final)  # the finished stage's model feeds the next stage
    assert resume is True
    assert results[0] == {"stage": "sft", "final_model": str(sft_final)}
    assert results[1]["stage"] == "grpo"


def test_unfinished_stage_is_rerun(tmp_path, monkeypatch):
    """Without the marker (e.g. killed while saving the final model) a stage runs (resumes) again."""
    from rlkit import pipeline

    recipe = _staged_recipe(tmp_path)
    (tmp_path / "sft" / "final").mkdir(parents=True)  # final folder, but no .rlkit_done marker
    calls = []
    monkeypatch.setattr(pipeline, "run_one", lambda run, resume=None, **kw: calls.append(run.name) or
                        {"stage": run.name, "final_model": str(Path(run.output_dir) / "final")})
    pipeline.run_recipe(recipe, resume=True)
    assert calls == ["sft", "grpo"]


def test_save_final_is_safetensors_with_marker(tmp_path):
    """save_final writes the model as safetensors, the tokenizer, and the done marker."""
    from types import SimpleNamespace

    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.methods import DONE_MARKER, save_final
    from rlkit.recipe import TinyModelSpec

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1), tok)
    waited = []

    class Acc:
        is_main_process = True

        def unwrap_model(self, m):
            return m

        def wait_for_everyone(self):
            waited.append(True)

    path = save_final(SimpleNamespace(model=model, accelerator=Acc()), tok, tmp_path / "final")
    assert path == str(tmp_path / "final") and waited
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", DONE_MARKER} <= names
    assert not [n for n in names if n.endswith(".bin")]
