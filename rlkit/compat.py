"""Differences between the dependency versions rlkit supports, handled in this one module.

rlkit states a tested window for transformers, TRL, accelerate, PEFT, datasets and vLLM in ``pyproject.toml``
(see :mod:`rlkit.env`). Code elsewhere never compares versions; where two supported versions spell something
differently, it asks this module. What is here, and why:

- **The cache argument.** transformers 5.24 renamed ``past_key_values`` to ``cache`` in ``generate``, in every
  model's ``forward`` and in the arguments the decoder layers pass to their attention modules (the old name
  still works through a deprecation shim until 6.0, with a ``FutureWarning``; older versions know only
  ``past_key_values``). :data:`cache_kwarg` is the name the installed version takes, found once by reading
  the Llama model's ``forward`` signature (feature detection, not a version number); :func:`cache_from_call`
  reads a cache from an attention module's call under either name; :func:`output_cache` reads it from a model
  output.
- **Renamed trainer fields.** transformers 5.23 renamed ``TrainingArguments.gradient_checkpointing(_kwargs)`` to
  ``activation_checkpointing(_kwargs)`` (older versions have only the old name, newer ones warn on it). A
  recipe may use either spelling: :func:`trainer_field` gives the installed config class's name for it.
- **Deprecation warnings.** :func:`warning_culprit` finds the code that made a dependency warn (the first
  frame outside the warning package's own frames and pass-through machinery). The test suite fails a test
  when that code is rlkit's own (``tests/conftest.py``), so the next rename is fixed while both names work;
  :func:`hide_dependency_deprecations` keeps the deprecations that a dependency triggers on itself (TRL
  calling transformers' old names on every run) out of a user's terminal, and shows the rest.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["cache_kwarg", "cache_kwargs", "cache_from_call", "output_cache", "trainer_field", "warning_culprit",
           "is_own_frame", "record_own_deprecations", "hide_dependency_deprecations"]

_CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """``"cache"`` when the installed transformers takes the cache under that name, else ``"past_key_values"``."""
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)`` under the installed version's name."""
    return {cache_kwarg(): cache}


def cache_from_call(args: tuple, kwargs: dict, position: int = 3) -> Any:
    """The cache an attention module was called with, under either name (keyword) or at ``position``
    (``hidden_states, position_embeddings, attention_mask, cache`` in every supported version)."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[position] if len(args) > position else None


def output_cache(outputs: Any) -> Any:
    """The cache a model returned (``outputs.cache`` from 5.24 on, ``outputs.past_key_values`` before)."""
    fields = getattr(outputs, "__dataclass_fields__", {})
    for name in _CACHE_NAMES:
        if name in fields:
            return getattr(outputs, name)
    return None


# Trainer config fields renamed by transformers: old name -> new name.
RENAMED_TRAINER_FIELDS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def trainer_field(key: str, fields: Any) -> str:
    """The name under which the installed config class (whose field names are ``fields``) takes the recipe
    key ``key``: the new name when the class has it (so an old spelling raises no deprecation), the old one
    when only that exists; any other key unchanged."""
    new = RENAMED_TRAINER_FIELDS.get(key)
    if new is not None and new in fields:
        return new
    old = {v: k for k, v in RENAMED_TRAINER_FIELDS.items()}.get(key)
    if old is not None and key not in fields and old in fields:
        return old
    return key


# --------------------------------------------------------------------------------------------------
# Deprecation warnings: who caused them

_REPO = Path(__file__).resolve().parents[1]
_OWN_PACKAGES = ("rlkit", "rlkit_rewards")
# Frames a call passes through without being the caller that chose the arguments.
_PASS_THROUGH = ("warnings", "functools", "contextlib", "torch", "typing", "importlib", "abc")


def _package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".", 1)[0]


def is_own_frame(frame: FrameType) -> bool:
    """A frame of rlkit's own code: the ``rlkit`` / ``rlkit_rewards`` packages, or a file of this repository
    outside a virtual environment (tests, benches)."""
    if _package(frame) in _OWN_PACKAGES:
        return True
    filename = frame.f_code.co_filename
    if not os.path.isabs(filename):
        return False  # "<string>", "<frozen ...>": not a file of ours
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return _REPO in path.parents and not any(p.name.startswith(".venv") or p.name == "site-packages"
                                             for p in path.parents)


def warning_culprit(frame: FrameType | None) -> FrameType | None:
    """The frame whose call made a warning happen, given the frame that called ``warnings.warn`` (or one
    inside it): walk outward past the warning package's own frames (``transformers.utils.deprecation`` and
    the transformers function it wraps both count as transformers) and pass-through frames (``torch.nn``'s
    call machinery, ``functools``, ``contextlib``); the first other frame is the culprit."""
    while frame is not None and _package(frame) == "warnings":
        frame = frame.f_back
    if frame is None:
        return None
    origin = _package(frame)
    while frame is not None and (_package(frame) == origin or _package(frame) in _PASS_THROUGH):
        frame = frame.f_back
    return frame


def _forward(previous, message, category, filename, lineno, file=None, line=None) -> None:
    """Pass a warning on to what would have shown (or recorded) it without our hook."""
    if previous is getattr(warnings, "_showwarning_orig", None) and hasattr(warnings, "_showwarnmsg_impl"):
        # the default showwarning: go through the implementation (``catch_warnings(record=True)`` replaces it)
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
    else:
        previous(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def record_own_deprecations():
    """Within the block, collect (as one-line descriptions, in the yielded list) the ``FutureWarning`` and
    ``DeprecationWarning`` that rlkit's own code caused by calling a deprecated API; every warning is still
    shown or recorded as it would have been. The test suite fails a test whose list is not empty."""
    caught: list[str] = []
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (FutureWarning, DeprecationWarning)):
                culprit = warning_culprit(sys._getframe(1))
                if culprit is not None and is_own_frame(culprit):
                    where = f"{culprit.f_code.co_filename}:{culprit.f_lineno}"
                    caught.append(f"{category.__name__} from a call at {where}: {message}")
            _forward(previous, message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield caught


def hide_dependency_deprecations() -> None:
    """Show deprecation warnings only when the user's or rlkit's code caused them (idempotent).

    A ``FutureWarning`` / ``DeprecationWarning`` that a dependency raises about its own call into another
    dependency (TRL's configs and trainers calling transformers' renamed ``gradient_checkpointing`` names on
    every run) is dropped: nobody running rlkit can act on it. Every other warning is shown as usual.
    """
    if getattr(warnings.showwarning, "_rlkit_hides_dependency_deprecations", False):
        return
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            culprit = warning_culprit(sys._getframe(1))
            if culprit is not None and not is_own_frame(culprit) and _package(culprit) != "__main__" \
                    and ("site-packages" in culprit.f_code.co_filename
                         or "dist-packages" in culprit.f_code.co_filename):
                return
        _forward(shown, message, category, filename, lineno, file, line)

    showwarning._rlkit_hides_dependency_deprecations = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
