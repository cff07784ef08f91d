"""Helpers shared by the benchmarks that train through ``rlkit train`` in subprocesses (one process per run,
so several runs share the machine with a fixed number of torch threads each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The folder of the shared data files: ``$RLKIT_DATA_DIR``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("RLKIT_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def train(recipe: dict | Path, overrides: list[str], log: Path, threads: int = 1) -> None:
    """Run ``python -m rlkit train`` on a recipe (a file, or a dict written next to ``log``)."""
    if isinstance(recipe, dict):
        path = log.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipe = path
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "rlkit", "train", str(recipe), *overrides]
    with open(log, "w") as f:
        res = subprocess.run(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"rlkit train failed ({res.returncode}); see {log}:\n" + log.read_text()[-3000:])


def load_recipe_dict(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def only_stages(recipe: dict, *names: str) -> dict:
    """A copy of a staged recipe keeping the named stages."""
    out = dict(recipe)
    out["stages"] = [s for s in recipe["stages"] if s["name"] in names]
    return out


def summary(run_dir: Path, stage: str) -> dict:
    return json.loads((Path(run_dir) / stage / "summary.json").read_text())


def heldout_curve(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    """(step, held-out accuracy) pairs logged by the eval callback, step 0 included."""
    history = json.loads((Path(run_dir) / stage / "log_history.json").read_text())
    return [(h["step"], h["heldout/accuracy"]) for h in history if "heldout/accuracy" in h]


def done(run_dir: Path, stage: str) -> bool:
    return (Path(run_dir) / stage / "final" / ".rlkit_done").exists()
