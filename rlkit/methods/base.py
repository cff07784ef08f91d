"""The method contract: what every method (TRL trainer or not) declares, and the tail they share.

A method is a class registered with :func:`rlkit.methods.register_method`. It declares

- ``name``: the lower-case name recipes use (``method: grpo``);
- its **config**: a dataclass (for trainers, the TRL config class, possibly extended; for other methods a
  plain dataclass) built from one recipe section: ``trainer:`` for methods that train (``section =
  "trainer"``), ``args:`` for the others. Unknown keys fail with the nearest valid one (:mod:`rlkit.config`);
- what the pipeline must prepare and what the method hands on: ``loads_model`` (the stage's model and
  tokenizer are loaded into :class:`RunContext`), ``rewards`` (``"required"``, ``"optional"`` or ``"none"``:
  the recipe's rewards are checked at validation time, before any model loads), ``trains`` (writes a new
  model: the recipe's held-out evaluation before/after applies to it and to no other stage, ``resume`` is
  honoured), ``outputs`` (names of the
  datasets it writes, which later stages refer to as ``{from: STAGE, dataset: NAME}``);
- ``check(run, config, where)``: recipe-time checks beyond the config's own;
- ``run(run, ctx) -> StageOutput``: do the work. :class:`TrainerMethod` implements it once for every
  ``transformers.Trainer``: a trainer method only writes ``build_trainer(run, ctx, args)``, and the shared
  tail (train with resume, save the final model as safetensors, close what the method opened, report the
  model to the pipeline) lives here.

The pipeline (:mod:`rlkit.pipeline`) knows no method by name: it loads what a method declares, calls ``run``,
and writes the returned :class:`StageOutput` as the stage's manifest. ``docs/adding-a-method.md`` walks
through adding one.
"""

from __future__ import annotations

import dataclasses
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..compat import trainer_field
from ..config import RecipeError, build, coerce, nearest, simple_type

DONE_MARKER = ".rlkit_done"

# Trainer keys that the recipe's top level owns.
RESERVED_TRAINER_KEYS = {
    "output_dir": "set the top-level `output_dir` instead",
    "seed": "set the top-level `seed` (or the stage's `seed`) instead",
}


@dataclass
class StageOutput:
    """What a finished method run hands to later stages (the pipeline writes it as ``manifest.json``)."""

    model: str | None = None
    """The model later stages start from: a saved folder, or (for methods that do not train) the model the
    stage used, so a chain of stages keeps its model."""
    datasets: dict[str, str] = field(default_factory=dict)
    """Dataset name -> file (jsonl) this stage wrote."""
    summary: dict = field(default_factory=dict)
    """Figures for the stage's ``summary.json``."""


@dataclass
class RunContext:
    """What a method's ``run`` gets besides its RunSpec (filled by the pipeline)."""

    model: Any = None
    tokenizer: Any = None
    callbacks: list = field(default_factory=list)
    resume: Any = None
    """A checkpoint folder to resume from, or None."""
    final_dir: Path | None = None
    trainer: Any = None
    """The trainer a trainer method built (the pipeline evaluates and logs through it)."""
    model_path: str | None = None
    """Where the stage's model came from (hub id, folder or built-in name)."""
    closers: list[Callable[[], None]] = field(default_factory=list)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the method's run ends, whether it finished or failed (reward engines, vLLM)."""
        self.closers.append(fn)

    def close(self) -> None:
        while self.closers:
            self.closers.pop()()


