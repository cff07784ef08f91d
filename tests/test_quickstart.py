"""The quickstart: the CLI runs both stages end to end, and (slow) the full recipe improves held-out
accuracy in the RL phase, beyond what SFT reached."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlkit.data.synthetic import SyntheticConfig, generate


def test_slipped_demonstrations_only_in_train_solutions():
    cfg = SyntheticConfig(max_operand=12, min_ops=2, max_ops=4, slip_rate=0.9)
    train, test = generate(cfg, "train"), generate(cfg, "test")
    slipped = [r for r in train if not r["solution"].endswith(f"#### {r['answer']}")]
    # only solutions ending in a subtraction slip, by exactly +1, and the answer column stays true
    assert 0.35 < len(slipped) / len(train) < 0.55
    for r in slipped:
        last = r["solution"].splitlines()[-2]
        lhs, written = last.split("=")
        a, b = lhs.split("-") if lhs.count("-") == 1 else (None, None)
        assert a is not None, last
        assert int(written) == int(a) - int(b) + 1 == int(r["answer"]) + 1
    assert all(r["solution"].endswith(f"#### {r['answer']}") for r in test)
    # slip_rate 0 reproduces the clean task exactly
    clean = SyntheticConfig(max_operand=12, min_ops=2, max_ops=4)
    assert generate(clean, "train") == generate(SyntheticConfig(**{**clean.__dict__, "slip_rate": 0.0}), "train")
    with pytest.raises(ValueError, match="slip_rate"):
        generate(SyntheticConfig(slip_rate=1.5), "train")


def test_quickstart_cli_runs_both_stages(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "rlkit", "quickstart", "--output-dir", str(out),
         "stages.sft.trainer.max_steps=5", "stages.grpo.trainer.max_steps=2", "stages.grpo.trainer.save_steps=2",
         "eval.limit=8", "stages.grpo.eval.every_steps=1"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy before RL" in proc.stdout and "held-out accuracy after GRPO" in proc.stdout
    summary = json.loads((out / "grpo" / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 8
    assert (out / "grpo" / "training.png").stat().st_size > 1000
    assert (out / "sft" / "final" / "model.safetensors").exists()
    assert (out / "grpo" / "final" / "model.safetensors").exists()
    steps = [h["step"] for h in json.loads((out / "grpo" / "log_history.json").read_text()) if "heldout/accuracy" in h]
    assert steps == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.long
def test_full_quickstart_improves_in_the_rl_phase(tmp_path):
    from rlkit.quickstart import run_quickstart

    result = run_quickstart(output_dir=str(tmp_path / "qs"))
    assert result["wall_seconds"] < 600
    assert result["after_rl"] >= result["before_rl"] + 0.08, result
