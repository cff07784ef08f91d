"""``method: autocei_data``: turn a ``sample`` stage's rows into the SFT set of one Auto-CEI / R-Tuning / expert
iteration round (arXiv 2410.07627; released ``ei_generation.py`` and ``rtuning.py``). No model loads.

The rows (``prompt_index``, ``completion``, ``status``; ``status: ok`` = a correct answer by the recipe's
rewards) are grouped by prompt, and ``mode`` decides what is written to ``sft_data.jsonl``:

- ``resample`` (Auto-CEI): each completion gets R = :func:`autocei_reward` (correct from the status, IDK from
  ``idk_phrases``, d = :func:`depth` with ``depth_splitter``) under the curriculum (``c1``, ``c2``); then
  :func:`boltzmann_resample` keeps every original once plus ``n_draws`` draws from p ∝ exp(R / tau) (default:
  as many draws as the prompt has samples, the released ``num_samples``), dropping R = -1 (wrong answers);
- ``rtuning`` (R-Tuning, the released ``rtuning.py``): correct answers are kept; a wrong one is kept as it is when
  it already says "sorry" (``keep_idk_phrases``), else its reasoning is cut at ``"\\n####"`` and ``ending``
  (:data:`RTUNING_ENDING`) appended;
- ``correct`` (plain expert iteration): the correct answers, each once.

Each written row is the sample row with ``solution`` = the text to fine-tune on (the sample row's reference
solution moves to ``reference_solution``) and ``R``, ``idk``, ``depth``, ``kind`` (``original`` / ``draw`` /
``rtuned``) added (no row survives: an empty file and a warning; the ``autocei`` stage then keeps its model), for an ``sft`` stage to read with ``data: {train: {from: STAGE, dataset: sft_data,
solution_column: solution}}``. The resampling is seeded per prompt from the stage seed, so a rerun writes the same
file. ``docs/methods/autocei.md`` has the recipe.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ...config import RecipeError
from .. import register_method
from ..base import Method, StageOutput
from .core import DEPTH_SPLITTERS, REWARD_IDK_PHRASES, RTUNING_ENDING, autocei_reward, boltzmann_resample, depth, is_idk

DATASET = "sft_data"


@dataclass
class AutoCEIDataConfig:
    """Settings of the ``autocei_data`` stage (recipe section ``args:``)."""

    mode: Literal["resample", "rtuning", "correct"] = "resample"
    """resample: Auto-CEI's curriculum reward and Boltzmann resampling; rtuning: wrong answers get the IDK ending;
    correct: plain expert iteration (correct answers only)."""
    c1: float | None = None
    """Curriculum centre: the depth at which an IDK answer's reward crosses 0 (resample; required)."""
    c2: float | None = None
    """Curriculum slope (resample; required)."""
    tau: float | None = None
    """Resampling temperature (resample; required): the released code uses the initial model's precision."""
    n_draws: int | None = None
    """Boltzmann draws per prompt on top of the originals (None: the prompt's number of samples, as released)."""
    depth_splitter: str = "newline"
    """How d is counted: newline (one step per line, the released count for non-MATH tasks), period_newline (the
    released MATH count, pieces between ".\\n"), paragraph, sentence or latex_sentence."""
    idk_phrases: list[str] = field(default_factory=lambda: list(REWARD_IDK_PHRASES))
    """Phrases that make an answer IDK for the reward (default: the released reward_processor's list)."""
    idk_first: bool = True
    """A correct answer holding an IDK phrase gets the IDK reward (the released reward_processor); false: +1."""
    ending: str = RTUNING_ENDING
    """rtuning: what replaces a wrong answer's final-answer line (the released rtuning.py's, EOS added by SFT)."""
    keep_idk_phrases: list[str] = field(default_factory=lambda: ["sorry"])
    """rtuning: a wrong answer holding one of these is kept unchanged (the released rtuning.py checks "sorry")."""

    def __post_init__(self):
        if self.depth_splitter not in DEPTH_SPLITTERS:
            raise ValueError(f"depth_splitter must be one of {', '.join(DEPTH_SPLITTERS)}, got {self.depth_splitter!r}")
        if not self.idk_phrases or any(not str(p).strip() for p in self.idk_phrases):
            raise ValueError("idk_phrases must be a non-empty list of non-empty phrases")
        if self.mode == "resample":
            missing = [k for k in ("c1", "c2", "tau") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"mode resample needs {', '.join(missing)} (the curriculum and the resampling "
                                 "temperature; the autocei stage sets them)")
            if not self.tau > 0:
                raise ValueError(f"tau must be > 0, got {self.tau}")
            if not self.c2 > 0:
                raise ValueError(f"c2 must be > 0, got {self.c2}")
        if self.n_draws is not None and self.n_draws < 0:
            raise ValueError(f"n_draws must be >= 0, got {self.n_draws}")