class Method:
    """Base class of every method (see the module docstring)."""

    name: ClassVar[str] = ""
    section: ClassVar[str] = "args"
    loads_model: ClassVar[bool] = True
    trains: ClassVar[bool] = False
    rewards: ClassVar[str] = "none"
    evaluates_policy: ClassVar[bool] = True
    """Whether the recipe's held-out accuracy evaluation applies to the model a training stage writes (False
    for reward models: a PRM is not a policy)."""
    outputs: ClassVar[tuple[str, ...]] = ()
    config: ClassVar[type | None] = None
    """The config dataclass; a method may instead override :meth:`config_class` to import it lazily."""

    def config_class(self) -> type:
        if self.config is None:
            raise NotImplementedError(f"method {self.name!r} declares no config class")
        return self.config

    def make_config(self, run: Any, where: str | None = None, device_checks: bool = True, **extra: Any) -> Any:
        """The method's config from the run's section (``run.trainer`` / ``run.args``) plus ``extra``."""
        where = where or self.section
        values = dict(getattr(run, self.section) or {})
        values.update(extra)
        return build(self.config_class(), values, where)

    def check(self, run: Any, config: Any, where: str) -> None:
        """Recipe-time checks beyond the config's own (none by default)."""

    def rewards_required(self, run: Any) -> bool:
        """Whether this run needs at least one recipe reward (default: ``rewards == "required"``)."""
        return self.rewards == "required"

    def loads(self, run: Any) -> str:
        """What the pipeline loads into the context for this run: ``"model"`` (model and tokenizer),
        ``"tokenizer"`` or ``"none"``. Default: from ``loads_model``."""
        return "model" if self.loads_model else "none"

    def validate(self, run: Any, where: str | None = None) -> Any:
        """Everything a recipe can get wrong for this method, before any model loads; returns the config."""
        where = where or self.section
        prefix = where[: -len(self.section)] if where.endswith(self.section) else ""
        other = "args" if self.section == "trainer" else "trainer"
        if other in getattr(run, "own_sections", (other,)) and getattr(run, other, None):
            kind = "trains: its settings go under `trainer:`" if self.section == "trainer" else \
                "is not a trainer: its settings go under `args:`"
            raise RecipeError(f"{prefix}{other}: method {self.name!r} {kind}")
        if self.rewards != "none":
            from ..rewarding import check_rewards

            check_rewards(run.rewards, prefix, required=self.rewards_required(run), method=self.name)
        config = self.make_config(run, where, device_checks=False)
        self.check(run, config, where)
        return config

    def run(self, run: Any, ctx: RunContext) -> StageOutput:
        raise NotImplementedError


