"""Parameter fusion (weighted averaging of models of one architecture) and ``method: fuse``.

Divide-Fuse-Conquer (arXiv 2505.16401; ``docs/methods/dfc.md``) fuses the model trained so far with a new group
specialist by a plain average of their parameters, theta_k = 1/2 (theta_{k-1} + theta_group). This module holds
the fusion every caller shares:

- :func:`fuse_state_dicts`: ``sum_i w_i * sd_i`` key by key, the weights summing to 1, accumulated in float32
  (float64 tensors in float64) and cast back to each tensor's dtype; keys and shapes must match, and non-float
  tensors (integer buffers) must be equal across the models;
- :func:`fuse_models`: the same over saved models, loaded one at a time into one running accumulator (a
  folder holding a PEFT LoRA adapter is loaded onto its base model and merged first), saved as safetensors with
  the tokenizer and the done marker;
- ``method: fuse``: a stage that fuses ``args.models`` (paths, hub ids or ``{from: STAGE}``) with ``args.weights``
  (default equal) into ``<output_dir>/final``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RecipeError
from . import register_method
from .base import DONE_MARKER, Method, StageOutput

WEIGHT_TOL = 1e-6


def check_weights(weights: list[float], n: int) -> list[float]:
    """``weights`` as floats: one per model, each finite and >= 0, summing to 1 within 1e-6."""
    weights = [float(w) for w in weights]
    if n < 1:
        raise ValueError("fusion needs at least one model")
    if len(weights) != n:
        raise ValueError(f"fusion got {n} models but {len(weights)} weights; give one weight per model")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"fusion weights must be finite and >= 0, got {weights}")
    if abs(sum(weights) - 1.0) > WEIGHT_TOL:
        raise ValueError(f"fusion weights must sum to 1 (within {WEIGHT_TOL}), got {weights} (sum {sum(weights)!r})")
    return weights


class StateDictAccumulator:
    """A running weighted sum of state dicts: ``add`` one at a time, ``result`` at the end.

    Floating-point tensors are summed in float32 (float64 in float64) and cast back to the dtype the first state
    dict had for that key; other tensors (integer / bool buffers) must be equal in every state dict and are kept
    as they are. Keys and shapes must be the same in every state dict; the first difference raises one
    ``ValueError`` naming the key."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.dtypes: dict[str, Any] = {}
        self.keys: list[str] = []
        self.count = 0

    def add(self, state_dict: dict, weight: float) -> None:
        import torch

        k = self.count
        if k == 0:
            self.keys = list(state_dict)
        else:
            _check_same_keys(self.keys, state_dict, k)
        for key in self.keys:
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state dict {k}: {key!r} is not a tensor ({type(t).__name__})")
            if k == 0:
                self.dtypes[key] = t.dtype
                if t.is_floating_point():
                    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
                    self.sums[key] = t.detach().to(device="cpu", dtype=acc) * weight
                else:
                    self.sums[key] = t.detach().to("cpu").clone()
                continue
            ref = self.sums[key]
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"state dict {k}: {key!r} has shape {tuple(t.shape)}, state dict 0 has "
                                 f"{tuple(ref.shape)}: fusion needs models of one architecture")
            if t.is_floating_point() != self.dtypes[key].is_floating_point:
                raise ValueError(f"state dict {k}: {key!r} is {t.dtype}, state dict 0 has {self.dtypes[key]}")
            if t.is_floating_point():
                ref.add_(t.detach().to(device="cpu", dtype=ref.dtype), alpha=weight)
            elif not torch.equal(t.detach().to("cpu"), ref):
                raise ValueError(f"state dict {k}: the non-float tensor {key!r} ({t.dtype}) differs from state "
                                 "dict 0's; integer buffers cannot be averaged, so they must be equal")
        self.count += 1

    def result(self) -> dict:
        """The weighted sum, each tensor in its original dtype (key order of the first state dict)."""
        if not self.count:
            raise ValueError("fusion needs at least one model")
        return {key: self.sums[key].to(self.dtypes[key]) for key in self.keys}


def _check_same_keys(keys: list[str], state_dict: dict, k: int) -> None:
    if len(keys) == len(state_dict) and all(key in state_dict for key in keys):
        return
    for key in keys:
        if key not in state_dict:
            raise ValueError(f"state dict {k} has no {key!r}, which state dict 0 has: fusion needs models of one "
                             "architecture")
    known = set(keys)
    extra = next(key for key in state_dict if key not in known)
    raise ValueError(f"state dict {k} has {extra!r}, which state dict 0 lacks: fusion needs models of one "
                     "architecture")


def fuse_state_dicts(state_dicts: list[dict], weights: list[float]) -> dict:
    """``sum_i weights[i] * state_dicts[i]`` key by key (see :class:`StateDictAccumulator`); the weights must sum to
    1 within 1e-6 (they are not normalised)."""
    weights = check_weights(weights, len(state_dicts))
    acc = StateDictAccumulator()
    for sd, w in zip(state_dicts, weights):
        acc.add(sd, w)
    return acc.result()


