"""Methods: one module (or package) per method, each a class registered with :func:`register_method`.

The contract (:mod:`rlkit.methods.base`): a config dataclass built from one recipe section, declarations of
what the pipeline prepares and what the method hands on, and ``run`` (trainer methods write only
``build_trainer``). Built-in methods are imported on first use, so listing names or validating a recipe
imports no more than the method it names. A method outside this package registers itself the same way and
is found once its module is imported (``rlkit.methods.load("pkg.module")`` or a plain import).
"""

from __future__ import annotations

import importlib

from ..config import RecipeError, nearest
from .base import DONE_MARKER, Method, RunContext, StageOutput, TrainerMethod, save_final, save_model

__all__ = ["DONE_MARKER", "Method", "RunContext", "StageOutput", "TrainerMethod", "get_method", "load",
           "method_names", "register_method", "save_final", "save_model"]

# built-in method name -> module that registers it (imported lazily)
_BUILTIN: dict[str, str] = {
    "grpo": "rlkit.methods.grpo",
    "sft": "rlkit.methods.sft",
    "stephint": "rlkit.methods.stephint.trainer",
    "pretrain": "rlkit.methods.pretrain",
    "sample": "rlkit.methods.sample",
    "pear": "rlkit.methods.pear",
    "dpo": "rlkit.methods.dpo",
    "oreo": "rlkit.methods.oreo.trainer",
    "prm": "rlkit.methods.prm.trainer",
    "prm_label": "rlkit.methods.prm.labels",
    "select": "rlkit.methods.select",
    "autocei": "rlkit.methods.autocei.method",
    "autocei_data": "rlkit.methods.autocei.data",
    "bolt_bootstrap": "rlkit.methods.bolt.stage",
    "bolt_sample": "rlkit.methods.bolt.stage",
    "fuse": "rlkit.methods.fuse",
    "dfc": "rlkit.methods.dfc",
    "game_demos": "rlkit.methods.game_demos",
    "distill_prepare": "rlkit.methods.first.stage",
    "first": "rlkit.methods.first.trainer",
    "kd": "rlkit.methods.first.trainer",
    "manyshot_data": "rlkit.methods.manyshot_data",
    "dricl": "rlkit.methods.dricl",
    "mathhay_build": "rlkit.methods.mathhay_build",
}
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be a lower-case identifier, got {name!r}")
    if cls.section not in ("trainer", "args"):
        raise ValueError(f"method {name!r}: section must be 'trainer' or 'args', got {cls.section!r}")
    if cls.rewards not in ("required", "optional", "none"):
        raise ValueError(f"method {name!r}: rewards must be 'required', 'optional' or 'none'")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__module__}")
    _METHODS[name] = cls
    return cls


def load(module: str) -> None:
    """Import a module that registers methods."""
    importlib.import_module(module)


def method_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_METHODS))


def get_method(name: str, where: str = "method") -> Method:
    """An instance of the method registered as ``name``; an unknown name fails naming the nearest one."""
    if name not in _METHODS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _METHODS:
        hint = nearest(str(name), method_names(), cutoff=0.6)
        hint = hint if hint.startswith("; did") else ""
        raise RecipeError(f"{where}: unknown method {name!r}{hint} (available: {', '.join(method_names())})")
    return _METHODS[name]()
