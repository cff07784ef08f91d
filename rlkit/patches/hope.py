"""HoPE: High-frequency rotary Position Encoding (Chen, Lv, Luan, Wang, Liu; arXiv 2410.21216, ACL 2025).

HoPE keeps only the high-frequency rotary components of RoPE and makes every other component
position-independent (identity rotation, like a NoPE channel). With RoPE frequencies
``theta_j = base ** (-2j / D)`` and the training context length ``L``, component ``j`` keeps its rotation
iff ``theta_j * L >= 2*pi`` (its period fits inside the training window); every component whose frequency
is below ``2*pi / L`` gets ``theta_j := 0``. No parameter is added and the head dimension is unchanged.

What this module implements: ``@register_patch("hope")``, i.e. ``apply_patches(model, [{"name": "hope",
"train_length": 2048}])``, which edits the rotary buffers of a loaded HF model in place (the route the
spec calls safe: a new ``rope_type`` could fail config validation). It works for every model whose
rotary module has an ``inv_freq`` buffer with the HF ``rotate_half`` layout (dim ``j`` and ``j + D/2`` share
``inv_freq[j]``: zeroing ``inv_freq[j]`` gives ``cos = 1``, ``sin = 0`` on both), which covers the Llama,
Qwen2 and Mistral families (one shared ``model.model.rotary_emb``).

Options (recipe: ``model.patches: [{name: hope, train_length: 2048}]``):

- ``train_length`` (int): the training context length ``L``. When omitted it is read from the config:
  ``rope_parameters["original_max_position_embeddings"]`` when present (llama3 / yarn / longrope scaling,
  where ``L`` must be the original pretraining length, not the extended one), else
  ``max_position_embeddings``. The default is resolved each time the patch is applied, so a checkpoint
  reloaded through ``rlkit.models`` gets the same ``L`` unless its config was edited; pass it explicitly
  when the real training length differs from the config (e.g. a 256-position tiny model trained on 128-token
  sequences).
- ``cutoff`` (float, rad/token): overrides the threshold ``2*pi / L``; components with ``inv_freq < cutoff``
  are zeroed (``cutoff=0`` zeroes nothing and leaves the model bit-identical).
- ``min_rotary_pairs`` (int, default 1): if the rule would leave fewer rotated pairs, the highest
  frequencies are kept anyway (the third-party praxis implementation keeps at least the highest one; the
  paper is silent).

Choices made where the paper is silent (it has no official code; spec section 3):

- The cut-off is exactly ``2*pi / L`` (UNCONFIRMED in the paper, from two secondary sources), compared in
  float64 against the model's float32 ``inv_freq``; a component exactly at the boundary keeps its rotation.
- Scaled rope types (``linear``, ``llama3``, ``yarn``, ...) are cut after scaling, on the ``inv_freq`` the
  model actually uses, and ``original_inv_freq`` is zeroed at the same indices so nothing restores them.
  The ``attention_scaling`` factor of yarn / longrope still multiplies ``cos`` of the zeroed components,
  as it does for every other component.
- Dynamic rope types (``dynamic`` NTK, ``longrope``) recompute ``inv_freq`` inside ``forward``. The set of
  position-free components is fixed at patch time (from the frequencies the model had then) and a forward
  hook on the rotary module re-imposes ``cos = attention_scaling``, ``sin = 0`` on those dims after every
  recomputation, so the dims trained position-free stay position-free at any length.
- Applying the patch twice is harmless (zeroed components stay zero).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from . import register_patch

logger = logging.getLogger(__name__)

__all__ = ["hope", "hope_keep_mask", "resolve_train_length", "rotary_modules"]


def resolve_train_length(config: Any, train_length: int | None = None) -> int:
    """``train_length`` if given, else the config's original pretraining length (see the module docstring)."""
    if train_length is not None:
        if isinstance(train_length, bool) or not isinstance(train_length, int) or train_length <= 0:
            raise ValueError(f"hope: train_length must be a positive integer, got {train_length!r}")
        return train_length
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("original_max_position_embeddings"):
        return int(rope["original_max_position_embeddings"])
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        raise ValueError("hope: the model config has no max_position_embeddings; pass train_length: <int>")
    return int(n)