# --------------------------------------------------------------------------------------------------
# Saved models


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def _resolve(path: str) -> str:
    from ..models import BUILTIN_MODELS, builtin_path

    if path == "tiny":
        raise ValueError("fusion loads saved models; 'tiny' is built from a config, not a saved folder (save it "
                         "first, or fuse the folders of runs that started from it)")
    return str(builtin_path(path)) if path in BUILTIN_MODELS else path


def load_for_fusion(path: str):
    """A causal LM from ``path`` in its saved dtype on the CPU; a PEFT adapter folder is loaded onto its base model
    and merged (``merge_and_unload``)."""
    from transformers import AutoModelForCausalLM

    path = _resolve(path)
    try:
        if is_adapter(path):
            from peft import PeftModel

            base_name = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base_name:
                raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path to merge into")
            base = AutoModelForCausalLM.from_pretrained(_resolve(base_name), dtype="auto")
            return PeftModel.from_pretrained(base, path).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except OSError as e:
        raise ValueError(f"fusion could not load {path!r}: {str(e).splitlines()[0]}") from None


def _tokenizer_source(path: str) -> str:
    path = _resolve(path)
    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")) and is_adapter(p):
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return _resolve(base) if base else path
    return path


def fuse_models(paths: list[str], weights: list[float], out_dir: str | Path, tokenizer_from: str | None = None) -> str:
    """Fuse the saved models at ``paths`` with ``weights`` (summing to 1) into ``out_dir``; returns its path.

    Models are loaded one at a time (only one model and one float32 accumulator are in memory at once); the last
    one loaded carries the fused weights into ``save_pretrained`` (safetensors). The tokenizer comes from
    ``tokenizer_from`` (default: the first model, or its adapter's base). The done marker is written last."""
    from transformers import AutoTokenizer

    paths = [str(p) for p in paths]
    weights = check_weights(weights, len(paths))
    out = Path(out_dir)
    (out / DONE_MARKER).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(tokenizer_from or paths[0]))
    acc = StateDictAccumulator()
    model = None
    for i, (path, w) in enumerate(zip(paths, weights)):
        model = None  # free the previous model before loading the next
        model = load_for_fusion(path)
        try:
            acc.add(model.state_dict(), w)
        except ValueError as e:
            raise ValueError(f"fusing {paths[0]} and {path}: {e}".replace("state dict 0", "model 0")
                             .replace(f"state dict {i}", f"model {i}")) from None
    fused = acc.result()
    acc = None
    model.load_state_dict(fused, strict=True)
    fused = None
    from .base import save_model

    return save_model(model, tokenizer, out)


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class FuseConfig:
    """Settings of the ``fuse`` stage (recipe section ``args:``)."""

    models: list[str | dict] = field(default_factory=list)
    """The models to fuse: saved folders (full models or LoRA adapters), hub ids, or ``{from: STAGE}`` (the model
    an earlier stage produced)."""
    weights: list[float] | None = None
    """One weight per model, summing to 1 (None: equal weights; DFC's theta_k = 1/2 (theta_{k-1} + theta_group)
    is ``[0.5, 0.5]``)."""
    tokenizer_from: str | None = None
    """Where the saved tokenizer comes from (None: the first model)."""

    def __post_init__(self):
        if len(self.models) < 2:
            raise ValueError(f"models: fusion needs at least two models, got {len(self.models)}")
        for i, m in enumerate(self.models):
            if isinstance(m, dict) and not (set(m) == {"from"} and isinstance(m["from"], str)):
                raise ValueError(f"models[{i}]: expected a path or {{from: STAGE}}, got {m!r}")
        if self.weights is not None:
            check_weights(self.weights, len(self.models))

    @property
    def resolved_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0 / len(self.models)] * len(self.models)


@register_method
class FuseMethod(Method):
    """``method: fuse``: average saved models' parameters (module docstring)."""

    name = "fuse"
    section = "args"
    loads_model = False
    config = FuseConfig

    def check(self, run, config: FuseConfig, where: str) -> None:
        for i, m in enumerate(config.models):
            if m == "tiny":
                raise RecipeError(f"{where}.models[{i}]: 'tiny' is built from a config, not a saved model")

    def run(self, run, ctx) -> StageOutput:
        config: FuseConfig = self.make_config(run)
        self.check(run, config, "args")
        weights = config.resolved_weights
        path = fuse_models(config.models, weights, Path(run.output_dir) / "final", config.tokenizer_from)
        print(f"[rlkit] fuse: {len(config.models)} models with weights {weights} -> {path}", flush=True)
        return StageOutput(model=path, summary={"fused": list(config.models), "weights": weights})
