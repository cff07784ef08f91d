"""``method: distill_prepare``: the stage form of FIRST's teacher top-k preparation (:func:`.topk.prepare_topk`).

The stage's model is the teacher. For every row of ``data.train`` (prompt in the recipe's template; response: the
dataset's reference solution, a stage's ``completion``, or one the teacher generates with ``responses: generate``)
it stores the teacher's top-k next-token ids and log-probs per response token and chooses the temperature on
held-out rows. It writes the dataset ``topk`` (the ``topk.jsonl`` index; tensors and meta beside it) and hands on
the teacher (set the student's ``model:`` in the next stage). See ``docs/methods/first.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import register_method
from ..base import Method, StageOutput

DATASET = "topk"


@dataclass
class DistillPrepareConfig:
    """Settings of the ``distill_prepare`` stage (recipe section ``args:``)."""

    k: int = 5
    """Teacher tokens kept per position (released: 5)."""
    responses: Literal["dataset", "generate"] = "dataset"
    """dataset: the rows' own responses (reference solutions); generate: the teacher writes them."""
    heldout_fraction: float = 0.1
    """Rows kept aside (with their reference responses) to choose the temperature."""
    tau: str | float = "auto"
    """auto: chosen on the held-out rows; a number: recorded as is."""
    tau_criterion: Literal["ece", "nll"] = "ece"
    """What the chosen temperature minimises: the teacher's token-level ECE, or the NLL of the reference token."""
    use_other: bool = True
    """The bucket layout the summary reports the temperature of (both layouts are chosen and stored)."""
    ece_bins: int = 10
    """Equal-width confidence bins of the ECE."""
    max_length: int = 1024
    """Longest prompt + response in tokens (longer responses are cut)."""
    batch_size: int = 16
    """Sequences per teacher forward (and per generate call)."""
    max_new_tokens: int = 256
    """Longest generated response (responses: generate)."""
    do_sample: bool = False
    """Sample the generated responses (default greedy)."""
    temperature: float = 1.0
    """Sampling temperature of generated responses (with do_sample)."""

    def __post_init__(self):
        from .calibration import parse_tau

        parse_tau(self.tau)
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.ece_bins < 1 or self.max_length < 2 or self.batch_size < 1:
            raise ValueError("ece_bins and batch_size must be >= 1, max_length >= 2")


@register_method
class DistillPrepareMethod(Method):
    """``method: distill_prepare`` (module docstring)."""

    name = "distill_prepare"
    outputs = (DATASET,)
    config = DistillPrepareConfig

    def run(self, run, ctx) -> StageOutput:
        from ...data import build_dataset, is_stage_rows, load_selected_rows
        from .topk import prepare_topk

        config: DistillPrepareConfig = self.make_config(run)
        spec = run.data.train
        if is_stage_rows(spec):
            rows, _, _ = load_selected_rows(spec)
            rows = rows[: spec.limit] if spec.limit is not None else rows
        else:
            rows = build_dataset(spec, ctx.tokenizer).to_list()
        model_name = ctx.model_path or run.model.name
        summary = prepare_topk(ctx.model, ctx.tokenizer, rows, Path(run.output_dir), k=config.k,
                               responses=config.responses, heldout_fraction=config.heldout_fraction, tau=config.tau,
                               criterion=config.tau_criterion, use_other=config.use_other,
                               max_length=config.max_length, batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                               temperature=config.temperature, seed=run.seed, ece_bins=config.ece_bins,
                               teacher_name=model_name)
        print(f"[rlkit] distill_prepare: {summary['rows']} rows, {summary['tokens']} tokens, top-{config.k} "
              f"holds {summary['topk_mass']:.3f} of the mass; {summary['bytes_topk']} bytes = "
              f"{summary['bytes_ratio_fp32']:.4f} of fp32 logits; tau {summary['tau']}", flush=True)
        return StageOutput(model=model_name, datasets={DATASET: summary.pop("path")}, summary=summary)
