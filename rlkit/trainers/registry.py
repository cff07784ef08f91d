"""Method registry: lower-case method name -> how to validate and run it.

Trainer modules are imported lazily, so listing methods or validating a recipe never imports more
than the TRL config classes it needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import warnings
import typing
from dataclasses import dataclass
from typing import Any, Callable, get_args, get_origin

from ..compat import trainer_field
from ..recipe import RecipeError, _coerce

# name -> "module:attribute" of a Method object
_METHODS: dict[str, str] = {
    "grpo": "rlkit.trainers.grpo:METHOD",
    "sft": "rlkit.trainers.sft:METHOD",
    "stephint": "rlkit.trainers.stephint:METHOD",
    "pretrain": "rlkit.trainers.pretrain:METHOD",
}

# Trainer keys that the recipe's top level owns.
RESERVED_TRAINER_KEYS = {
    "output_dir": "set the top-level `output_dir` instead",
    "seed": "set the top-level `seed` instead",
}


def method_names() -> list[str]:
    return sorted(_METHODS)


def register_method(name: str, target: str) -> None:
    _METHODS[name] = target


@dataclass
class Method:
    """How one method is validated and run. ``config_class`` is a callable returning the TRL config
    class (imported lazily); ``run(run_spec, context)`` trains and returns the final model path."""

    name: str
    config_class: Callable[[], type]
    run: Callable[..., Any]
    check: Callable[[Any, str], None] | None = None

    def trainer_config(self, run, where: str = "trainer", device_checks: bool = True, **extra):
        """The TRL config for a run: recipe keys passed through, output_dir/seed from the recipe.

        ``device_checks=False`` (recipe validation) drops ``bf16``/``tf32`` requests the machine cannot
        honour before building the config, so a GPU recipe validates on a CPU-only machine; training
        builds the config with the checks on and fails there with TRL's message.
        """
        cls = self.config_class()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in run.trainer.items():
            if key in RESERVED_TRAINER_KEYS:
                raise RecipeError(f"{where}.{key}: {RESERVED_TRAINER_KEYS[key]}")
            if key == "resume_from_checkpoint":
                # handled by rlkit.pipeline: true / "latest" / a checkpoint folder
                if not isinstance(value, (bool, str)) and value is not None:
                    raise RecipeError(f"{where}.{key}: expected true, \"latest\" or a checkpoint folder, got {value!r}")
                continue
            key = trainer_field(key, fields)  # either spelling of a field transformers renamed
            if key not in fields:
                near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]!r}?" if near else f" ({cls.__name__} has no such field)"
                raise RecipeError(f"{where}: unknown key {key!r}{hint}")
            if _simple(hints.get(key)):
                value = _coerce(value, hints[key], f"{where}.{key}")
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
                warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
                return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{where}: {str(e).splitlines()[0]}") from None

    def validate(self, run, where: str = "trainer") -> None:
        self.trainer_config(run, where, device_checks=False)
        if self.check is not None:
            self.check(run, where)


_SIMPLE = (bool, int, float, str)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_ok() -> bool:
    import torch

    return _cuda() and torch.cuda.is_bf16_supported()


def _tf32_ok() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def _simple(tp: Any) -> bool:
    """Annotations we can type-check safely: bool/int/float/str, optionally ``| None``."""
    if tp in _SIMPLE:
        return True
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return len(args) == 1 and args[0] in _SIMPLE
    return False


def get_method(name: str, where: str = "method") -> Method:
    if name not in _METHODS:
        near = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RecipeError(f"{where}: unknown method {name!r}{hint} (available: {', '.join(method_names())})")
    module, attr = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
