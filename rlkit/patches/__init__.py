"""Model patches: a registry and ``apply_patches(model, specs)``.

A patch is a function ``patch(model, **options)`` that mutates a loaded HF model in place. The list
of applied specs is recorded in ``model.config.rlkit_patches`` so that a saved checkpoint loads back
patched through ``rlkit.models.load_model``. With no patches the model is untouched.
Method modules register themselves here (``@register_patch("hope")``); the built-in ones are listed in
``_BUILTIN`` and imported on first use, so importing ``rlkit.patches`` stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

_PATCHES: dict[str, Callable[..., None]] = {}

# built-in patch name -> module that registers it (imported lazily by ``apply_patches``)
_BUILTIN: dict[str, str] = {
    "hope": "rlkit.patches.hope",
    "cog": "rlkit.patches.cog",
    "pear": "rlkit.patches.pear",
    "aoe": "rlkit.patches.moe",
    "moe": "rlkit.patches.moe",
}


def _load_builtin(name: str) -> None:
    module = _BUILTIN.get(name)
    if module is not None and name not in _PATCHES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def register_patch(name: str):
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        _PATCHES[name] = fn
        return fn

    return deco


def available_patches() -> list[str]:
    for name in _BUILTIN:
        _load_builtin(name)
    return sorted(_PATCHES)


def apply_patches(model: Any, specs: list[dict]) -> Any:
    """Apply each ``{"name": ..., **options}`` in order and record the list in the model config."""
    applied = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"patches[{i}] must be a mapping with a 'name', got {spec!r}")
        options = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
        _load_builtin(name)
        if name not in _PATCHES:
            near = difflib.get_close_matches(name, list(_PATCHES), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            have = ", ".join(available_patches()) or "none are installed in this version"
            raise ValueError(f"unknown patch {name!r}{hint} (available: {have})")
        _PATCHES[name](model, **options)
        applied.append(dict(spec))
    if applied:
        model.config.rlkit_patches = applied
    return model
