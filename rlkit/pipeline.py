"""Run a recipe: each stage (or the single run) gets what its method declares (model, tokenizer), runs, and
writes a manifest that later stages read. The pipeline knows no method by name.

- **Manifest.** A finished stage writes ``<output_dir>/manifest.json`` last: its method, the model later
  stages start from, the datasets it wrote (name -> file) and its seed/iteration. A stage with a manifest is
  skipped on restart (a finished iteration of a repeated block too); a training stage from before manifests
  existed counts as finished when ``final/.rlkit_done`` is there.
- **What passes between stages.** A stage's model is, in order: the one it names (``model.name``), the one
  of the stage it names (``model: {from: STAGE}``), else the model of the stage before it. A dataset section
  ``{from: STAGE, dataset: NAME}`` reads the file that stage's manifest lists under NAME (as ``jsonl:``). A
  ``trainer:`` / ``args:`` setting ``{from: STAGE}`` becomes the path of the model that stage produced.
- ``resume`` (``True``/``"latest"`` or a checkpoint path) continues a killed training run from its last
  complete checkpoint in ``<output_dir>/checkpoint-*`` (one cut off mid-save, without
  ``trainer_state.json``, is skipped); with ``True`` and no checkpoint yet, the run starts fresh.
- When ``eval.enabled``, held-out greedy accuracy is measured before and after a training stage (and every
  ``eval.every_steps`` steps), printed, written to ``<output_dir>/summary.json`` and plotted with the
  training reward to ``<output_dir>/training.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from .config import RecipeError
from .methods.base import DONE_MARKER, RunContext, StageOutput
from .recipe import Recipe, RunSpec, fill_model_references, resolve_reference, resolve_runs

MANIFEST = "manifest.json"

__all__ = ["DONE_MARKER", "MANIFEST", "RunContext", "StageOutput", "last_complete_checkpoint", "prepare_distributed_env",
           "read_manifest", "run_one", "run_recipe"]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(msg: str) -> None:
    if _is_main():
        print(f"[rlkit] {msg}", flush=True)


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
    if not _state_readable(Path(str(resume)) / "trainer_state.json"):
        raise RecipeError(f"resume_from_checkpoint: {resume!r} has no readable trainer_state.json (an incomplete or "
                          "non-Trainer checkpoint); pass a complete checkpoint-N folder")
    _log(f"resuming from {resume}")
    return str(resume)


def _state_readable(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder with the highest N whose save finished, or None.

    Trainer writes ``trainer_state.json`` last, so a folder without it, or with one that does not parse (the
    kill landed while that file was being written), is a save that was cut off; it is skipped rather than resumed
    from (``get_last_checkpoint`` would pick it).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for d in out.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for step, d in sorted(found, reverse=True):
        if _state_readable(d / "trainer_state.json"):
            return str(d)
        _log(f"skipping incomplete checkpoint {d} (trainer_state.json missing or cut off)")
    return None


# --------------------------------------------------------------------------------------------------
# Manifests


def read_manifest(output_dir: str | Path) -> dict | None:
    """The manifest of a finished stage, or None. A manifest whose own outputs (a model or dataset inside the
    stage's folder) are gone does not count. A training stage finished before manifests existed (its
    ``final/.rlkit_done`` marker is there) gets one made up from that folder."""
    out = Path(output_dir)
    f = out / MANIFEST
    if f.is_file():
        try:
            manifest = json.loads(f.read_text())
        except json.JSONDecodeError:
            _log(f"{f} is not valid JSON (a cut-off write?); running the stage again")
            return None
        # paths the stage wrote itself are stored relative to its folder (a run folder can be moved); they
        # must still be there (a deleted final/ folder means: train again)
        own = []
        if manifest.get("model") and not Path(manifest["model"]).is_absolute() and manifest.get("model_is_own"):
            manifest["model"] = str(out / manifest["model"])
            own.append(manifest["model"])
        datasets = {}
        for name, path in (manifest.get("datasets") or {}).items():
            datasets[name] = str(out / path) if not Path(path).is_absolute() else path
            own.append(datasets[name])
        manifest["datasets"] = datasets
        missing = [p for p in own if not Path(p).exists()]
        if missing:
            _log(f"{out}: the manifest lists {missing[0]}, which is gone; running the stage again")
            return None
        return manifest
    final = out / "final"
    if (final / DONE_MARKER).exists():
        return {"model": str(final), "datasets": {}}
    return None


def settings_fingerprint(run: RunSpec) -> str:
    """A short hash of what a stage was asked to do (method, its settings, data, rewards, seed; not the model
    it started from, which earlier stages decide), to tell a finished stage whose recipe has since changed."""
    import hashlib

    what = {"method": run.method, "trainer": run.trainer, "args": run.args, "data": dataclasses.asdict(run.data),
            "rewards": [dataclasses.asdict(r) for r in run.rewards], "seed": run.seed,
            "patches": run.model.patches}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _relative(path: str | None, out: Path) -> tuple[str | None, bool]:
    """``path`` relative to ``out`` when it lies inside it (and whether it does)."""
    if not path:
        return path, False
    p = Path(path)
    if p.exists() and p.resolve().is_relative_to(out.resolve()):
        return str(p.resolve().relative_to(out.resolve())), True
    return path, False


def _write_manifest(run: RunSpec, output: StageOutput, fingerprint: str | None = None) -> dict:
    """Write the stage's manifest (last, atomically); returns it with absolute paths for later stages."""
    out = Path(run.output_dir)
    model, own = _relative(output.model, out)
    stored = {"stage": run.stage, "name": run.name, "method": run.method, "iteration": run.iteration,
              "seed": run.seed, "model": model, "model_is_own": own,
              "datasets": {k: _relative(v, out)[0] for k, v in output.datasets.items()},
              "settings": fingerprint or settings_fingerprint(run), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(stored, indent=2) + "\n")
        tmp.replace(out / MANIFEST)
    return {**stored, "model": output.model, "datasets": dict(output.datasets)}


