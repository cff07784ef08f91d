"""Run a recipe: each stage (or the single run) loads its model, data and rewards, trains through its
method, and saves a final safetensors model that feeds the next stage.

- A stage whose final model exists (marker file ``final/.rlkit_done``) is skipped on restart.
- ``resume`` (``True``/``"latest"`` or a checkpoint path) continues a killed run from its last
  complete checkpoint in ``<output_dir>/checkpoint-*`` (one cut off mid-save, without
  ``trainer_state.json``, is skipped); with ``True`` and no checkpoint yet, the run starts fresh.
- When ``eval.enabled``, held-out greedy accuracy is measured before and after training (and every
  ``eval.every_steps`` steps), printed, written to ``<output_dir>/summary.json`` and plotted with the
  training reward to ``<output_dir>/training.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError, RunSpec, resolve_runs

DONE_MARKER = ".rlkit_done"


@dataclass
class RunContext:
    """What a method's ``run`` function gets besides its RunSpec."""

    model: Any
    tokenizer: Any
    callbacks: list = field(default_factory=list)
    resume: Any = None
    trainer_class: Any = None
    trainer_kwargs: dict = field(default_factory=dict)
    final_dir: Path | None = None
    trainer: Any = None

    def save_final(self, trainer) -> str:
        """Save the trained model (merged LoRA if any) and tokenizer as safetensors, then mark done."""
        final = self.final_dir
        model = trainer.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if trainer.accelerator.is_main_process:
            final.mkdir(parents=True, exist_ok=True)
            trainer.accelerator.unwrap_model(model).save_pretrained(final, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
            (final / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        trainer.accelerator.wait_for_everyone()
        return str(final)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_distributed_env() -> None:
    """Make the ranks of a multi-process launch on a machine without GPUs train together.

    ``accelerate launch`` (torchrun underneath) sets ``WORLD_SIZE``/``LOCAL_RANK`` but, with no GPU and no
    ``ACCELERATE_USE_CPU``, transformers/accelerate then give every rank its own single-process run: each
    trains a separate copy and all of them write the same output folder. Here, in that situation only,
    ``ACCELERATE_USE_CPU=1`` is set so the ranks join one gloo process group (multi-CPU DDP). Call it before
    the first TRL config is built (``rlkit train`` does).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return
    if "ACCELERATE_USE_CPU" in os.environ:
        return
    import torch
    from accelerate.utils import is_hpu_available, is_mlu_available, is_npu_available, is_xpu_available

    if torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mlu_available() or is_hpu_available():
        return
    os.environ["ACCELERATE_USE_CPU"] = "1"
    _log(f"no GPU found: running the {os.environ['WORLD_SIZE']} ranks as multi-CPU DDP (gloo)")


def _to_local_accelerator(model) -> None:
    """Move a freshly loaded (CPU) model to this rank's GPU, if there is one."""
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))


def _log(msg: str) -> None:
    if _is_main():
        print(f"[rlkit] {msg}", flush=True)


