"""Cog attention: "More Expressive Attention with Negative Weights" (Lv et al., arXiv 2411.07176).

Cog attention replaces the softmax weights by signed weights. Per head, after RoPE,
``P = (q k^T) * scaling`` and ``A = sign(P) * softmax(|P| + mask)``, ``o = A V``: the rows of ``|A|`` sum
to one, a head can add, subtract and ignore values at once, and there is no new parameter or
hyperparameter. The mask is applied to ``|P|`` (never before ``abs``: an additive dtype-min would become
+big). Gradients flow through ``|P|``; ``sign`` is a constant (official code: ``Cogformer/attention.py``).
Following the official ``attn_type='np'`` model, the first and the last layer keep softmax attention.

What this module implements: ``@register_patch("cog")``, i.e. ``apply_patches(model, [{"name": "cog"}])``,
which switches a loaded HF model (Llama / Qwen2 / Mistral families, or any model that dispatches through
``transformers.AttentionInterface``) to Cog attention in the chosen layers, for training, generation with a
KV cache, padding masks and GQA.

Per-layer dispatch (how one model mixes Cog and softmax layers):

- HF picks one attention function per model (``config._attn_implementation``) and one mask function under
  the same name. This module registers two implementations with ``AttentionInterface`` and
  ``AttentionMaskInterface``: ``"cog"`` (softmax layers run HF's eager attention; mask ``eager_mask``, an
  additive float mask) and ``"cog_sdpa"`` (softmax layers run HF's SDPA attention; mask ``sdpa_mask``, a
  boolean mask or ``None`` when SDPA's ``is_causal`` suffices). The patch picks the one matching the
  implementation the model was loaded with (``eager`` -> ``cog``, ``sdpa`` -> ``cog_sdpa``), so a layer that
  keeps softmax receives exactly the mask and calls exactly the function it had before: it is
  bit-identical to the unpatched model. Other implementations (flash, flex) are refused with a message.
- Both registered functions dispatch per call on the attention module: ``module.rlkit_cog`` (a bool set
  by the patch on every attention module, from its ``layer_idx``) says Cog or softmax. A module without
  the attribute (a model loaded directly with ``attn_implementation="cog"`` or ``"cog_sdpa"`` after
  importing this module, as TRL does for a reference model: it copies the policy's implementation name)
  takes its layers from the ``cog`` entry of ``config.rlkit_patches`` when the checkpoint has one, else
  the paper's default, Cog in every layer but the first and last.
- The Cog layers turn the mask they get into an additive one: a float mask is used as is, a boolean mask
  becomes 0 / dtype-min (as ``eager_mask`` does), and ``None`` (SDPA's causal shortcut) becomes a
  bottom-right aligned causal mask (no mask at all for a single query, as in decoding).
- The patch is recorded in ``config.rlkit_patches`` (by ``apply_patches``) but ``_attn_implementation`` is
  not saved by HF: a checkpoint reloaded through ``rlkit.models.load_model`` loads with its ordinary
  implementation and the patch is re-applied on top.

Options (recipe: ``model.patches: [{name: cog, layers: [1, 2]}]``):

- ``layers`` (list of int, default: all but the first and the last layer): the layers that use Cog;
  negative indices count from the end. A model with two layers or fewer has no default Cog layer, so the
  patch asks for ``layers`` instead of silently doing nothing.
- ``kernel`` (``"fused"``, default, or ``"autograd"``): ``fused`` is a ``torch.autograd.Function`` with a
  hand-written backward that saves only ``A`` (as much as softmax attention saves) and needs no extra
  ``T x T`` pass for the row sums (``sum_j A_ij dA_ij = dO_i . O_i``); ``autograd`` is the plain formula
  (``repeat_kv``, ``abs``, ``softmax``, ``sign``) differentiated by autograd, the reference the tests
  compare against. Attention dropout > 0 in training and ``output_attentions=True`` always take the
  autograd path.

Choices made where the paper is silent:

- ``sign(0) = 0`` (``torch.sign``), so a logit of exactly zero contributes nothing.
- Numerics follow HF's eager softmax: logits in the input dtype, softmax in float32 (float64 inputs stay
  float64), weights cast back to the input dtype, then multiplied by the sign. The fused kernel scales
  ``q`` before the product (``(q * scaling) k^T``), which rounds differently from ``(q k^T) * scaling``
  by about one ulp.
- GQA: the fused kernel folds the query heads of a group into the query axis
  (``[B, Hkv, G*Tq, D]``) instead of materialising ``repeat_kv``; the result equals ``repeat_kv``.
- Attention dropout (0 in Llama/Qwen2/Mistral configs) is applied to the signed weights ``A``, after the
  sign, as in the spec's recipe.
- Fully masked query rows (left padding) get finite weights, as eager softmax does (dtype-min, not -inf).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from . import register_patch

__all__ = ["cog", "cog_attention", "cog_attention_reference", "cog_layers"]

BASES = {"cog": "eager", "cog_sdpa": "sdpa"}  # registered name -> implementation of the softmax layers
_FOR_BASE = {v: k for k, v in BASES.items()}
KERNELS = ("fused", "autograd")


# --------------------------------------------------------------------------------------------------
# Math


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                   device: torch.device, causal: bool = True) -> torch.Tensor | None:
    """The mask as an additive float tensor (0 / dtype-min), or None when every key is visible."""
    if mask is None:
        if q_len == 1 or not causal:
            return None
        # SDPA's causal shortcut: bottom-right aligned causal mask (query i sees keys <= i + k_len - q_len)
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        allowed = torch.arange(k_len, device=device)[None, :] <= rows
        mask = allowed[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)
    return mask.to(dtype)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/fp32 (as HF eager); float64 stays float64 (its dtype-min would overflow to -inf)."""
    return torch.promote_types(dtype, torch.float32)


