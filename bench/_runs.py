"""Helpers shared by the benchmarks: the common command-line flags and the final ``RESULT`` line, and, for the
benchmarks that train through ``rlkit train`` in subprocesses (one process per run, so several runs share the
machine with a fixed number of torch threads each), running a recipe and reading what it wrote."""

from __future__ import annotations

import argparse
import json
import numbers
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent

Preset = Literal["quick", "smoke", "full"]


def bench_parser(doc: str, *, quick: str, smoke: str, exclusive: bool = True,
                 seeds: bool = False) -> argparse.ArgumentParser:
    """A bench's parser with its ``--quick`` / ``--smoke`` presets (``quick`` and ``smoke`` are their help
    texts; a mutually exclusive pair unless ``exclusive`` is False) and, with ``seeds``, ``--seeds N [N ...]``.

    ``doc`` is the bench's module docstring; its first paragraph is the description. Add the bench's own
    flags next, then :func:`add_jobs_threads` and :func:`add_out` where they belong in the help."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group() if exclusive else p
    mode.add_argument("--quick", action="store_true", help=quick)
    mode.add_argument("--smoke", action="store_true", help=smoke)
    if seeds:
        p.add_argument("--seeds", type=int, nargs="+")
    return p


def add_jobs_threads(p: argparse.ArgumentParser, *, jobs: int | None = 2,
                     jobs_help: str = "training processes at a time",
                     threads_help: str = "torch threads per process") -> None:
    """``--jobs`` (processes at a time, default ``jobs``; left out when ``jobs`` is None) and ``--threads``
    (torch threads, default 1)."""
    if jobs is not None:
        p.add_argument("--jobs", type=int, default=jobs, help=jobs_help)
    p.add_argument("--threads", type=int, default=1, help=threads_help)


def add_out(p: argparse.ArgumentParser, help: str, type: Callable[[str], Any] | None = None) -> None:
    """``--out`` (default None: the bench picks its own place, which ``help`` should name)."""
    p.add_argument("--out", type=type, default=None, help=help)


def preset_of(args: argparse.Namespace) -> Preset:
    """``"smoke"``, ``"quick"`` or ``"full"`` from the parsed ``--smoke`` / ``--quick`` (smoke wins)."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def result_line(figures: Mapping[str, Any], digits: int | None = 4,
                precision: Mapping[str, int] | None = None) -> str:
    """``RESULT key=value ...`` in the order of ``figures``.

    A ``str`` is written as it is, an integer with ``str()``, anything else (float, numpy or torch scalar) as a
    float with ``precision[key]`` decimals if given, else ``digits`` (``None``: ``str()`` of the value);
    infinities and NaN come out as ``inf`` / ``-inf`` / ``nan``. Keys must be identifiers and values must not
    contain whitespace, so that ``(\\w+)=(\\S+)`` reads the line back."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, bool):
            raise TypeError(f"RESULT figure {key}: pass a number or a string, not a bool")
        if isinstance(value, (str, numbers.Integral)):
            text = str(value)
        else:
            d = (precision or {}).get(key, digits)
            text = str(value) if d is None else format(float(value), f".{d}f")
        if not key.isidentifier() or not text or any(c.isspace() for c in text):
            raise ValueError(f"RESULT figure {key}={text!r}: the key must be an identifier, the value one word")
        parts.append(f"{key}={text}")
    return "RESULT " + " ".join(parts)


def print_result(*, digits: int | None = 4, precision: Mapping[str, int] | None = None, **figures: Any) -> None:
    """Print the bench's final line, ``RESULT key=value ...`` (formatting: :func:`result_line`)."""
    print(result_line(figures, digits, precision))


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