class TrainerMethod(Method):
    """A method that trains with a ``transformers.Trainer`` (TRL's or its own): the config is the trainer's
    ``TrainingArguments`` subclass, built from the recipe's ``trainer:`` keys passed through unchanged."""

    section: ClassVar[str] = "trainer"
    trains: ClassVar[bool] = True

    def config_extra(self, run: Any) -> dict:
        """Config values the method adds on top of the recipe's (e.g. reward weights)."""
        return {}

    def make_config(self, run: Any, where: str | None = None, device_checks: bool = True, **extra: Any) -> Any:
        """The TRL config for a run: recipe keys passed through, output_dir/seed from the recipe.

        ``device_checks=False`` (recipe validation) drops ``bf16``/``tf32`` requests the machine cannot
        honour before building the config, so a GPU recipe validates on a CPU-only machine; training
        builds the config with the checks on and fails there with TRL's message."""
        where = where or "trainer"
        cls = self.config_class()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in {**run.trainer, **self.config_extra(run)}.items():
            if key in RESERVED_TRAINER_KEYS:
                raise RecipeError(f"{where}.{key}: {RESERVED_TRAINER_KEYS[key]}")
            if key == "resume_from_checkpoint":
                # handled by rlkit.pipeline: true / "latest" / a checkpoint folder
                if not isinstance(value, (bool, str)) and value is not None:
                    raise RecipeError(f"{where}.{key}: expected true, \"latest\" or a checkpoint folder, got {value!r}")
                continue
            key = trainer_field(key, fields)  # either spelling of a field transformers renamed
            if key not in fields:
                near = nearest(key, list(fields), cutoff=0.6)
                hint = near if near.startswith("; did") else f" ({cls.__name__} has no such field)"
                raise RecipeError(f"{where}: unknown key {key!r}{hint}")
            if simple_type(hints.get(key)) is not None:
                value = coerce(value, hints[key], f"{where}.{key}")
            kwargs[key] = value
        kwargs.setdefault("report_to", "none")
        if "dataloader_pin_memory" not in kwargs and not _cuda():
            kwargs["dataloader_pin_memory"] = False  # pinning needs an accelerator; avoids a warning per run
        if "bf16" in fields and "bf16" not in kwargs and not _bf16_ok():
            kwargs["bf16"] = False  # TRL defaults to bf16, which CPUs and old GPUs lack
        kwargs.update(extra)
        if not device_checks:
            if kwargs.get("bf16") and kwargs.get("fp16"):
                raise RecipeError(f"{where}: set at most one of bf16 and fp16")
            if not _bf16_ok():
                for key in ("bf16", "bf16_full_eval"):
                    if kwargs.get(key):
                        kwargs[key] = False
            if kwargs.get("tf32") and not _tf32_ok():
                kwargs["tf32"] = None
        kwargs["output_dir"] = run.output_dir
        kwargs["seed"] = run.seed
        try:
            with warnings.catch_warnings():
                # TRL's configs default to transformers' renamed gradient_checkpointing: not the user's doing
                warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
                return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{where}: {str(e).splitlines()[0]}") from None

    def build_trainer(self, run: Any, ctx: RunContext, args: Any) -> Any:
        """The trainer for this run (the one hook a trainer method writes)."""
        raise NotImplementedError

    def finish(self, trainer: Any, ctx: RunContext) -> StageOutput:
        """Save what the trained run hands on (default: the model in ``final/``); a method that trains more
        than one model (OREO's policy and critic) overrides this."""
        return StageOutput(model=save_final(trainer, ctx.tokenizer, ctx.final_dir))

    def run(self, run: Any, ctx: RunContext) -> StageOutput:
        try:
            args = self.make_config(run)
            trainer = self.build_trainer(run, ctx, args)
            ctx.trainer = trainer
            trainer.train(resume_from_checkpoint=ctx.resume)
            return self.finish(trainer, ctx)
        finally:
            ctx.close()


class LoggedMetricsMixin:
    """For a ``transformers.Trainer`` whose ``compute_loss`` appends figures to ``self._metrics[mode][name]``
    (mode ``train`` / ``eval``; set ``self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}``):
    ``log`` adds their means to every log line (``eval_``-prefixed in evaluation) and clears them, and
    ``prediction_step`` returns the loss only (the trainer's own batches have no labels for ``Trainer``)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()


class StageState:
    """The ``state.json`` of an orchestrating stage (``autocei``, ``dfc``) that runs its own sub-runs: read back
    when the folder holds one (a restarted stage continues from it), saved atomically; ``ran`` / ``skipped`` list
    the sub-runs run now and those found finished."""

    def __init__(self, output_dir: str | Path):
        import json

        self.out = Path(output_dir)
        self.state_path = self.out / "state.json"
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def claim_mode(self, mode: str) -> None:
        """Record ``mode`` in the state; a folder that holds a run of another mode is refused."""
        self.state.setdefault("mode", mode)
        if self.state["mode"] != mode:
            raise RecipeError(f"{self.out} holds a mode {self.state['mode']} run; use another output_dir for mode "
                              f"{mode}")

    def save(self) -> None:
        import json

        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)


def save_final(trainer: Any, tokenizer: Any, final: Path) -> str:
    """Save a trainer's model (merged LoRA if any) and tokenizer as safetensors in ``final``, then mark it done."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        final.mkdir(parents=True, exist_ok=True)
        trainer.accelerator.unwrap_model(model).save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        (final / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    trainer.accelerator.wait_for_everyone()
    return str(final)


def save_model(model: Any, tokenizer: Any, final: Path) -> str:
    """Save a model that no Trainer wrapped (single process) as safetensors in ``final`` and mark it done."""
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    (final / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return str(final)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_ok() -> bool:
    import torch

    return _cuda() and torch.cuda.is_bf16_supported()


def _tf32_ok() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()
