"""Kill-and-resume: a run killed with SIGKILL after it saved a checkpoint continues from that checkpoint
with `rlkit train ... --resume`, ends at `max_steps`, and a finished run/stage is skipped on restart.

The end-to-end tests start `python -m rlkit train` as a subprocess on the tiny recipes in
tests/fixtures/ (hidden 64, 2 layers), wait for the first complete checkpoint, SIGKILL the process and
resume. What shows the second run resumed rather than restarted: it prints "resuming from
<checkpoint-k>", it trains (logs) exactly N - k steps itself, and the saved log history keeps the
killed run's entries for steps <= k unchanged (for GRPO including their measured `step_time`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GRPO_RECIPE = FIXTURES / "tiny_grpo.yaml"
SFT_RECIPE = FIXTURES / "tiny_sft.yaml"

RUN_TIMEOUT = 300  # seconds for one subprocess run


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny model: one thread is as fast and shares the cores better
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_cmd(recipe: Path, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "rlkit", "train", str(recipe), f"output_dir={out}", *overrides]
    return cmd + (["--resume"] if resume else [])


def _complete_checkpoints(out: Path) -> dict[int, Path]:
    """step -> folder, for checkpoints whose trainer_state.json (written last) exists."""
    found = {}
    if out.is_dir():
        for d in out.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and (d / "trainer_state.json").is_file():
                found[int(m.group(1))] = d
    return found


def _start_and_kill_after_checkpoint(cmd: list[str], out: Path, log: Path) -> int:
    """Start ``cmd``, SIGKILL it once a complete checkpoint exists; return the last complete step."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + RUN_TIMEOUT
    try:
        while time.time() < deadline:
            if _complete_checkpoints(out):
                break
            if proc.poll() is not None:
                pytest.fail(f"run exited (rc={proc.returncode}) before it saved a checkpoint:\n{log.read_text()[-4000:]}")
            time.sleep(0.02)
        else:
            pytest.fail(f"no checkpoint after {RUN_TIMEOUT}s:\n{log.read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run finished (rc={proc.returncode}) before it could be killed; raise max_steps")
    assert not (out / "final" / ".rlkit_done").exists()
    return max(_complete_checkpoints(out))


def _resume(cmd: list[str], log: Path) -> str:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=RUN_TIMEOUT)
    text = res.stdout.decode(errors="replace")
    log.write_text(text)
    assert res.returncode == 0, text[-4000:]
    return text


def _step_logs(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h and "step" in h]


def _check_resumed(out: Path, k: int, n: int, text: str, timing_key: str | None) -> None:
    ckpt = out / f"checkpoint-{k}"
    assert f"resuming from {ckpt}" in text
    # this process trained (and printed a log line for) only the steps after the checkpoint
    trained_here = len(re.findall(r"\{'loss': ", text))
    assert trained_here == n - k, f"resumed run logged {trained_here} steps, expected {n - k}"

    history = json.loads((out / "log_history.json").read_text())
    steps = [h["step"] for h in _step_logs(history)]
    assert steps == list(range(1, n + 1)), steps
    # the killed run's entries come back unchanged from the checkpoint's trainer_state.json
    saved = _step_logs(json.loads((ckpt / "trainer_state.json").read_text())["log_history"])
    assert [h["step"] for h in saved] == list(range(1, k + 1))
    assert _step_logs(history)[:k] == saved
    if timing_key is not None:  # measured wall times: equal only if not re-run
        assert all(timing_key in h for h in saved)

    final_state = json.loads((out / f"checkpoint-{n}" / "trainer_state.json").read_text())
    assert final_state["global_step"] == n == final_state["max_steps"]
    for step, d in _complete_checkpoints(out).items():  # weights as safetensors, not pickles
        assert (d / "model.safetensors").is_file(), f"{d} has no model.safetensors"
        assert not list(d.glob("pytorch_model*.bin")), f"{d} holds pickled weights"
    final = out / "final"
    assert (final / ".rlkit_done").is_file()
    assert (final / "model.safetensors").is_file()
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["final_model"]) == final


def _check_skip_on_restart(recipe: Path, out: Path, *overrides: str, capsys, monkeypatch) -> None:
    """A finished run is not re-run by `rlkit train ... --resume` (in-process, model never loaded)."""
    from rlkit import pipeline
    from rlkit.cli import main

    marker = out / "final" / pipeline.DONE_MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "run_one", lambda *a, **k: pytest.fail("a finished run was started again"))
    assert main(["train", str(recipe), f"output_dir={out}", *overrides, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == before


def test_grpo_kill_and_resume(tmp_path, capsys, monkeypatch):
    # steps_per_generation=4: TRL generates for 4 optimizer steps at once, so resuming at a checkpoint
    # every 2 steps lands in the middle of a generation buffer (the resumed run generates afresh).
    n = 40
    out = tmp_path / "grpo"
    overrides = (f"trainer.max_steps={n}", "trainer.save_strategy=steps", "trainer.save_steps=2",
                 "trainer.steps_per_generation=4")
    k = _start_and_kill_after_checkpoint(_train_cmd(GRPO_RECIPE, out, *overrides), out, tmp_path / "run1.log")
    assert 2 <= k < n
    text = _resume(_train_cmd(GRPO_RECIPE, out, *overrides, resume=True), tmp_path / "run2.log")
    _check_resumed(out, k, n, text, timing_key="step_time")
    _check_skip_on_restart(GRPO_RECIPE, out, *overrides, capsys=capsys, monkeypatch=monkeypatch)


def test_sft_kill_and_resume(tmp_path, capsys, monkeypatch):
    n = 40
    out = tmp_path / "sft"
    overrides = (f"trainer.max_steps={n}", "trainer.save_strategy=steps", "trainer.save_steps=2")
    k = _start_and_kill_after_checkpoint(_train_cmd(SFT_RECIPE, out, *overrides), out, tmp_path / "run1.log")
    assert 2 <= k < n
    text = _resume(_train_cmd(SFT_RECIPE, out, *overrides, resume=True), tmp_path / "run2.log")
    _check_resumed(out, k, n, text, timing_key=None)
    _check_skip_on_restart(SFT_RECIPE, out, *overrides, capsys=capsys, monkeypatch=monkeypatch)


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
    from rlkit.pipeline import DONE_MARKER, RunContext
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

    ctx = RunContext(model=model, tokenizer=tok, final_dir=tmp_path / "final")
    path = ctx.save_final(SimpleNamespace(model=model, accelerator=Acc()))
    assert path == str(tmp_path / "final") and waited
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", DONE_MARKER} <= names
    assert not [n for n in names if n.endswith(".bin")]
