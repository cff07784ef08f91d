"""``method: select``: keep the best completions of each prompt by a reward model's score (RAFT's selection step).

RAFT / rejection-sampling fine-tuning as the ER-PRM paper runs it (arXiv 2412.11006, ``RAFT/rso_reward.py``):
sample N responses per prompt (a ``sample`` stage), keep the one the PRM scores highest (the min over its steps),
fine-tune on the kept ones (an ``sft`` stage on ``{from: select, dataset: selected}``), and repeat. This stage
is the middle step. It scores every row of ``data.train`` with

- ``by: scorer`` (default): the reward model saved at ``scorer``, or, when that is unset, the stage's own model
  (``model: {from: prm}`` names a PRM stage of the same recipe): a ``method: prm`` run's ``final/`` (PRM or
  ORM) or an OREO critic; a PRM's solution score is its step scores aggregated (``aggregate``; default the
  PRM's own, min); steps are the row's ``steps`` column when present, else the completion split with the PRM's
  splitter;
- ``by: reward``: the row's ``reward`` (the sample stage's verifier score: plain rejection sampling);

groups rows by ``group`` (default ``prompt_index``, the sample stage's prompt id; ``prompt`` when absent), and
writes the ``keep`` best of each group (ties: the earlier row) whose score is at least ``min_score`` to
``selected.jsonl`` with ``score``, ``step_scores`` (PRM) and ``rank`` added. The stage trains nothing and hands
on no model, so the next stage starts from the model the rows were sampled from (the pipeline's chain skips
it). ``docs/methods/er_prm.md`` shows the RAFT recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import RecipeError
from . import register_method
from .base import Method, StageOutput

DATASET = "selected"


@dataclass
class SelectConfig:
    """Settings of the ``select`` stage (recipe section ``args:``)."""

    by: Literal["scorer", "reward"] = "scorer"
    """scorer: a saved reward model's score; reward: the rows' own ``reward`` column."""
    scorer: str | None = None
    """Folder of a saved PRM / ORM (``method: prm`` final/) or OREO critic (``final/critic``), for by: scorer
    (None: the stage's own model, e.g. ``model: {from: prm}``)."""
    aggregate: Literal["min", "last", "mean", "product"] | None = None
    """How a PRM's step scores make a solution score (None: the PRM's own default, min as the released code)."""
    keep: int = 1
    """Completions kept per prompt (RAFT: 1, the best)."""
    group: str = "prompt_index"
    """Column that identifies a prompt's group of completions (``prompt`` when the rows lack it)."""
    min_score: float | None = None
    """Drop kept rows scoring below this (None: keep the best whatever it scores)."""
    batch_size: int = 16
    """Solutions per scorer forward pass."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the scorer loads in."""

    def __post_init__(self):
        if self.by == "reward" and self.scorer:
            raise ValueError("`scorer` is only used with by: scorer")
        if self.keep < 1 or self.batch_size < 1:
            raise ValueError("keep and batch_size must be at least 1")


def group_best(rows: list[dict], scores: list[float], keep: int, group: str,
               min_score: float | None = None) -> list[tuple[int, int]]:
    """``(row index, rank)`` of the ``keep`` best rows of each group, in the rows' order of first appearance of
    each group; ties keep the earlier row; rows below ``min_score`` are dropped."""
    key = group if rows and group in rows[0] else "prompt"
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(json.dumps(r.get(key), sort_keys=True), []).append(i)
    out = []
    for members in groups.values():
        ranked = sorted(members, key=lambda i: -scores[i])[:keep]  # stable sort: ties keep row order
        out.extend((i, rank) for rank, i in enumerate(ranked) if min_score is None or scores[i] >= min_score)
    return out


@register_method
class SelectMethod(Method):
    """Score rows with a reward model (or their reward) and keep the best of each prompt (module docstring)."""

    name = "select"
    section = "args"
    loads_model = False
    outputs = (DATASET,)
    config = SelectConfig

    def check(self, run, config: SelectConfig, where: str) -> None:
        from ..data import is_stage_rows

        if not is_stage_rows(run.data.train):
            raise RecipeError("data.train: select scores sampled completions: take them from a sample stage "
                              "({from: sample, dataset: samples}) or a jsonl")

    def run(self, run, ctx) -> StageOutput:
        from tqdm.auto import tqdm

        from ..data import DataError, load_selected_rows

        config: SelectConfig = self.make_config(run)
        rows, source, _ = load_selected_rows(run.data.train)
        if run.data.train.limit is not None:
            rows = rows[: run.data.train.limit]
        if not rows:
            raise DataError(f"select: {source} has no row")
        for i, r in enumerate(rows):
            if not isinstance(r.get("completion"), str) or not isinstance(r.get("prompt"), str):
                raise DataError(f"select: row {i} of {source} needs text `prompt` and `completion` columns")
        step_scores: list[list[float] | None] = [None] * len(rows)
        if config.by == "reward":
            if any(r.get("reward") is None for r in rows):
                raise DataError(f"select: by reward needs a `reward` in every row of {source}")
            scores = [float(r["reward"]) for r in rows]
        else:
            from ..process_reward import ProcessRewardModel, aggregate_scores, load_step_scorer

            path = config.scorer or ctx.model_path
            from ..models import ModelError

            try:
                scorer = load_step_scorer(path, dtype=config.dtype)
            except ModelError as e:
                raise ModelError(f"select: {e}; set args.scorer or the stage's model: {{from: <prm stage>}}") from None
            scores = []
            bar = tqdm(total=len(rows), desc="select: score", unit="row")
            for start in range(0, len(rows), config.batch_size):
                part = rows[start:start + config.batch_size]
                prompts = [r["prompt"] for r in part]
                if isinstance(scorer, ProcessRewardModel):
                    steps = [r["steps"] if isinstance(r.get("steps"), list) else scorer.split(r["completion"])
                             for r in part]
                    per_step = scorer.score_batch(prompts, steps)
                    how = config.aggregate or scorer.aggregate
                    for k, s in enumerate(per_step):
                        step_scores[start + k] = s
                        scores.append(aggregate_scores(s, how) if s else 0.0)
                else:
                    scores.extend(scorer.score_texts(prompts, [r["completion"] for r in part]))
                bar.update(len(part))
            bar.close()
        kept = group_best(rows, scores, config.keep, config.group, config.min_score)
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{DATASET}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for i, rank in kept:
                row = dict(rows[i], score=scores[i], rank=rank)
                if step_scores[i] is not None:
                    row["step_scores"] = step_scores[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        ok = [rows[i].get("status") == "ok" for i, _ in kept if "status" in rows[i]]
        summary = {"rows": len(rows), "kept": len(kept), "by": config.by,
                   "scorer": (config.scorer or ctx.model_path) if config.by == "scorer" else None,
                   "kept_ok_rate": round(sum(ok) / len(ok), 4) if ok else None,
                   "all_ok_rate": round(sum(r.get("status") == "ok" for r in rows) / len(rows), 4)
                   if "status" in rows[0] else None}
        print(f"[rlkit] select: kept {len(kept)} of {len(rows)} rows in {path} (ok among kept "
              f"{summary['kept_ok_rate']}, among all {summary['all_ok_rate']})", flush=True)
        return StageOutput(model=None, datasets={DATASET: str(path)}, summary=summary)
