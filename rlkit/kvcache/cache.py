"""Compressed key caches for HF transformers v5: PolarQuant, ThinK and both, as ``DynamicLayer`` subclasses.

One layer class, :class:`CompressedKeyLayer`, implements the three methods (``polar`` on/off, ``think``
on/off); :class:`PolarKeyLayer` and :class:`ThinKLayer` are its two single-method configurations and
:class:`CompressedKVCache` is a ``transformers.Cache`` holding one layer per decoder layer. Values are always
kept whole, in the model dtype (the main PolarQuant results; spec section 4). The math is in
:mod:`rlkit.kvcache.polar` and :mod:`rlkit.kvcache.think`, the attention functions in
:mod:`rlkit.kvcache.attention`, the public entry points (``make_cache``, ``prepare_model``) in
:mod:`rlkit.kvcache`.

Storage of one layer (``[B, Hkv, tokens, channels]``, in token order):

1. **pruned prefix** (ThinK only; set once, at the prefill): the first ``S - recent`` prompt tokens restricted
   to the kept channels ``keep_index[B, Hp, T_keep]`` (``uint8`` indices, ``int16`` when ``D > 256``), where
   ``Hp`` is the number of query heads (``think_heads="query"``, the default: each query head keeps its own
   channels of its KV head's keys, so the prefix is stored once per query head) or of KV heads
   (``think_heads="kv"``). ThinK alone stores them in the key dtype (``prefix_keys``). With PolarQuant too ("both"), their complete
   ``group_size`` groups are polar-quantized over the kept RoPE pairs (``prefix_codes``) and only the
   incomplete tail (``< group_size`` tokens) stays in the key dtype; the prefix is quantized at the
   prefill whatever ``residual_length`` (that option is about the most recent, unpruned tokens).
2. **main tokens** (all channels, ``[B, Hkv, ...]``): with PolarQuant, complete groups as ``main_codes``,
   then the full-precision residual ``keys``; without it, only ``keys``. The residual holds the last
   ``recent`` prompt tokens (ThinK) or the prompt's incomplete group (PolarQuant), then the generated tokens.

Rules:

- **Flush (PolarQuant).** Whenever the residual holds ``residual_length`` tokens or more (checked in every
  ``update``), all its complete groups are quantized and appended to ``main_codes``; what is left
  (``< group_size`` tokens) stays full precision. With ``residual_length == group_size`` (the default, 128)
  this is the official rule: at the prefill every complete group is quantized, and during decoding the
  residual is quantized the step it reaches 128 tokens. ``residual_length`` must be ``>= group_size``; an
  enormous value switches quantization off (all keys stay full precision).
- **Flush order of a decode step** (``flush_order``). ``"attend_first"`` (default) is the released code: the
  one-token step that fills the residual attends to the full-precision keys, and they are quantized right
  after (within the same ``update`` for the dequantize path: the returned keys are built before the flush;
  after the attention for the table-lookup path, or at the latest when the layer is next touched). Every
  later step sees them quantized. ``"quantize_first"`` (rlkit before issue 20) quantizes them before the step
  attends. The stored state after a step is the same in both orders.
- **What ``update`` returns.** Every attention backend works on the returned keys:
  - a prefill or any multi-token chunk sees the cache as stored *plus its own tokens in full precision*
    (the official prefill runs flash attention on the full-precision K/V, then quantizes; ThinK's prefill
    attention also sees the unpruned keys);
  - a one-token decode step sees the cache as stored (dequantized codes, zero-filled pruned channels,
    full-precision residual), with the flush order above for the step that completes a group; the dequantize
    path and the table-lookup path see the same keys in both orders.
  - With per-query-head ThinK (``think_heads="query"`` on a GQA model) the returned keys have one head per
    *query* head (``[B, H, T, D]``: the pruned prefix per query head, the other tokens repeated in HF's
    ``repeat_kv`` order) while the values keep their KV heads; ``"think_sdpa"`` / ``"polar_lut"`` (the only
    attention a ThinK layer runs with) repeat the values to match.
  - With the table-lookup decode attention active (``lut=True`` and the model switched to ``"polar_lut"`` by
    :func:`rlkit.kvcache.prepare_model`), a one-token step returns only the full-precision residual keys and
    sets ``lut_step``; the attention function reads the codes from the layer (no dequantization at all).
    Any other attention implementation gets the full dequantized keys, so a wrong setup cannot silently
    drop keys.
- **ThinK pruning** happens in the attention function of the prefill (it needs the queries): the first
  ``update`` only stores the prompt keys and marks the layer ``pending_prune``; ``"think_sdpa"`` /
  ``"polar_lut"`` then call :meth:`CompressedKeyLayer.prune` before running SDPA on the unpruned keys. A ThinK
  layer used by a model that was not prepared (its attention would never prune) raises at once.
- ``crop`` (assisted decoding, rollbacks) removes tokens from the end; quantized groups reached by the crop are
  dequantized back into the full-precision residual (so the kept keys are unchanged, but a later flush
  re-quantizes them: ``is_croppable`` is False with PolarQuant). Batch operations (``reorder_cache``,
  ``batch_repeat_interleave``, ``batch_select_indices``) index every stored tensor, codes included.

Byte accounting (:func:`key_cache_bytes`, :func:`key_cache_report`): the bytes held for **keys** (codes,
parameters, kept-channel indices, full-precision prefix/residual keys; values are never compressed and
not counted). ``reference_bits=None`` counts every tensor at its real element size. ``reference_bits=16``
counts the floating-point tensors (full-precision keys, PolarQuant scales and zero-points) at 16 bits per
element and the integer ones (codes, indices) as stored: the sizes a bf16/fp16 model would hold, also when
the model runs in fp32 on CPU. The report's reference is a plain 16-bit key cache of the same tokens (with the
model's KV heads), so at a 1024-token prefill the PolarQuant 4+4 / group 128 ratio is
``(8 + 4 * 16 / 128) / 32 = 0.2656`` (4.25 bits per element). Per-query-head ThinK counts its prefix once per
query head, as it is stored: on a GQA model its ratio can exceed 1 (SmolLM2, 9 query / 3 KV heads, 4096
tokens: 1.82 against 0.61 per KV head).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .polar import PolarCodes, polar_dequantize, polar_lut_scores, polar_quantize
from .think import gather_channels, think_channel_scores, think_keep_channels, valid_positions, zero_fill

__all__ = ["CompressedKeyLayer", "PolarKeyLayer", "ThinKLayer", "CompressedKVCache", "key_cache_bytes",
           "key_cache_report", "THINK_ATTENTION", "LUT_ATTENTION", "ATTENTION_NAMES"]

THINK_ATTENTION = "think_sdpa"
LUT_ATTENTION = "polar_lut"
ATTENTION_NAMES = (THINK_ATTENTION, LUT_ATTENTION)


def _float_bytes(t: torch.Tensor | None, reference_bits: int | None) -> float:
    if t is None:
        return 0
    return t.numel() * (t.element_size() if reference_bits is None else reference_bits / 8)


def _dot(query: torch.Tensor, keys: torch.Tensor, num_key_value_groups: int) -> torch.Tensor:
    """``query[B, Hq, L, D] @ keys[B, Hkv, T, D]^T`` in float32, GQA without repeating keys: ``[B, Hq, L, T]``."""
    b, hq, length, d = query.shape
    h = keys.shape[1]
    q = query.float().reshape(b, h, num_key_value_groups * length, d)
    return (q @ keys.float().transpose(-1, -2)).reshape(b, hq, length, keys.shape[-2])


def _crop_segment(codes: PolarCodes | None, fp: torch.Tensor, n: int
                  ) -> tuple[PolarCodes | None, torch.Tensor, int]:
    """Remove up to ``n`` tokens from the end of ``codes ++ fp``; returns what is left and the tokens still
    to remove. Quantized groups reached by the crop are dequantized into ``fp`` first."""
    while n > fp.shape[-2] and codes is not None:
        last = codes.groups(codes.num_groups - 1)
        fp = torch.cat([polar_dequantize(last, fp.dtype), fp], dim=-2)
        codes = codes.groups(0, codes.num_groups - 1) if codes.num_groups > 1 else None
    take = min(n, fp.shape[-2])
    if take:
        fp = fp[:, :, : fp.shape[-2] - take].clone()
    return codes, fp, n - take


class CompressedKeyLayer(DynamicLayer):
    """A decoder layer's KV cache with PolarQuant and/or ThinK compressed keys (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, polar: bool = True, think: bool = False, group_size: int = 128, residual_length: int = 128,
                 rbits: int = 4, tbits: int = 4, lut: bool = False, pruning_ratio: float = 0.4,
                 obs_window: int = 32, recent: int = 32, flush_order: str = "attend_first",
                 think_heads: str = "query", think_scored_keys: str = "all"):
        super().__init__()
        for name, value, allowed in (("flush_order", flush_order, ("attend_first", "quantize_first")),
                                     ("think_heads", think_heads, ("query", "kv")),
                                     ("think_scored_keys", think_scored_keys, ("all", "prefix"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if polar:
            if group_size < 1 or residual_length < group_size:
                raise ValueError(f"PolarQuant needs 1 <= group_size <= residual_length, got group_size="
                                 f"{group_size}, residual_length={residual_length}")
            if not (1 <= rbits <= 8 and 1 <= tbits <= 8):
                raise ValueError(f"PolarQuant bits must be in 1..8, got rbits={rbits}, tbits={tbits}")
        if think and not (0 <= pruning_ratio < 1 and obs_window >= 1 and recent >= 0):
            raise ValueError(f"ThinK needs 0 <= pruning_ratio < 1, obs_window >= 1, recent >= 0; got "
                             f"{pruning_ratio}, {obs_window}, {recent}")
        self.polar, self.think, self.lut = bool(polar), bool(think), bool(lut and polar)
        self.group_size, self.residual_length, self.rbits, self.tbits = group_size, residual_length, rbits, tbits
        self.pruning_ratio, self.obs_window, self.recent = pruning_ratio, obs_window, recent
        self.flush_order, self.think_heads, self.think_scored_keys = flush_order, think_heads, think_scored_keys
        self.is_croppable = not self.polar
        # Set by the attention pre-hook of rlkit.kvcache.prepare_model: the attention implementation that
        # will consume this layer's keys.
        self.attn_impl: str | None = None
        self._clear()

    def __repr__(self) -> str:
        kind = "+".join(k for k, on in (("polar", self.polar), ("think", self.think)) if on)
        return f"{type(self).__name__}({kind}, tokens={self.cumulative_length})"

    def _clear(self) -> None:
        self.keys: torch.Tensor | None = None          # full-precision residual (all channels)
        self.values: torch.Tensor | None = None
        self.main_codes: PolarCodes | None = None
        self.prefix_codes: PolarCodes | None = None
        self.prefix_keys: torch.Tensor | None = None   # pruned prefix (or its tail) in the key dtype
        self.keep_index: torch.Tensor | None = None    # [B, Hp, T_keep] kept channels (Hp: query or KV heads)
        self.prefix_repeat = 1                         # Hp / Hkv: how often a KV head repeats to meet the prefix
        self.pending_prune = False
        self.pending_flush = False                     # attend_first table-lookup step: flush after attention
        self.pruned = False
        self.lut_step = False
        self.is_initialized = False
        self.cumulative_length = 0

    # ------------------------------------------------------------------------------------------------
    # DynamicLayer API

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.polar and d % 2:
            raise ValueError(f"PolarQuant needs an even head dimension, got {d}")
        self.head_dim = d
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.settle()
        if self.pending_prune:
            raise RuntimeError("ThinK cache layer: the prefill was never pruned (its attention function did not "
                               "run); prepare the model with rlkit.kvcache.prepare_model")
        first = self.cumulative_length == 0
        n_new = key_states.shape[-2]
        self.cumulative_length += n_new
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.lut_step = False
        if self.think and first and not self.pruned:
            if self.attn_impl not in ATTENTION_NAMES:
                raise RuntimeError(
                    "ThinK cache layer used by a model whose attention cannot prune it (attention "
                    f"implementation {self.attn_impl!r}); call rlkit.kvcache.prepare_model(model, config) first")
            self.keys = key_states
            self.pending_prune = True
            return key_states, self.values
        if n_new > 1:
            out = key_states if first else torch.cat([self._full_keys(), self._repeat(key_states)], dim=-2)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self._flush()
            return out, self.values
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        attend_first = self.flush_order == "attend_first"
        if not attend_first:
            self._flush()
        if self.lut and self.attn_impl == LUT_ATTENTION:
            self.lut_step = True
            self.pending_flush = attend_first     # the attention reads the codes and the residual, then flushes
            return self.keys, self.values
        out = self._full_keys()                   # built before an attend_first flush: it keeps the fp keys
        self._flush()
        return out, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a batch-dim op or a device move) to every stored tensor."""
        if not self.is_initialized:
            return
        self.settle()
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.main_codes is not None:
            self.main_codes = self.main_codes.map(fn)
        if self.prefix_codes is not None:
            self.prefix_codes = self.prefix_codes.map(fn)
        if self.prefix_keys is not None:
            self.prefix_keys = fn(self.prefix_keys)
        if self.keep_index is not None:
            self.keep_index = fn(self.keep_index)

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.values.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove (the legacy positive form, a "
                             "final length, is not supported)")
        n = min(-tokens_to_remove, self.cumulative_length)
        if n == 0 or not self.is_initialized:
            return
        self.settle()
        self.cumulative_length -= n
        self.values = self.values[:, :, : self.values.shape[-2] - n].clone()
        self.main_codes, self.keys, n = _crop_segment(self.main_codes, self.keys, n)
        if n and self.prefix_keys is not None:
            self.prefix_codes, self.prefix_keys, n = _crop_segment(self.prefix_codes, self.prefix_keys, n)

    # ------------------------------------------------------------------------------------------------
    # Compression

    @property
    def num_groups(self) -> int:
        """Quantized groups of the main (all-channel) tokens."""
        return 0 if self.main_codes is None else self.main_codes.num_groups

    @property
    def residual_tokens(self) -> int:
        """Full-precision all-channel tokens (the residual)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def prefix_tokens(self) -> int:
        """Pruned prefix tokens (ThinK)."""
        n = 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]
        return n + (0 if self.prefix_codes is None else self.prefix_codes.num_tokens)

    def settle(self) -> None:
        """Run a flush left pending by an ``attend_first`` table-lookup step (the attention calls it after
        reading the keys; every other entry point calls it first)."""
        if self.pending_flush:
            self.pending_flush = False
            self._flush()

    def _repeat(self, keys: torch.Tensor) -> torch.Tensor:
        """All-channel keys ``[B, Hkv, T, D]`` repeated to the prefix heads (per-query-head ThinK)."""
        return keys if self.prefix_repeat == 1 else keys.repeat_interleave(self.prefix_repeat, dim=1)

    def _flush(self) -> None:
        if not self.polar or self.keys.shape[-2] < self.residual_length:
            return
        n = self.keys.shape[-2] // self.group_size * self.group_size
        new = polar_quantize(self.keys[:, :, :n], self.group_size, self.rbits, self.tbits)
        self.main_codes = new if self.main_codes is None else self.main_codes.cat(new)
        self.keys = self.keys[:, :, n:].clone()

    def prune(self, query: torch.Tensor, attention_mask: torch.Tensor | None, num_key_value_groups: int) -> None:
        """ThinK at the prefill: score channels with the prefill ``query[B, Hq, S, D]`` (post-RoPE) and the
        stored prompt keys (all of them or the prefix: ``think_scored_keys``), per query head or per KV head
        (``think_heads``), and keep the top ones for all but the ``recent`` last tokens."""
        if not self.pending_prune:
            return
        keys = self.keys
        b, _, s, d = keys.shape
        if query.shape[2] != s:
            raise ValueError(f"ThinK prune: {query.shape[2]} queries for {s} prefill keys")
        n_prefix = max(s - self.recent, 0)
        if n_prefix > 0:
            valid = valid_positions(attention_mask, b, s)
            n_keys = s if self.think_scored_keys == "all" else n_prefix
            scores = think_channel_scores(query, keys, num_key_value_groups, n_keys, self.obs_window, valid,
                                          heads=self.think_heads)
            index = think_keep_channels(scores, self.pruning_ratio, pairs=self.polar)
            self.prefix_repeat = num_key_value_groups if self.think_heads == "query" else 1
            compact = gather_channels(self._repeat(keys[:, :, :n_prefix]), index)
            if self.polar:
                nq = n_prefix // self.group_size * self.group_size
                if nq:
                    self.prefix_codes = polar_quantize(compact[:, :, :nq], self.group_size, self.rbits, self.tbits)
                self.prefix_keys = compact[:, :, nq:].clone()
            else:
                self.prefix_keys = compact
            self.keep_index = index.to(torch.uint8 if d <= 256 else torch.int16)
            self.keys = keys[:, :, n_prefix:].clone()
        self.pending_prune = False
        self.pruned = True
        self._flush()

    def full_keys(self) -> torch.Tensor:
        """All cached keys ``[B, Hkv, T, D]`` in the key dtype: zero-filled pruned prefix, dequantized groups,
        full-precision residual (``[B, H, T, D]``, one head per query head, after a per-query-head ThinK prune
        on a GQA model)."""
        self.settle()
        return self._full_keys()

    def _full_keys(self) -> torch.Tensor:
        parts = []
        if self.keep_index is not None:
            prefix = []
            if self.prefix_codes is not None:
                prefix.append(polar_dequantize(self.prefix_codes, self.dtype))
            if self.prefix_keys is not None and self.prefix_keys.shape[-2]:
                prefix.append(self.prefix_keys)
            if prefix:
                parts.append(zero_fill(torch.cat(prefix, dim=-2), self.keep_index, self.head_dim))
        main = [self.keys] if self.main_codes is None else [polar_dequantize(self.main_codes, self.dtype), self.keys]
        parts.append(self._repeat(main[0] if len(main) == 1 else torch.cat(main, dim=-2)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def lut_scores(self, query: torch.Tensor, num_key_value_groups: int) -> torch.Tensor:
        """``query[B, Hq, L, D] @ full_keys()^T`` in float32 ``[B, Hq, L, T]``, computed from the stored form:
        table lookups on the codes, the query restricted to the kept channels on the pruned prefix."""
        b, hq, length, d = query.shape
        parts = []
        if self.keep_index is not None:
            hp = self.keep_index.shape[1]                      # prefix heads: query heads or KV heads
            rows = hq // hp                                    # query heads per prefix head
            idx = self.keep_index.long().unsqueeze(2).expand(b, hp, rows * length, self.keep_index.shape[-1])
            q_kept = query.reshape(b, hp, rows * length, d).gather(-1, idx).reshape(b, hq, length, idx.shape[-1])
            if self.prefix_codes is not None:
                parts.append(polar_lut_scores(q_kept, self.prefix_codes, rows))
            if self.prefix_keys is not None and self.prefix_keys.shape[-2]:
                parts.append(_dot(q_kept, self.prefix_keys, rows))
        if self.main_codes is not None:
            parts.append(polar_lut_scores(query, self.main_codes, num_key_value_groups))
        parts.append(_dot(query, self.keys, num_key_value_groups))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------------------------------------
    # Accounting

    def key_bytes(self, reference_bits: int | None = None) -> int:
        """Bytes held for keys (see the module docstring for ``reference_bits``)."""
        if not self.is_initialized:
            return 0
        self.settle()
        n = _float_bytes(self.keys, reference_bits) + _float_bytes(self.prefix_keys, reference_bits)
        for codes in (self.main_codes, self.prefix_codes):
            if codes is not None:
                n += codes.nbytes(reference_bits)
        if self.keep_index is not None:
            n += self.keep_index.numel() * self.keep_index.element_size()
        return int(n)

    def reference_key_bytes(self, reference_bits: int = 16) -> int:
        """Bytes a plain ``reference_bits`` key cache (the model's KV heads) would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        b, h = self.values.shape[:2]
        return int(b * h * self.cumulative_length * self.head_dim * reference_bits / 8)


class PolarKeyLayer(CompressedKeyLayer):
    """PolarQuant keys (no ThinK): ``Cache(layers=[PolarKeyLayer() for _ in range(n)])``."""

    def __init__(self, group_size: int = 128, residual_length: int = 128, rbits: int = 4, tbits: int = 4,
                 lut: bool = False, flush_order: str = "attend_first"):
        super().__init__(polar=True, think=False, group_size=group_size, residual_length=residual_length,
                         rbits=rbits, tbits=tbits, lut=lut, flush_order=flush_order)


class ThinKLayer(CompressedKeyLayer):
    """ThinK-pruned keys (no quantization); needs a model prepared by ``rlkit.kvcache.prepare_model``."""

    def __init__(self, pruning_ratio: float = 0.4, obs_window: int = 32, recent: int = 32,
                 think_heads: str = "query", think_scored_keys: str = "all"):
        super().__init__(polar=False, think=True, pruning_ratio=pruning_ratio, obs_window=obs_window,
                         recent=recent, think_heads=think_heads, think_scored_keys=think_scored_keys)


class CompressedKVCache(Cache):
    """A ``transformers.Cache`` with one :class:`CompressedKeyLayer` (built with ``layer_kwargs``) per layer."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__(layers=[CompressedKeyLayer(**layer_kwargs) for _ in range(num_layers)])


def key_cache_bytes(cache: Cache, reference_bits: int | None = None) -> int:
    """Bytes held for keys across the layers of ``cache`` (a :class:`CompressedKVCache` or a plain
    ``DynamicCache``). ``reference_bits=None``: real element sizes; ``16``: floating-point tensors counted at
    16 bits per element (integer codes and indices as stored)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedKeyLayer):
            total += layer.key_bytes(reference_bits)
        elif isinstance(layer, DynamicLayer):
            if layer.is_initialized and layer.keys is not None:
                total += _float_bytes(layer.keys, reference_bits)
        else:
            raise TypeError(f"key_cache_bytes: unsupported cache layer {type(layer).__name__}")
    return int(total)


def key_cache_report(cache: Cache, reference_bits: int = 16) -> dict:
    """``{"tokens", "bytes", "bytes_normalized", "reference_bytes", "ratio", "bits_per_element"}``.

    ``bytes``: held now (real sizes); ``bytes_normalized``: floats at ``reference_bits``; ``reference_bytes``: a
    plain ``reference_bits`` key cache of the same tokens; ``ratio = bytes_normalized / reference_bytes``.
    """
    reference = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedKeyLayer):
            reference += layer.reference_key_bytes(reference_bits)
        elif isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None:
            reference += layer.keys.numel() * reference_bits / 8
    normalized = key_cache_bytes(cache, reference_bits)
    ratio = normalized / reference if reference else float("nan")
    return {"tokens": cache.get_seq_length(), "bytes": key_cache_bytes(cache), "bytes_normalized": normalized,
            "reference_bytes": int(reference), "ratio": ratio, "bits_per_element": ratio * reference_bits}