def _wire(run: RunSpec, done: list[tuple[RunSpec, dict]], own_patches: list | None) -> RunSpec:
    """``run`` with its references filled from the manifests of the stages before it."""
    earlier = [r for r, _ in done]
    manifests = {r.name: m for r, m in done}
    model = run.model
    if model.source is not None:
        src = resolve_reference(earlier, model.source, run.iteration)
        path = manifests[src.name].get("model")
        if not path:
            raise RecipeError(f"stages.{run.stage}.model.from: stage {src.name!r} produced no model")
        model = dataclasses.replace(model, name=path, patches=list(own_patches or []), source=None)
    elif not run.model_named:
        previous = next((m.get("model") for _, m in reversed(done) if m.get("model")), None)
        if previous is not None:
            # the previous stage's checkpoint records its patches; only patches this stage sets itself
            # (e.g. upcycling the dense model of the stage before into an MoE) are added on top
            model = dataclasses.replace(model, name=previous, patches=list(own_patches or []))
    data = run.data
    for part in ("train", "eval"):
        spec = getattr(data, part)
        if spec is None or spec.source is None:
            continue
        src = resolve_reference(earlier, spec.source, run.iteration)
        files = manifests[src.name].get("datasets") or {}
        key = spec.dataset or (next(iter(files)) if len(files) == 1 else None)
        if key not in files:
            raise RecipeError(f"stages.{run.stage}.data.{part}: stage {src.name!r} wrote "
                              f"{', '.join(files) or 'no dataset'}, not {spec.dataset!r}")
        spec = dataclasses.replace(spec, name=f"jsonl:{files[key]}", source=None, dataset=None)
        data = dataclasses.replace(data, **{part: spec})

    def model_of(stage: str) -> str:  # a `key: {from: STAGE}` setting of trainer/args
        path = manifests[resolve_reference(earlier, stage, run.iteration).name].get("model")
        if not path:
            raise RecipeError(f"stages.{run.stage}: {{from: {stage}}}: stage {stage!r} produced no model")
        return path

    return fill_model_references(dataclasses.replace(run, model=model, data=data), model_of)


# --------------------------------------------------------------------------------------------------
# Running


