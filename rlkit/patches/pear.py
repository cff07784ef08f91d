"""PEAR, model side (arXiv 2409.19745): fold per-head scales into ``o_proj`` and the registered ``pear`` patch.

``apply_patches(model, [{"name": "pear", "coefficients": [[layer, head, alpha], ...]}])`` multiplies
``o_proj.weight[:, h*D:(h+1)*D]`` by ``alpha`` for each listed head, so the re-weighted model keeps the
original architecture. The patch *sets* the scales relative to the weights without PEAR and records them in
``model.config.rlkit_pear``: re-applying the same coefficients is a no-op (a saved checkpoint reloads
without double application), new ones replace the old ones, and an ``alpha`` of exactly 0 cannot be changed
later. Finding the heads and training the coefficients is the ``pear`` method (``rlkit pear``).
See ``docs/methods/pear.md``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import register_patch

__all__ = ["PearError", "apply_pear", "fold_coefficients", "folded_coefficients", "head_layout", "pear"]

CONFIG_KEY = "rlkit_pear"


class PearError(ValueError):
    """A PEAR problem the user can fix (bad option, unsupported model, unusable coefficients)."""


# --------------------------------------------------------------------------------------------------
# Model layout


def _inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise PearError(f"pear: {type(model).__name__} has no `.model.layers`; PEAR supports HF decoder-only "
                        "models of the Llama family (Llama, Qwen2, Qwen3, Mistral, ...)")
    return inner


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    layers = _inner(model).layers
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not isinstance(getattr(attn, "o_proj", None), nn.Linear):
            raise PearError(f"pear: layer {i} has no self_attn.o_proj linear layer; PEAR re-weights the per-head "
                            "slices of o_proj's input (Llama-family models)")
    return layers


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_heads, head_dim)``; ``num_heads * head_dim`` is ``o_proj``'s input width."""
    layers = _layers(model)
    o_proj = layers[0].self_attn.o_proj
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(layers[0].self_attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    num_heads = getattr(cfg, "num_attention_heads", None)
    if not head_dim and num_heads:
        head_dim = o_proj.in_features // num_heads
    if not head_dim or o_proj.in_features % head_dim:
        raise PearError(f"pear: cannot split o_proj's {o_proj.in_features} inputs into heads (head_dim={head_dim})")
    return len(layers), o_proj.in_features // int(head_dim), int(head_dim)


def _check_coefficients(model: nn.Module, coefficients: Any) -> list[tuple[int, int, float]]:
    """Normalise ``[[layer, head, alpha], ...]`` (or ``{"layer":, "head":, "alpha":}`` dicts) and validate it."""
    if coefficients is None or isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Iterable):
        raise PearError("pear: `coefficients` must be a list of [layer, head, alpha] triples, "
                        f"got {coefficients!r}")
    num_layers, num_heads, _ = head_layout(model)
    out: list[tuple[int, int, float]] = []
    seen: set[tuple[int, int]] = set()
    for i, item in enumerate(coefficients):
        if isinstance(item, dict):
            item = (item.get("layer"), item.get("head"), item.get("alpha"))
        try:
            layer, head, alpha = item
            if isinstance(layer, bool) or isinstance(head, bool) or int(layer) != layer or int(head) != head:
                raise TypeError
            layer, head, alpha = int(layer), int(head), float(alpha)
        except (TypeError, ValueError):
            raise PearError(f"pear: coefficients[{i}] must be [layer, head, alpha] (ints, ints, float), "
                            f"got {item!r}") from None
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise PearError(f"pear: coefficients[{i}] names head ({layer}, {head}) but the model has "
                            f"{num_layers} layers x {num_heads} heads")
        if not math.isfinite(alpha):
            raise PearError(f"pear: coefficients[{i}] alpha must be finite, got {alpha!r}")
        if (layer, head) in seen:
            raise PearError(f"pear: head ({layer}, {head}) is listed twice in coefficients")
        seen.add((layer, head))
        out.append((layer, head, alpha))
    return out




# --------------------------------------------------------------------------------------------------
# Fold and the registered patch


@torch.no_grad()
def fold_coefficients(model: nn.Module, coefficients: Any) -> None:
    """Multiply ``o_proj.weight[:, h*D:(h+1)*D]`` by ``alpha`` for each ``[layer, head, alpha]`` (raw fold, no
    bookkeeping; the registered ``pear`` patch uses this through ``apply_pear``)."""
    layers = _layers(model)
    _, _, head_dim = head_layout(model)
    for layer, head, alpha in _check_coefficients(model, coefficients):
        w = layers[layer].self_attn.o_proj.weight
        w[:, head * head_dim:(head + 1) * head_dim] *= alpha


def folded_coefficients(model: nn.Module) -> dict[tuple[int, int], float]:
    """The scales currently folded into the weights, ``{(layer, head): alpha}`` (empty: no PEAR)."""
    record = getattr(model.config, CONFIG_KEY, None) or {}
    return {(int(l), int(h)): float(a) for l, h, a in record.get("coefficients", [])}


def apply_pear(model: nn.Module, coefficients: Any) -> list[list]:
    """Make the model's head scales equal ``coefficients`` relative to its weights without PEAR (the scales
    already folded are divided out first). Returns the coefficients now recorded in the config."""
    target = {(l, h): a for l, h, a in _check_coefficients(model, coefficients)}
    current = folded_coefficients(model)
    factors = []
    for key in sorted(set(target) | set(current)):
        want, have = target.get(key, 1.0), current.get(key, 1.0)
        if want == have:
            continue
        if have == 0.0:
            raise PearError(f"pear: head {key} was folded with alpha 0, so its weights are gone and it cannot be "
                            "re-weighted; start from the model without PEAR")
        factors.append([key[0], key[1], want / have])
    if factors:
        fold_coefficients(model, factors)
    record = [[l, h, a] for (l, h), a in sorted(target.items())]
    setattr(model.config, CONFIG_KEY, {"coefficients": record})
    return record


@register_patch("pear")
def pear(model: nn.Module, coefficients: Any = None, **unknown: Any) -> None:
    """``{"name": "pear", "coefficients": [[layer, head, alpha], ...]}``: fold the PEAR head scales into
    ``o_proj`` (idempotent; safe to re-apply on reload)."""
    if unknown:
        raise PearError(f"pear: unknown option(s) {', '.join(sorted(unknown))}; the patch takes only "
                        "`coefficients: [[layer, head, alpha], ...]` (run `rlkit pear` to find them)")
    if coefficients is None:
        raise PearError("pear: the patch needs `coefficients: [[layer, head, alpha], ...]`; "
                        "run `rlkit pear --model M --out DIR` to find them")
    apply_pear(model, coefficients)


def _record_patch(model: nn.Module, coefficients: list[list]) -> dict:
    """Put the pear spec into ``config.rlkit_patches`` (replacing an earlier one, keeping other patches)."""
    spec = {"name": "pear", "coefficients": coefficients}
    others = [p for p in (getattr(model.config, "rlkit_patches", None) or []) if p.get("name") != "pear"]
    model.config.rlkit_patches = others + [spec]
    return spec
