"""``method: mathhay_build``: MathHay-style long-context math items (arXiv 2410.04698), built offline.

Generates ``n_items`` items per task type (template documents across the paper's 10 topics, a question, a solution
program and its exact answer) and assembles each into haystacks of the given ``lengths`` in the stage model's
tokenizer at the given ``placements``; writes ``items.jsonl`` (one row per item x length x placement) and
``meta.json``. A later stage or ``rlkit eval --benchmark mathhay:PATH`` reads the folder or the file
(:func:`rlkit.data.mathhay.load_mathhay`). Deterministic in the recipe's ``seed``. The generator is
:mod:`rlkit.data.mathhay`; choices are in ``docs/methods/mathhay.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.mathhay import (ALL_TASK_TYPES, DATASET, TASK_SHAPE, TASK_TYPES, MathHayError, build_mathhay,
                            placements_for)
from . import register_method
from .base import Method, StageOutput


@dataclass
class MathHayBuildConfig:
    """Settings of the ``mathhay_build`` stage (recipe section ``args:``)."""

    lengths: list[int] = field(default_factory=lambda: [32000, 64000, 128000])
    """Haystack lengths in the stage model's tokens, prompt included (paper: 32K, 64K, 128K)."""
    task_types: list[str] = field(default_factory=lambda: list(TASK_TYPES))
    """Task types (paper: sssd, 2ssd, 3ssd, ss2d, 2s2d, 3s2d, 3s3d; rlkit adds lookup, retrieval only)."""
    placements: list[str] | None = None
    """Where the relevant documents go: first, middle, last, p0..p10, first-middle, ... (None: the paper's
    defaults, middle / first-middle / first-middle-last by number of documents)."""
    n_items: int = 20
    """Items per task type (each is written once per length and placement)."""
    style: Literal["released", "short"] = "released"
    """Prompt style whose fixed parts the lengths count (``short`` for small models; evaluate with the same)."""
    noise_files: list[str] = field(default_factory=list)
    """Text files whose chunks are the noise documents instead of the templates (the relevant ones stay generated)."""

    def __post_init__(self):
        for t in self.task_types:
            if t not in TASK_SHAPE:
                raise ValueError(f"unknown task type {t!r}; use any of {', '.join(ALL_TASK_TYPES)}")
        if not self.task_types:
            raise ValueError("task_types is empty")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be token counts of at least 64, got {self.lengths}")
        if self.n_items < 1:
            raise ValueError(f"n_items must be at least 1, got {self.n_items}")
        if self.placements is not None:
            try:
                for t in self.task_types:
                    if not placements_for(t, self.placements):
                        raise ValueError(f"none of the placements {self.placements} fits task type {t!r} "
                                         f"({TASK_SHAPE[t][1]} documents)")
            except MathHayError as e:
                raise ValueError(str(e)) from None
        for f in self.noise_files:
            if not Path(f).is_file():
                raise ValueError(f"noise file {f} does not exist")


@register_method
class MathHayBuildMethod(Method):
    name = "mathhay_build"
    section = "args"
    loads_model = False
    outputs = (DATASET,)
    config = MathHayBuildConfig

    def loads(self, run) -> str:
        return "tokenizer"

    def run(self, run, ctx) -> StageOutput:
        config: MathHayBuildConfig = self.make_config(run)
        meta = build_mathhay(run.output_dir, ctx.tokenizer, config.lengths, config.placements, config.task_types,
                             config.n_items, run.seed, config.noise_files or None, progress=True, style=config.style)
        summary = {k: meta[k] for k in ("rows", "items", "lengths", "placements", "style", "noise_docs",
                                        "noise_tokens", "build_seconds")}
        summary["config"] = dataclasses.asdict(config)
        print(f"[rlkit] mathhay_build: {meta['rows']} rows ({meta['items']} items x lengths {meta['lengths']} x "
              f"placements) in {meta['path']} ({meta['build_seconds']} s)", flush=True)
        return StageOutput(model=ctx.model_path, datasets={DATASET: meta["path"]}, summary=summary)
