"""Supervised fine-tuning on reference solutions with TRL's ``SFTTrainer`` (``method: sft``).

Used as the warm-up stage of pipelines (the quickstart SFTs a tiny model before GRPO). Rows are
prompt-completion pairs: the prompt in the recipe's template, the completion the dataset's reference
``solution`` (for chat prompts, as an assistant message). TRL's default completion-only loss applies,
so prompt tokens are not trained.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from ..recipe import RecipeError
from .aux import AuxLossMixin
from .registry import Method


class RLKitSFTTrainer(AuxLossMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` plus the auxiliary losses of patched layers (MoE load balancing)."""


def _check(run, where: str) -> None:
    from ..data import BENCHMARKS

    name = run.data.train.name
    if name in BENCHMARKS and BENCHMARKS[name].solution_column is None and not run.data.train.solution_column:
        raise RecipeError(f"data.train: {name} has no reference solutions, so it cannot be used for sft")


def sft_dataset(spec, tokenizer):
    from ..data import DataError, build_dataset

    ds = build_dataset(spec, tokenizer)
    if "solution" not in ds.column_names:
        raise DataError(f"sft needs reference solutions: dataset {spec.name!r} has no solution column "
                        "(set data.train.solution_column)")
    chat = isinstance(ds[0]["prompt"], list)
    ds = ds.map(lambda r: {"completion": [{"role": "assistant", "content": r["solution"]}] if chat else r["solution"]})
    return ds.select_columns(["prompt", "completion"])


def run_sft(run, ctx) -> str:
    args = METHOD.trainer_config(run)
    trainer = RLKitSFTTrainer(
        model=ctx.model, args=args, train_dataset=sft_dataset(run.data.train, ctx.tokenizer),
        processing_class=ctx.tokenizer, callbacks=ctx.callbacks,
    )
    ctx.trainer = trainer
    trainer.train(resume_from_checkpoint=ctx.resume)
    return ctx.save_final(trainer)


METHOD = Method(name="sft", config_class=lambda: SFTConfig, run=run_sft, check=_check)