def rtuning_text(completion: str, ending: str = RTUNING_ENDING) -> str:
    """The released R-Tuning transformation: the reasoning before ``"\\n####"`` with ``ending`` appended."""
    return completion.split("\n####")[0] + ending


def build_rows(rows: list[dict], config: AutoCEIDataConfig, seed: int) -> list[dict]:
    """The SFT rows of one round from a sample stage's rows (see the module docstring)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("prompt_index", r.get("prompt")), []).append(r)
    out = []
    for key, group in groups.items():
        annotated = []
        for r in group:
            correct = r.get("status") == "ok"
            idk = is_idk(r["completion"], config.idk_phrases)
            d = depth(r["completion"], config.depth_splitter)
            reward = None
            if config.mode == "resample":
                reward = autocei_reward(correct, idk, d, config.c1, config.c2, idk_first=config.idk_first)
            annotated.append((r, correct, idk, d, reward))

        def emit(item, text: str, kind: str) -> None:
            r, correct, idk, d, reward = item
            row = {k: v for k, v in r.items() if k != "solution"}
            if "solution" in r:
                row["reference_solution"] = r["solution"]
            if kind == "rtuned":  # idk and depth describe the text written
                idk, d = is_idk(text, config.idk_phrases), depth(text, config.depth_splitter)
            row.update(solution=text, R=reward, idk=idk, depth=d, correct=correct, kind=kind)
            out.append(row)

        if config.mode == "correct":
            for item in annotated:
                if item[1]:
                    emit(item, item[0]["completion"], "original")
        elif config.mode == "rtuning":
            for item in annotated:
                text = item[0]["completion"]
                if item[1] or is_idk(text, config.keep_idk_phrases):
                    emit(item, text, "original")
                else:
                    emit(item, rtuning_text(text, config.ending), "rtuned")
        else:
            rng = random.Random(f"autocei-{seed}-{key}")
            n = len(group) if config.n_draws is None else config.n_draws
            picked = boltzmann_resample([a[4] for a in annotated], config.tau, rng, n=n)
            originals = set()
            for i in picked:
                emit(annotated[i], annotated[i][0]["completion"], "draw" if i in originals else "original")
                originals.add(i)
    return out


@register_method
class AutoCEIDataMethod(Method):
    """Build one round's SFT set from sampled rows (see the module docstring)."""

    name = "autocei_data"
    section = "args"
    loads_model = False
    outputs = (DATASET,)
    config = AutoCEIDataConfig

    def check(self, run, config, where: str) -> None:
        from ...data import is_stage_rows

        if not is_stage_rows(run.data.train):
            raise RecipeError("data.train: autocei_data reads sampled completions: take them from a sample stage "
                              "({from: sample, dataset: samples}) or a jsonl")

    def run(self, run, ctx) -> StageOutput:
        from ...data import DataError, load_selected_rows

        config: AutoCEIDataConfig = self.make_config(run)
        rows, source, _ = load_selected_rows(run.data.train)
        if not rows:
            raise DataError(f"autocei_data: {source} has no row")
        for i, r in enumerate(rows):
            if not isinstance(r.get("completion"), str) or "status" not in r:
                raise DataError(f"autocei_data: row {i} of {source} needs `completion` and `status` columns (the rows "
                                "of a sample stage)")
        kept = build_rows(rows, config, run.seed)
        if not kept:
            print(f"[rlkit] autocei_data: warning: no row of {source} survives mode {config.mode} (no correct answer"
                  f"{'' if config.mode == 'correct' else ' and no IDK answer above R = -1'}): the SFT set is empty",
                  flush=True)
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{DATASET}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in kept:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        n = max(1, len(kept))
        summary = {"mode": config.mode, "rows_in": len(rows), "rows_out": len(kept),
                   "correct_in": round(sum(r.get("status") == "ok" for r in rows) / len(rows), 4),
                   "idk_out": round(sum(r["idk"] for r in kept) / n, 4),
                   "correct_out": round(sum(r["correct"] for r in kept) / n, 4),
                   "rtuned_out": sum(r["kind"] == "rtuned" for r in kept)}
        if config.mode == "resample":
            summary.update(c1=config.c1, c2=config.c2, tau=config.tau,
                           mean_R=round(sum(r["R"] for r in kept) / n, 4))
        print(f"[rlkit] autocei_data ({config.mode}): {len(kept)} rows from {len(rows)} samples in {path} "
              f"(IDK {summary['idk_out']}, correct {summary['correct_out']})", flush=True)
        return StageOutput(model=None, datasets={DATASET: str(path)}, summary=summary)
