"""Attention functions and model hooks for the compressed key caches of :mod:`rlkit.kvcache.cache`.

HF's attention functions cannot see the cache (``LlamaAttention.forward`` calls ``past_key_values.update``
and then the attention interface with the returned tensors only; spec section 0). ThinK needs the prefill
queries in the cache and the PolarQuant table-lookup decode needs the codes in the attention, so:

- :func:`install_hooks` registers a forward pre-hook (``with_kwargs=True``) on every attention module. It reads
  the cache the module is called with (``cache`` from transformers 5.24 on, ``past_key_values`` before: both
  are read, through :func:`rlkit.compat.cache_from_call`); when that is a :class:`~rlkit.kvcache.cache.CompressedKVCache` it stashes a
  weak reference to the module's cache layer on the module (``module.rlkit_kv_layer``) and tells the layer
  which attention implementation will read its keys (``layer.attn_impl``), before ``update`` runs. Any other
  cache (or none: training) clears the reference.
- :func:`compressed_attention` is registered with ``transformers.AttentionInterface`` under both
  ``"think_sdpa"`` and ``"polar_lut"`` (the two names the model config can be switched to; the function is the
  same and dispatches on the layer's state), with ``sdpa_mask`` as their mask function
  (``AttentionMaskInterface``), so the masks are SDPA's: boolean, or ``None`` when ``is_causal`` suffices.

  1. Layer pending a ThinK prune (its prefill): ``layer.prune(query, mask)``, then SDPA on the unpruned
     prefill keys (as the official code: the prefill itself sees full keys).
  2. One-token step whose ``update`` returned only the full-precision residual (``layer.lut_step``):
     ``scores = layer.lut_scores(q) * scaling`` (table lookups on the codes, ``q[m] . k[m]`` on a pruned
     prefix, ``q . k`` on the residual), masked (boolean mask -> float32 min, float mask added), softmax and
     ``x V`` by hand in float32 (SDPA cannot take precomputed scores), output cast to the query dtype. Then
     ``layer.settle()`` runs the flush an ``attend_first`` step left pending (the step has read the
     full-precision residual; the next one reads the new codes).
  3. Anything else (no compressed cache, decode through dequantized keys, multi-token chunks): HF's
     ``sdpa_attention_forward`` with the arguments unchanged, so an uncompressed layer is bit-identical to
     ``attn_implementation="sdpa"``. Keys with one head per query head (per-query-head ThinK on a GQA model:
     more key heads than value heads) get their values repeated to match (HF's ``repeat_kv`` order) and run
     as one group.

Performance: the table-lookup path is a faithful PyTorch reference (``gather``-based, equal to the
dequantized product up to float32 rounding, and it never materialises the dequantized keys), not a speed
path: on CPU it decodes slower than dequantize + matmul (the official speed-up comes from a Triton kernel
with ``tl.gather``, one program per (batch * KV head, 128-token block), which is not part of this module).

Only the two names' behaviour is rlkit's: a model loaded with ``attn_implementation="sdpa"``, ``"eager"`` or
a flash implementation runs SDPA for the prefill and for every non-LUT step while it is prepared
(:func:`rlkit.kvcache.restore_model` puts its implementation back). Implementations installed by other
patches (``cog``...) are refused rather than silently replaced.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..compat import cache_from_call
from .cache import ATTENTION_NAMES, CompressedKeyLayer, CompressedKVCache

__all__ = ["compressed_attention", "register_attention", "attention_modules", "install_hooks", "remove_hooks",
           "STANDARD_IMPLEMENTATIONS"]

# Implementations prepare_model may replace (and restore_model put back).
STANDARD_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

_registered = False


def _layer_of(module: torch.nn.Module) -> CompressedKeyLayer | None:
    ref = getattr(module, "rlkit_kv_layer", None)
    return ref() if ref is not None else None


def lut_attention(layer: CompressedKeyLayer, query: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, num_key_value_groups: int
                  ) -> tuple[torch.Tensor, None]:
    """Attention of ``query[B, Hq, L, D]`` over the layer's stored keys, read by table lookups."""
    b, hq, length, _ = query.shape
    scores = layer.lut_scores(query, num_key_value_groups) * scaling           # [B, Hq, L, T] float32
    t = scores.shape[-1]
    if attention_mask is not None:
        mask = attention_mask[..., -length:, -t:]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    h = value.shape[1]
    out = probs.reshape(b, h, num_key_value_groups * length, t) @ value.float()
    out = out.reshape(b, hq, length, value.shape[-1]).transpose(1, 2).to(query.dtype).contiguous()
    layer.settle()
    return out, None


class _OneGroup:
    """What ``sdpa_attention_forward`` reads of an attention module, for keys already per query head."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self.is_causal = getattr(module, "is_causal", True)
        self.training = module.training


def compressed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"think_sdpa"`` / ``"polar_lut"`` attention function (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _layer_of(module)
    if layer is not None:
        groups = getattr(module, "num_key_value_groups", 1)
        if layer.pending_prune:
            layer.prune(query, attention_mask, groups)
        elif layer.lut_step and query.shape[2] == 1:
            layer.lut_step = False
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            return lut_attention(layer, query, value, attention_mask, scaling, groups)
    if key.shape[1] != value.shape[1]:             # per-query-head ThinK keys: repeat the values to match
        value = value.repeat_interleave(key.shape[1] // value.shape[1], dim=1)
        module = _OneGroup(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_attention() -> None:
    """Register ``"think_sdpa"`` and ``"polar_lut"`` (attention + ``sdpa_mask``) once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name in ATTENTION_NAMES:
        AttentionInterface.register(name, compressed_attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a Llama/Qwen2-style model (``layer_idx``, ``k_proj``, GQA groups)."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "num_key_value_groups")]


def _pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = cache_from_call(args, kwargs)
    if isinstance(cache, CompressedKVCache) and module.layer_idx < len(cache.layers):
        layer = cache.layers[module.layer_idx]
        layer.attn_impl = module.config._attn_implementation
        module.rlkit_kv_layer = weakref.ref(layer)
    else:
        module.rlkit_kv_layer = None


def install_hooks(model: torch.nn.Module) -> list[Any]:
    """Pre-hooks on every attention module; returns their handles."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError("rlkit.kvcache: no Llama/Qwen2-style attention module (layer_idx, k_proj, "
                         "num_key_value_groups) found in the model")
    return [m.register_forward_pre_hook(_pre_hook, with_kwargs=True) for m in modules]


def remove_hooks(model: torch.nn.Module, handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    for m in attention_modules(model):
        if hasattr(m, "rlkit_kv_layer"):
            del m.rlkit_kv_layer
