"""Model patches: a registry and ``apply_patches(model, specs)``.

A patch is a function ``patch(model, **options)`` that mutates a loaded HF model in place. The list
of applied specs is recorded in ``model.config.rlkit_patches`` so that a saved checkpoint loads back
patched through ``rlkit.models.load_model``. With no patches the model is untouched.
Patch modules register themselves here (``@register_patch("hope", options=HopeOptions)``); the built-in ones
are listed in ``_BUILTIN`` and imported on first use, so importing ``rlkit.patches`` stays cheap. Options are
typed (:mod:`.options`): :func:`check_patches` validates a recipe's patch list before any model loads, with
nearest-key errors, and :func:`apply_patches` passes the validated options on.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable

_PATCHES: dict[str, Callable[..., None]] = {}
_OPTIONS: dict[str, type] = {}

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


def register_patch(name: str, options: type | None = None):
    """Register ``patch(model, **options)`` under ``name``; ``options`` is the dataclass of its options (the
    built-in patches' are in :mod:`.options` and need not be passed)."""
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        _PATCHES[name] = fn
        if options is not None:
            _OPTIONS[name] = options
        return fn

    return deco


def _options_class(name: str) -> type | None:
    from .options import BUILTIN_OPTIONS

    return _OPTIONS.get(name) or BUILTIN_OPTIONS.get(name)


def check_patches(specs: Any, where: str = "model.patches") -> list[dict]:
    """Validate a list of patch specs (names and typed options) without a model; returns the options of each
    spec as a dict (defaults filled in). Raises ``rlkit.config.ConfigError`` with one line."""
    from ..config import ConfigError, build, nearest

    if not isinstance(specs, list):
        raise ConfigError(f"{where}: expected a list of patches like [{{name: hope, train_length: 4096}}]")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}[{i}]: must be a mapping with a 'name', got {spec!r}")
        name = spec["name"]
        known = sorted(set(_BUILTIN) | set(_PATCHES))
        if name not in known:
            hint = nearest(str(name), known, cutoff=0.6)
            raise ConfigError(f"{where}[{i}].name: unknown patch {name!r}{hint if hint.startswith('; did') else ''} "
                              f"(available: {', '.join(known)})")
        options = {k: v for k, v in spec.items() if k != "name"}
        cls = _options_class(name)
        if cls is None:
            out.append(options)
            continue
        built = build(cls, options, f"{where}[{i}]({name})")
        out.append({f.name: getattr(built, f.name) for f in dataclasses.fields(cls)})
    return out


def available_patches() -> list[str]:
    for name in _BUILTIN:
        _load_builtin(name)
    return sorted(_PATCHES)


def apply_patches(model: Any, specs: list[dict], weights_from: str | None = None, append: bool = False) -> Any:
    """Apply each ``{"name": ..., **options}`` in order and record the list in the model config.

    Patches that add parameters (the MoE layers) initialise them; with ``weights_from`` (the checkpoint the
    model was loaded from, a folder or hub id) the new parameters are then read from that checkpoint's
    safetensors when it holds them, which is how a saved patched model loads back (``rlkit.models``).
    With ``append`` the specs are added to the list already recorded in the config (patches applied on
    top of a patched checkpoint) instead of replacing it."""
    before = set(model.state_dict())
    applied = []
    typed = check_patches(list(specs), "patches")
    for i, spec in enumerate(specs):
        options = typed[i]
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
        model.config.rlkit_patches = (list(getattr(model.config, "rlkit_patches", None) or []) if append else []) + applied
        model.__dict__.pop("_rlkit_aux_modules", None)
    created = [k for k in model.state_dict() if k not in before]
    if created and weights_from is not None and load_patch_weights(model, weights_from, created):
        print(f"[rlkit] re-applied patches {[p['name'] for p in specs]} and loaded their {len(created)} parameter "
              f"tensors from {weights_from} (transformers' load report lists them as UNEXPECTED and the weights "
              "they replace as MISSING: that is expected)", flush=True)
    return model


def _shards(index_file: str) -> list[str]:
    import json
    from pathlib import Path

    return sorted(set(json.loads(Path(index_file).read_text())["weight_map"].values()))


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder or hub id (sharded or not); [] when there are none."""
    import os

    from transformers.utils import cached_file

    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            return [os.path.join(path, f) for f in _shards(index)]
        return [single] if os.path.isfile(single) else []
    for name in ("model.safetensors.index.json", "model.safetensors"):
        f = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
        if f is None:
            continue
        if name.endswith(".json"):
            return [cached_file(path, s) for s in _shards(f)]
        return [f]
    return []


def load_patch_weights(model: Any, path: str, names: list[str]) -> int:
    """Copy the tensors ``names`` (state-dict keys created by patches) from the checkpoint at ``path`` into
    ``model``; returns how many were found. Keys the checkpoint lacks keep their fresh initialisation (a
    dense checkpoint being patched for the first time); a checkpoint holding only some of them is an error,
    since it was saved with different patch options."""
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, Any] = {}
    for f in _checkpoint_files(path):
        with safe_open(f, framework="pt") as fh:
            for key in wanted.intersection(fh.keys()):
                found[key] = fh.get_tensor(key)
    if found and len(found) != len(wanted):
        missing = sorted(wanted - set(found))
        raise ValueError(f"checkpoint {path!r} holds only some of the patched parameters (missing e.g. "
                         f"{missing[:3]}); were its patches saved with other options?")
    if found:
        state = model.state_dict()
        for key, value in found.items():
            if state[key].shape != value.shape:
                raise ValueError(f"checkpoint {path!r}: {key} has shape {tuple(value.shape)}, the patched model "
                                 f"expects {tuple(state[key].shape)} (different patch options?)")
        model.load_state_dict(found, strict=False)
    return len(found)


def auxiliary_modules(model: Any) -> list:
    """Modules that expose an auxiliary training loss (``aux_loss`` + ``aux_loss_coef``, e.g. the MoE
    layers of ``rlkit.patches.moe``). The list is cached on the model, so calling this every step is cheap."""
    cached = model.__dict__.get("_rlkit_aux_modules")
    if cached is None:
        cached = [m for m in model.modules() if hasattr(m, "aux_loss") and hasattr(m, "aux_loss_coef")]
        model.__dict__["_rlkit_aux_modules"] = cached
    return cached


def auxiliary_loss(model: Any) -> tuple[Any, float | None]:
    """``(weighted, raw_mean)`` over the auxiliary-loss modules after the model's last forward pass.

    ``weighted`` is ``sum(coef * aux_loss)`` over modules with ``coef > 0`` (a tensor, carrying the gradient
    when the forward did; with layers on several devices it lives on the first one's device; None when no
    module adds a loss or none has run). ``raw_mean`` is the un-weighted mean of every module's loss, for
    logging (None when there is no such module or none has run); it costs one device sync."""
    weighted, raws = None, []
    for m in auxiliary_modules(model):
        aux = m.aux_loss
        if aux is None:
            continue
        raws.append(aux.detach())
        if m.aux_loss_coef > 0:
            term = m.aux_loss_coef * aux
            weighted = term if weighted is None else weighted + term.to(weighted.device)
    raw = float(sum(r.to(raws[0].device) for r in raws)) / len(raws) if raws else None
    return weighted, raw