def run_one(run: RunSpec, resume: Any = None, fingerprint: str | None = None) -> dict:
    """Run one stage through its method; returns its summary (model, datasets, accuracies, wall time) and
    writes its manifest."""
    from transformers import set_seed

    from .data import build_dataset
    from .eval import GenerationSettings, HeldOutAccuracyCallback, evaluate_rows
    from .eval.plot import plot_training
    from .methods import get_method
    from .models import load_model

    t0 = time.time()
    method = get_method(run.method)
    trainer_keys = dict(run.trainer)
    resume = trainer_keys.pop("resume_from_checkpoint", resume) if method.section == "trainer" else resume
    run = dataclasses.replace(run, trainer=trainer_keys)
    set_seed(run.seed)
    ctx = RunContext(resume=_resume_arg(resume, run.output_dir) if method.trains else None,
                     final_dir=Path(run.output_dir) / "final", model_path=run.model.name)
    loads = method.loads(run)
    if loads == "model":
        ctx.model, ctx.tokenizer = load_model(run.model, seed=run.seed)
    elif loads == "tokenizer":
        from .models import load_tokenizer

        ctx.tokenizer = load_tokenizer(run.model)
    summary: dict[str, Any] = {"stage": run.name, "method": run.method, "model": run.model.name,
                               "data": {"train": run.data.train.name}}
    eval_rows = None
    evaluate = method.trains and method.evaluates_policy and run.eval.enabled and ctx.model is not None
    settings = GenerationSettings(max_new_tokens=run.eval.max_new_tokens, batch_size=run.eval.batch_size,
                                  temperature=run.eval.temperature, kv_cache=run.kv_cache)
    if evaluate:
        if run.data.eval is None:
            raise RecipeError(f"{run.name}: eval.enabled needs a data.eval dataset")
        spec = dataclasses.replace(run.data.eval, limit=run.eval.limit or run.data.eval.limit)
        eval_rows = build_dataset(spec, ctx.tokenizer).to_list()
        if run.eval.before and ctx.resume is None:
            _to_local_accelerator(ctx.model)  # the trainer places it there anyway; don't generate on the CPU
            before, _ = evaluate_rows(ctx.model, ctx.tokenizer, eval_rows, settings, samples=run.eval.samples)
            summary["before"] = before
            _log(f"{run.name}: held-out accuracy before training: {before['pass@1']:.3f} (n={before['n']})")
        if run.eval.every_steps > 0:
            ctx.callbacks.append(HeldOutAccuracyCallback(eval_rows, ctx.tokenizer, run.eval.every_steps, settings))
    try:
        output = method.run(run, ctx)
    finally:
        ctx.close()
    summary["final_model"] = output.model
    if output.datasets:
        summary["datasets"] = dict(output.datasets)
    summary.update(output.summary)
    if eval_rows is not None:
        model = ctx.trainer.model if ctx.trainer is not None else ctx.model
        after, _ = evaluate_rows(model, ctx.tokenizer, eval_rows, settings, samples=run.eval.samples)
        summary["after"] = after
        _log(f"{run.name}: held-out accuracy after training: {after['pass@1']:.3f} (n={after['n']})")
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if _is_main():
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        history = ctx.trainer.state.log_history if ctx.trainer is not None else []
        if ctx.trainer is not None:
            (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        if run.plot and any("reward" in h for h in history):
            summary["plot"] = str(plot_training(history, out / "training.png", title=f"{run.name} ({run.method})"))
            _log(f"{run.name}: plot saved to {summary['plot']}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["manifest"] = _write_manifest(run, output, fingerprint)
    return summary


def run_recipe(recipe: Recipe, resume: Any = None) -> list[dict]:
    """Run every stage in order, skipping stages that already finished; returns their summaries."""
    prepare_distributed_env()
    results = []
    done: list[tuple[RunSpec, dict]] = []
    runs = resolve_runs(recipe)
    own = {st.name: st.model.get("patches") for st in recipe.stages}
    for i, run in enumerate(runs):
        manifest = read_manifest(run.output_dir)
        if manifest is not None:
            _log(f"stage {run.name!r} already finished ({run.output_dir}); skipping")
            if manifest.get("settings") not in (None, settings_fingerprint(run)):
                _log(f"note: {run.name!r} finished with other settings than the recipe now gives; its results "
                     f"are kept (delete {run.output_dir} to run it again)")
            done.append((run, manifest))
            summary_file = Path(run.output_dir) / "summary.json"
            results.append(json.loads(summary_file.read_text()) if summary_file.exists() else {"stage": run.name})
            continue
        fingerprint = settings_fingerprint(run)
        if recipe.stages:
            run = _wire(run, done, own.get(run.stage) or _block_patches(recipe, run.stage))
        label = f"stage {i + 1}/{len(runs)} {run.name!r}" if len(runs) > 1 else "run"
        _log(f"{label}: method={run.method} model={run.model.name} output_dir={run.output_dir}")
        summary = run_one(run, resume=resume, fingerprint=fingerprint)
        manifest = summary.pop("manifest", None) or {"model": summary.get("final_model"),
                                                      "datasets": summary.get("datasets") or {}}
        done.append((run, manifest))
        results.append(summary)
    return results


def _block_patches(recipe: Recipe, stage: str) -> list | None:
    """The patches a stage inside a repeated block sets itself."""
    for st in recipe.stages:
        for inner in st.stages or []:
            if isinstance(inner, dict) and inner.get("name") == stage:
                return (inner.get("model") or {}).get("patches")
    return None