def cog_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            training: bool = False, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain formula, differentiated by autograd: returns ``(out [B,Tq,H,D], A [B,H,Tq,Tk])``."""
    n_rep = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, n_rep)
    v = _repeat_kv(value, n_rep)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    mask = _additive_mask(attention_mask, query.shape[2], key.shape[2], logits.dtype, logits.device, causal)
    magnitude = logits.abs()
    if mask is not None:
        magnitude = magnitude + mask
    weights = nn.functional.softmax(magnitude, dim=-1, dtype=_softmax_dtype(query.dtype)).to(query.dtype)
    weights = weights * torch.sign(logits).detach()
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


class _CogFunction(torch.autograd.Function):
    """Fused Cog attention on grouped heads: q ``[B,Hkv,G*Tq,D]``, k/v ``[B,Hkv,Tk,D]``, mask broadcastable
    to ``[B,Hkv,G,Tq,Tk]`` (additive) or None. Returns ``O [B,Hkv,G*Tq,D]``.

    Backward (A = sign(P) * S, S = softmax(|P| + M), O = A V):
    ``dV = A^T dO``, ``dA = dO V^T``, ``dP = |A| * dA - A * r`` with ``r_i = sum_j A_ij dA_ij = dO_i . O_i``
    (exact, ``sign(0) = 0`` included, since ``sign(P)^2 * S = |A|``); ``dq = scaling * dP K``,
    ``dk = scaling * dP^T q``. The scaling is applied to the small ``T x D`` tensors, never to ``T x T``.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling: float, group: int):
        b, hkv, gt, d = q.shape
        logits = torch.matmul(q * scaling, k.transpose(-1, -2))  # scaling folded into q: no extra T x T pass
        magnitude = logits.abs()
        if mask is not None:
            tq = gt // group
            magnitude.view(b, hkv, group, tq, -1).add_(mask)
        softmax_dtype = _softmax_dtype(q.dtype)
        if magnitude.dtype == softmax_dtype:
            weights = torch.softmax(magnitude, dim=-1)
        else:
            weights = torch.softmax(magnitude, dim=-1, dtype=softmax_dtype).to(q.dtype)
        del magnitude
        weights.mul_(logits.sign_())
        del logits
        out = torch.matmul(weights, v)
        ctx.save_for_backward(q, k, v, weights, out)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weights, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = torch.matmul(weights.transpose(-1, -2), grad_out)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_w = torch.matmul(grad_out, v.transpose(-1, -2))
            row = (grad_out * out).sum(-1, keepdim=True)
            grad_w.mul_(weights.abs()).addcmul_(weights, row, value=-1)  # dP (before the scaling)
            if ctx.needs_input_grad[0]:
                grad_q = torch.matmul(grad_w, k).mul_(ctx.scaling)
            if ctx.needs_input_grad[1]:
                grad_k = torch.matmul(grad_w.transpose(-1, -2), q).mul_(ctx.scaling)
        return grad_q, grad_k, grad_v, None, None, None


def cog_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, causal: bool = True) -> torch.Tensor:
    """Fused Cog attention (no dropout): query ``[B,H,Tq,D]``, key/value ``[B,Hkv,Tk,D]`` ->
    output ``[B,Tq,H,D]``. ``attention_mask``: additive float, boolean (True = attend) or None (causal
    unless ``causal=False``, as SDPA's ``is_causal``)."""
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"cog attention: {h} query heads are not a multiple of {hkv} key/value heads")
    group = h // hkv
    mask = _additive_mask(attention_mask, tq, tk, query.dtype, query.device, causal)
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"cog attention expects a 4D attention mask, got shape {tuple(mask.shape)}")
        if mask.shape[1] == 1:
            mask = mask.unsqueeze(2)  # [B,1,1,Tq,Tk]
        else:  # per-head mask
            mask = mask.expand(b, h, tq, tk).reshape(b, hkv, group, tq, tk)
    q = query.reshape(b, hkv, group * tq, d)
    out = _CogFunction.apply(q, key.contiguous(), value.contiguous(), mask, float(scaling), group)
    return out.view(b, h, tq, -1).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Attention-interface functions (per-layer dispatch)