def hope_keep_mask(inv_freq: torch.Tensor, train_length: int | None = None, cutoff: float | None = None,
                   min_rotary_pairs: int = 1) -> torch.Tensor:
    """Boolean mask over ``inv_freq``: True = the component keeps its rotation.

    Kept iff ``inv_freq >= cutoff`` with ``cutoff = 2*pi / train_length`` unless given; then the
    ``min_rotary_pairs`` highest frequencies are kept in any case.
    """
    if cutoff is None:
        if train_length is None:
            raise ValueError("hope_keep_mask needs train_length or cutoff")
        cutoff = 2 * math.pi / train_length
    if cutoff < 0 or not math.isfinite(cutoff):
        raise ValueError(f"hope: cutoff must be a finite frequency >= 0, got {cutoff!r}")
    freqs = inv_freq.detach().to("cpu", torch.float64)
    keep = freqs >= cutoff
    n_min = min(int(min_rotary_pairs), freqs.numel())
    if n_min < 0:
        raise ValueError(f"hope: min_rotary_pairs must be >= 0, got {min_rotary_pairs!r}")
    if int(keep.sum()) < n_min:
        keep[torch.topk(freqs, n_min).indices] = True
    return keep.to(inv_freq.device)


def rotary_modules(model: Any) -> list[torch.nn.Module]:
    """Modules holding a RoPE ``inv_freq`` buffer (``model.model.rotary_emb`` for Llama/Qwen2/Mistral)."""
    found = []
    for module in model.modules():
        if any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False)):
            found.append(module)
    return found


def _prefixes(module: torch.nn.Module) -> list[str]:
    """``""`` for ``inv_freq``, ``"sliding_attention_"`` for per-layer-type buffers, ..."""
    names = [n for n, _ in module.named_buffers(recurse=False)]
    return [n[: -len("inv_freq")] for n in names if n.endswith("inv_freq") and not n.endswith("original_inv_freq")]


def _is_dynamic(module: torch.nn.Module) -> bool:
    rope_type = getattr(module, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any("dynamic" in str(t) or t == "longrope" for t in types)


def _enforce_identity_hook(module, args, kwargs, output):
    """Forward hook for dynamic rope types: the HoPE dims get cos = attention_scaling, sin = 0."""
    layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
    position_free = module.rlkit_hope_position_free.get(layer_type or "")
    if position_free is None:
        return output
    cos, sin = output
    dims = torch.cat([position_free, position_free]).to(cos.device)
    scaling = module.attention_scaling
    if isinstance(scaling, dict):  # per-layer-type scaling
        scaling = scaling.get(layer_type, 1.0)
    cos = cos.clone()
    sin = sin.clone()
    cos[..., dims] = float(scaling)
    sin[..., dims] = 0
    return cos, sin


@register_patch("hope")
def hope(model: Any, train_length: int | None = None, cutoff: float | None = None, min_rotary_pairs: int = 1) -> None:
    """Zero the rotary frequencies below ``2*pi / train_length`` (or ``cutoff``) in every rotary module."""
    rotaries = rotary_modules(model)
    if not rotaries:
        raise ValueError("hope: the model has no rotary embedding (no module with an `inv_freq` buffer); "
                         "HoPE applies to RoPE models such as Llama, Qwen2 and Mistral")
    length = resolve_train_length(model.config, train_length) if cutoff is None else train_length
    threshold = cutoff if cutoff is not None else 2 * math.pi / length
    for rot in rotaries:
        position_free: dict[str, torch.Tensor] = {}
        for prefix in _prefixes(rot):
            inv = getattr(rot, f"{prefix}inv_freq")
            keep = hope_keep_mask(inv, cutoff=threshold, min_rotary_pairs=min_rotary_pairs)
            zero = ~keep
            with torch.no_grad():
                inv[zero] = 0
                original = getattr(rot, f"{prefix}original_inv_freq", None)
                if isinstance(original, torch.Tensor) and original.shape == inv.shape:
                    original[zero.to(original.device)] = 0
            position_free[prefix[:-1] if prefix else ""] = zero.cpu()
            logger.info("hope: %s%s keeps %d/%d rotary pairs (cutoff %.6g rad/token)", type(rot).__name__,
                        f"[{prefix[:-1]}]" if prefix else "", int(keep.sum()), keep.numel(), threshold)
        rot.rlkit_hope_position_free = position_free
        rot.rlkit_hope_cutoff = threshold
        if _is_dynamic(rot) and not getattr(rot, "rlkit_hope_hooked", False):
            rot.register_forward_hook(_enforce_identity_hook, with_kwargs=True)
            rot.rlkit_hope_hooked = True