def _resume_arg(resume: Any, output_dir: str):
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        last = last_complete_checkpoint(output_dir)
        if last is None:
            _log(f"no checkpoint in {output_dir} yet; starting fresh")
        else:
            _log(f"resuming from {last}")
        return last
    if not Path(str(resume)).is_dir():
        raise RecipeError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder")
    if not (Path(str(resume)) / "trainer_state.json").is_file():
        raise RecipeError(f"resume_from_checkpoint: {resume!r} has no trainer_state.json (an incomplete or "
                          "non-Trainer checkpoint); pass a complete checkpoint-N folder")
    _log(f"resuming from {resume}")
    return str(resume)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder with the highest N whose save finished, or None.

    Trainer writes ``trainer_state.json`` last, so a folder without it is a save that was cut off (the run
    was killed while saving); it is skipped rather than resumed from (``get_last_checkpoint`` would pick it).
    """
    import re

    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for d in out.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for step, d in sorted(found, reverse=True):
        if (d / "trainer_state.json").is_file():
            return str(d)
        _log(f"skipping incomplete checkpoint {d} (no trainer_state.json)")
    return None


def run_one(run: RunSpec, resume: Any = None, trainer_class: Any = None, trainer_kwargs: dict | None = None) -> dict:
    """Run one method; returns a summary dict (final model path, accuracies, wall time)."""
    from transformers import set_seed

    from .data import build_dataset
    from .eval import GenerationSettings, HeldOutAccuracyCallback, evaluate_rows
    from .eval.plot import plot_training
    from .models import load_model
    from .trainers import get_method
    from .trainers.grpo import RLKitGRPOTrainer

    t0 = time.time()
    method = get_method(run.method)
    resume = run.trainer.pop("resume_from_checkpoint", resume)
    set_seed(run.seed)
    model, tokenizer = load_model(run.model, seed=run.seed)
    ctx = RunContext(model=model, tokenizer=tokenizer, resume=_resume_arg(resume, run.output_dir),
                     trainer_class=trainer_class or RLKitGRPOTrainer, trainer_kwargs=dict(trainer_kwargs or {}),
                     final_dir=Path(run.output_dir) / "final")
    summary: dict[str, Any] = {"stage": run.name, "method": run.method}
    eval_rows = None
    settings = GenerationSettings(max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                  temperature=run.eval.temperature, kv_cache=run.kv_cache)
    if run.eval.enabled:
        if run.data.eval is None:
            raise RecipeError(f"{run.name}: eval.enabled needs a data.eval dataset")
        spec = dataclasses.replace(run.data.eval, limit=run.eval.limit or run.data.eval.limit)
        eval_rows = build_dataset(spec, tokenizer).to_list()
        if run.eval.before and ctx.resume is None:
            _to_local_accelerator(model)  # the trainer places it there anyway; don't generate on the CPU
            before, _ = evaluate_rows(model, tokenizer, eval_rows, settings, samples=run.eval.samples)
            summary["before"] = before
            _log(f"{run.name}: held-out accuracy before training: {before['pass@1']:.3f} (n={before['n']})")
        if run.eval.every_steps > 0:
            ctx.callbacks.append(HeldOutAccuracyCallback(eval_rows, tokenizer, run.eval.every_steps, settings))
    final = method.run(run, ctx)
    summary["final_model"] = final
    if eval_rows is not None:
        after, records = evaluate_rows(ctx.trainer.model, tokenizer, eval_rows, settings, samples=run.eval.samples)
        summary["after"] = after
        _log(f"{run.name}: held-out accuracy after training: {after['pass@1']:.3f} (n={after['n']})")
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if _is_main():
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        history = ctx.trainer.state.log_history if ctx.trainer is not None else []
        (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        if run.plot and any("reward" in h for h in history):
            summary["plot"] = str(plot_training(history, out / "training.png", title=f"{run.name} ({run.method})"))
            _log(f"{run.name}: plot saved to {summary['plot']}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_recipe(recipe: Recipe, resume: Any = None, **kwargs) -> list[dict]:
    """Run every stage in order, skipping stages that already finished; returns their summaries."""
    prepare_distributed_env()
    results = []
    previous: str | None = None
    runs = resolve_runs(recipe)
    for i, run in enumerate(runs):
        if previous is not None:
            # the previous stage's checkpoint records its patches; only patches this stage sets itself
            # (e.g. upcycling the dense model of the stage before into an MoE) are added on top
            own = recipe.stages[i].model.get("patches") if recipe.stages else None
            run.model = dataclasses.replace(run.model, name=previous, patches=list(own or []))
        final = Path(run.output_dir) / "final"
        if (final / DONE_MARKER).exists():
            _log(f"stage {run.name!r} already finished ({final}); skipping")
            previous = str(final)
            summary_file = Path(run.output_dir) / "summary.json"
            results.append(json.loads(summary_file.read_text()) if summary_file.exists() else {"stage": run.name})
            continue
        label = f"stage {i + 1}/{len(runs)} {run.name!r}" if len(runs) > 1 else "run"
        _log(f"{label}: method={run.method} model={run.model.name} output_dir={run.output_dir}")
        summary = run_one(run, resume=resume, **kwargs)
        previous = summary["final_model"]
        results.append(summary)
    return results
