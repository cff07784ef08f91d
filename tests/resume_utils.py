"""Helpers of the kill-and-resume tests: start `python -m rlkit train` as a subprocess on a tiny recipe, SIGKILL
it once a complete checkpoint exists, resume with `--resume`, and check it resumed rather than restarted: it
prints "resuming from <checkpoint-k>", trains (logs) exactly N - k steps itself, and the saved log history
keeps the killed run's entries for steps <= k unchanged."""

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


def env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny model: one thread is as fast and shares the cores better
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def train_cmd(recipe: Path, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "rlkit", "train", str(recipe), f"output_dir={out}", *overrides]
    return cmd + (["--resume"] if resume else [])


def complete_checkpoints(out: Path) -> dict[int, Path]:
    """step -> folder, for checkpoints whose trainer_state.json (written last) exists."""
    found = {}
    if out.is_dir():
        for d in out.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and (d / "trainer_state.json").is_file():
                found[int(m.group(1))] = d
    return found


def start_and_kill_after_checkpoint(cmd: list[str], out: Path, log: Path) -> int:
    """Start ``cmd``, SIGKILL it once a complete checkpoint exists; return the last complete step."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + RUN_TIMEOUT
    try:
        while time.time() < deadline:
            if complete_checkpoints(out):
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
    return max(complete_checkpoints(out))


def resume(cmd: list[str], log: Path) -> str:
    res = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=RUN_TIMEOUT)
    text = res.stdout.decode(errors="replace")
    log.write_text(text)
    assert res.returncode == 0, text[-4000:]
    return text


def step_logs(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h and "step" in h]


def check_resumed(out: Path, k: int, n: int, text: str, timing_key: str | None) -> None:
    ckpt = out / f"checkpoint-{k}"
    assert f"resuming from {ckpt}" in text
    # this process trained (and printed a log line for) only the steps after the checkpoint
    trained_here = len(re.findall(r"\{'loss': ", text))
    assert trained_here == n - k, f"resumed run logged {trained_here} steps, expected {n - k}"

    history = json.loads((out / "log_history.json").read_text())
    steps = [h["step"] for h in step_logs(history)]
    assert steps == list(range(1, n + 1)), steps
    # the killed run's entries come back unchanged from the checkpoint's trainer_state.json
    saved = step_logs(json.loads((ckpt / "trainer_state.json").read_text())["log_history"])
    assert [h["step"] for h in saved] == list(range(1, k + 1))
    assert step_logs(history)[:k] == saved
    if timing_key is not None:  # measured wall times: equal only if not re-run
        assert all(timing_key in h for h in saved)

    final_state = json.loads((out / f"checkpoint-{n}" / "trainer_state.json").read_text())
    assert final_state["global_step"] == n == final_state["max_steps"]
    for step, d in complete_checkpoints(out).items():  # weights as safetensors, not pickles
        assert (d / "model.safetensors").is_file(), f"{d} has no model.safetensors"
        assert not list(d.glob("pytorch_model*.bin")), f"{d} holds pickled weights"
    final = out / "final"
    assert (final / ".rlkit_done").is_file()
    assert (final / "model.safetensors").is_file()
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["final_model"]) == final


def check_skip_on_restart(recipe: Path, out: Path, *overrides: str, capsys, monkeypatch) -> None:
    """A finished run is not re-run by `rlkit train ... --resume` (in-process, model never loaded)."""
    from rlkit import pipeline
    from rlkit.cli import main

    marker = out / "final" / pipeline.DONE_MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "run_one", lambda *a, **k: pytest.fail("a finished run was started again"))
    assert main(["train", str(recipe), f"output_dir={out}", *overrides, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == before
