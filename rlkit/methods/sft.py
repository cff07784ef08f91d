"""Supervised fine-tuning on reference solutions with TRL's ``SFTTrainer`` (``method: sft``).

Used as the warm-up stage of pipelines (the quickstart SFTs a tiny model before GRPO). Rows are
prompt-completion pairs: the prompt in the recipe's template, the completion the dataset's reference
``solution`` (for chat prompts, as an assistant message). TRL's default completion-only loss applies,
so prompt tokens are not trained. ``model.lora`` trains a LoRA adapter (merged into the saved final model, as
for every trainer).
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from ..config import RecipeError
from . import register_method
from .aux_loss import AuxLossMixin
from .base import TrainerMethod


class RLKitSFTTrainer(AuxLossMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` plus the auxiliary losses of patched layers (MoE load balancing)."""


def sft_dataset(spec, tokenizer):
    from ..data import DataError, build_dataset

    ds = build_dataset(spec, tokenizer)
    if "solution" not in ds.column_names:
        raise DataError(f"sft needs reference solutions: dataset {spec.name!r} has no solution column "
                        "(set data.train.solution_column)")
    chat = isinstance(ds[0]["prompt"], list)
    ds = ds.map(lambda r: {"completion": [{"role": "assistant", "content": r["solution"]}] if chat else r["solution"]})
    return ds.select_columns(["prompt", "completion"])


@register_method
class SFTMethod(TrainerMethod):
    """``method: sft``: TRL's SFT on the data's reference solutions."""

    name = "sft"

    def config_class(self) -> type:
        return SFTConfig

    def check(self, run, config, where: str) -> None:
        from ..data import BENCHMARKS

        name = run.data.train.name
        if name in BENCHMARKS and BENCHMARKS[name].solution_column is None and not run.data.train.solution_column:
            raise RecipeError(f"data.train: {name} has no reference solutions, so it cannot be used for sft")

    def build_trainer(self, run, ctx, args):
        from ..models import peft_config

        return RLKitSFTTrainer(model=ctx.model, args=args, train_dataset=sft_dataset(run.data.train, ctx.tokenizer),
                               processing_class=ctx.tokenizer, callbacks=ctx.callbacks, peft_config=peft_config(run.model))
