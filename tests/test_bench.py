"""The benchmark scripts run and end with a parseable ``RESULT key=value ...`` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def _result(stdout: str) -> dict[str, str]:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "bench printed nothing"
    last = lines[-1]
    assert last.startswith("RESULT "), f"last line is not a RESULT line: {last!r}"
    return dict(re.findall(r"(\w+)=(\S+)", last))


def test_grpo_overhead_smoke(repo_root):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "grpo_overhead.py"), "--smoke"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _result(proc.stdout)
    for key in ("ratio", "rlkit_step_s", "trl_step_s"):
        assert key in res, res
        assert float(res[key]) > 0
    # one line per figure before the RESULT line
    assert "rlkit grpo step time" in proc.stdout and "trl GRPOTrainer step time" in proc.stdout


def test_grpo_overhead_cli(repo_root):
    script = str(repo_root / "bench" / "grpo_overhead.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0
    assert "--quick" in help_.stdout and "--smoke" in help_.stdout
    bad = subprocess.run([sys.executable, script, "--smoke", "--steps", "1", "--warmup", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "--steps must exceed --warmup" in bad.stderr
