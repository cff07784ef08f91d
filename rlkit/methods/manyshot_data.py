"""``method: manyshot_data``: many-shot in-context episodes (ICL-50 format) of the built-in local tasks.

The data side of DR-ICL (arXiv 2501.04070, :mod:`rlkit.methods.dricl`): each episode is one task's instruction
and 1..hundreds of demonstrations, packed into ``max_tokens`` tokens of the stage model's tokenizer and layout,
written to ``episodes.jsonl`` (:mod:`rlkit.data.manyshot` has the format, the tasks and the generator). A later
stage reads it as ``{from: <this stage>, dataset: episodes}``. Deterministic in the recipe's ``seed``. Choices are
in ``docs/methods/manyshot.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..data.manyshot import DATASET, EpisodeError, generate_episodes, resolve_tasks, write_episodes
from . import register_method
from .base import Method, StageOutput


@dataclass
class ManyShotDataConfig:
    """Settings of the ``manyshot_data`` stage (recipe section ``args:``)."""

    tasks: str = "train"
    """Tasks: ``train`` / ``heldout`` / ``all`` (the built-in splits) or a comma-separated list of task names."""
    num_episodes: int = 256
    """Episodes written (task ``i mod #tasks`` for episode ``i``)."""
    min_shots: int = 1
    """Fewest demonstrations per episode."""
    max_shots: int = 200
    """Most demonstrations requested per episode (fewer when ``max_tokens`` is reached)."""
    max_tokens: int = 2048
    """Token budget of an episode, in the stage model's tokenizer and layout."""
    distribution: Literal["log_uniform", "uniform"] = "log_uniform"
    """How the requested shot count is drawn from [min_shots, max_shots]."""

    def __post_init__(self):
        if self.min_shots < 1 or self.max_shots < self.min_shots:
            raise ValueError(f"need 1 <= min_shots <= max_shots, got {self.min_shots} and {self.max_shots}")
        if self.num_episodes < 1:
            raise ValueError(f"num_episodes must be at least 1, got {self.num_episodes}")
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {self.max_tokens}")
        try:
            resolve_tasks(self.tasks)
        except EpisodeError as e:
            raise ValueError(f"tasks: {e}") from None


@register_method
class ManyShotDataMethod(Method):
    name = "manyshot_data"
    section = "args"
    loads_model = False
    outputs = (DATASET,)
    config = ManyShotDataConfig

    def loads(self, run) -> str:
        return "tokenizer"

    def run(self, run, ctx) -> StageOutput:
        config: ManyShotDataConfig = self.make_config(run)
        rows = generate_episodes(config.tasks, ctx.tokenizer, config.num_episodes, config.min_shots,
                                 config.max_shots, config.max_tokens, run.seed, config.distribution)
        path = write_episodes(rows, Path(run.output_dir) / f"{DATASET}.jsonl")
        shots = sorted(r["shots"] for r in rows)
        summary = {"episodes": len(rows), "tasks": len({r["task"] for r in rows}), "shots_min": shots[0],
                   "shots_median": shots[len(shots) // 2], "shots_max": shots[-1],
                   "tokens_max": max(r["len"] for r in rows), "config": dataclasses.asdict(config)}
        print(f"[rlkit] manyshot_data: {len(rows)} episodes of {summary['tasks']} tasks ({shots[0]}-{shots[-1]} "
              f"shots, at most {summary['tokens_max']} tokens) in {path}", flush=True)
        return StageOutput(model=ctx.model_path, datasets={DATASET: str(path)}, summary=summary)