def _num_layers(config: Any) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.num_hidden_layers


def _resolve_layers(layers: list[int] | None, n: int) -> set[int]:
    """The Cog layer set for a model with ``n`` layers (``None``: all but the first and the last)."""
    if layers is None:
        return set(range(1, n - 1))
    if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"cog: layers must be a list of layer indices, got {layers!r}")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"cog: layer indices {bad} are out of range for a model with {n} layers")
    return {i % n for i in layers}


def _configured(module: nn.Module) -> tuple[bool, str]:
    """(uses Cog, kernel) for a module the patch has not marked: from a ``cog`` entry in
    ``config.rlkit_patches`` (e.g. a reference model that TRL loads from a saved patched checkpoint with
    ``attn_implementation="cog_sdpa"``), else the paper's default placement."""
    n = _num_layers(module.config)
    for spec in getattr(module.config, "rlkit_patches", None) or []:
        if isinstance(spec, dict) and spec.get("name") == "cog":
            return module.layer_idx in _resolve_layers(spec.get("layers"), n), spec.get("kernel", "fused")
    return module.layer_idx in _resolve_layers(None, n), "fused"


def _uses_cog(module: nn.Module) -> bool:
    use = getattr(module, "rlkit_cog", None)
    if use is None:
        use, kernel = _configured(module)
        module.rlkit_cog, module.rlkit_cog_kernel = use, kernel
    return bool(use)


_EAGER_CACHE: dict[type, Callable] = {}


def _eager_for(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (what HF would have called)."""
    fn = _EAGER_CACHE.get(type(module))
    if fn is None:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        _EAGER_CACHE[type(module)] = fn
    return fn


def _softmax_attention(base: str, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    if base == "eager":
        return _eager_for(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _cog_forward(base: str, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not _uses_cog(module):
        return _softmax_attention(base, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    training = module.training
    # a missing mask means "causal" exactly when SDPA would have used is_causal=True
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    kernel = getattr(module, "rlkit_cog_kernel", "fused")
    if kernel == "autograd" or (dropout and training) or kwargs.get("output_attentions"):
        return cog_attention_reference(query, key, value, attention_mask, scaling, dropout, training, causal)
    return cog_attention(query, key, value, attention_mask, scaling, causal), None


def cog_eager_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as ``"cog"``: Cog in the Cog layers, HF eager softmax elsewhere (mask: ``eager_mask``)."""
    return _cog_forward("eager", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def cog_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as ``"cog_sdpa"``: Cog in the Cog layers, HF SDPA elsewhere (mask: ``sdpa_mask``)."""
    return _cog_forward("sdpa", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register("cog", cog_eager_forward)
    AttentionInterface.register("cog_sdpa", cog_sdpa_forward)
    AttentionMaskInterface.register("cog", eager_mask)
    AttentionMaskInterface.register("cog_sdpa", sdpa_mask)


_register()


# --------------------------------------------------------------------------------------------------
# The patch


def _attention_modules(model: Any) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(mods, key=lambda m: m.layer_idx)


def cog_layers(model: Any) -> list[int]:
    """Indices of the layers that currently run Cog attention (empty unless the model dispatches to Cog)."""
    if model.config._attn_implementation not in BASES:
        return []
    return [m.layer_idx for m in _attention_modules(model) if _uses_cog(m)]


@register_patch("cog")
def cog(model: Any, layers: list[int] | None = None, kernel: str = "fused") -> None:
    """Use Cog attention in ``layers`` (default: all but the first and the last); see the module docstring."""
    if kernel not in KERNELS:
        raise ValueError(f"cog: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("cog: found no attention module with a layer_idx; Cog attention patches models that "
                         "dispatch through transformers' AttentionInterface (Llama, Qwen2, Mistral, ...)")
    n = _num_layers(model.config)
    chosen = _resolve_layers(layers, n)
    if layers is None and not chosen:
        raise ValueError(f"cog: the model has {n} layer(s); the default keeps softmax in the first and the last "
                         "layer, which leaves no Cog layer. Pass layers: [...] to choose them")

    current = model.config._attn_implementation
    base = BASES.get(current, current)
    if base not in _FOR_BASE:
        raise ValueError(f"cog: the model uses attn_implementation={current!r}; Cog attention runs on models "
                         "loaded with 'eager' or 'sdpa' (recipe: model.attn_implementation: sdpa)")
    for m in modules:
        m.rlkit_cog = m.layer_idx in chosen
        m.rlkit_cog_kernel = kernel
    name = _FOR_BASE[base]
    if current != name:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise ValueError(f"cog: {type(model).__name__} does not let transformers switch its attention "
                             "implementation (it does not dispatch through AttentionInterface)")
