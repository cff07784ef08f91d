"""Compressed key caches for generation: PolarQuant (arXiv 2502.00527), ThinK (arXiv 2407.21018) and both.

Post-hoc (no training): the *key* half of a Llama/Qwen2-family model's KV cache shrinks during ``generate``;
values stay whole. ``polarquant`` stores each RoPE pair of a key as a quantized radius and angle (:mod:`.polar`),
``think`` prunes key channels after the prefill, per query head as the released code or per KV head
(:mod:`.think`), ``both`` does the two (:mod:`.cache`). Use::

    from rlkit.compat import cache_kwargs         # cache= from transformers 5.24 on, past_key_values= before
    from rlkit.kvcache import KVCacheConfig, make_cache, prepare_model
    cfg = KVCacheConfig(kind="polarquant")
    prepare_model(model, cfg)                      # hooks + attention switch when needed; idempotent
    out = model.generate(**enc, **cache_kwargs(make_cache(model, cfg)), max_new_tokens=64)

``make_cache`` is called for every ``generate`` call (``None`` for ``kind="none"``); :func:`wrap_generate` and
:func:`kv_compression` do both steps; :func:`restore_model` undoes :func:`prepare_model`. ``docs/methods/kvcache.md``
has what each method stores, what ``prepare_model`` changes and why, the choices made where the papers are
silent, and the measured results (``bench/kv_cache.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

__all__ = ["KVCacheConfig", "KINDS", "THINK_HEADS", "THINK_SCORED_KEYS", "FLUSH_ORDERS", "prepare_model", "restore_model", "make_cache", "wrap_generate",
           "kv_compression", "key_cache_bytes", "key_cache_report", "attention_for"]

KINDS = ("none", "polarquant", "think", "both")
THINK_HEADS = ("query", "kv")
THINK_SCORED_KEYS = ("all", "prefix")
FLUSH_ORDERS = ("attend_first", "quantize_first")
_STATE_ATTR = "_rlkit_kvcache_state"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class KVCacheConfig:
    """Key-cache compression for ``generate`` (see the module docstring).

    - ``kind``: ``"none"`` | ``"polarquant"`` | ``"think"`` | ``"both"``.
    - PolarQuant: ``group_size`` tokens per quantization group (128), ``residual_length`` full-precision tokens
      before a flush (128, ``>= group_size``), ``rbits`` / ``tbits`` radius / angle bits (4 / 4, each 1..8),
      ``lut`` table-lookup decode attention (``False``: dequantize; needs a PolarQuant kind),
      ``flush_order``: when a decode step fills the residual, ``"attend_first"`` (default, the released code)
      lets that step attend to the full-precision keys and quantizes them right after; ``"quantize_first"``
      quantizes before the step attends (rlkit before issue 20).
    - ThinK: ``pruning_ratio`` fraction of key channels removed (0.4, ``[0, 1)``), ``obs_window`` prompt
      queries scored (32), ``recent`` last prompt tokens kept whole (32), ``think_heads``: ``"query"``
      (default, the released code: channels chosen per query head, the pruned keys stored once per query
      head) or ``"kv"`` (one choice per KV head shared by its query heads: smaller on GQA models),
      ``think_scored_keys``: ``"all"`` (default, the released eager code: every prompt key, the recent window
      included, enters the channel scores) or ``"prefix"`` (only the keys that get pruned, as the released
      KIVI variant).
    """

    kind: str = "none"
    group_size: int = 128
    residual_length: int = 128
    rbits: int = 4
    tbits: int = 4
    lut: bool = False
    pruning_ratio: float = 0.4
    obs_window: int = 32
    recent: int = 32
    # issue 20 (appended, so positional use of the older fields is unchanged)
    flush_order: str = "attend_first"
    think_heads: str = "query"
    think_scored_keys: str = "all"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kv cache kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"kv cache group_size must be a positive integer, got {self.group_size!r}")
        if not _is_int(self.residual_length) or self.residual_length < self.group_size:
            raise ValueError(f"kv cache residual_length must be an integer >= group_size ({self.group_size}), "
                             f"got {self.residual_length!r}")
        for name in ("rbits", "tbits"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= 8:
                raise ValueError(f"kv cache {name} must be an integer in 1..8, got {v!r}")
        if not isinstance(self.lut, bool):
            raise ValueError(f"kv cache lut must be true or false, got {self.lut!r}")
        if self.lut and self.kind == "think":
            raise ValueError("kv cache lut=True is the PolarQuant table-lookup decode: it needs kind "
                             "'polarquant' or 'both', not 'think'")
        if isinstance(self.pruning_ratio, bool) or not isinstance(self.pruning_ratio, (int, float)) \
                or not 0 <= self.pruning_ratio < 1:
            raise ValueError(f"kv cache pruning_ratio must be a number in [0, 1), got {self.pruning_ratio!r}")
        if not _is_int(self.obs_window) or self.obs_window < 1:
            raise ValueError(f"kv cache obs_window must be a positive integer, got {self.obs_window!r}")
        if not _is_int(self.recent) or self.recent < 0:
            raise ValueError(f"kv cache recent must be an integer >= 0, got {self.recent!r}")
        for name, allowed in (("flush_order", FLUSH_ORDERS), ("think_heads", THINK_HEADS),
                              ("think_scored_keys", THINK_SCORED_KEYS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"kv cache {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def polar(self) -> bool:
        return self.kind in ("polarquant", "both")

    @property
    def think(self) -> bool:
        return self.kind in ("think", "both")

    def to_dict(self) -> dict:
        return asdict(self)

    def layer_kwargs(self) -> dict:
        """Keyword arguments of :class:`rlkit.kvcache.cache.CompressedKeyLayer`."""
        return {"polar": self.polar, "think": self.think, "group_size": self.group_size,
                "residual_length": self.residual_length, "rbits": self.rbits, "tbits": self.tbits,
                "lut": self.lut, "flush_order": self.flush_order, "pruning_ratio": float(self.pruning_ratio),
                "obs_window": self.obs_window, "recent": self.recent, "think_heads": self.think_heads,
                "think_scored_keys": self.think_scored_keys}


def attention_for(config: KVCacheConfig) -> str | None:
    """The attention implementation ``config`` needs (``None``: the model's own one works)."""
    if config.lut and config.polar:
        return "polar_lut"
    if config.think:
        return "think_sdpa"
    return None


def _configs(model: Any) -> list[Any]:
    """The distinct HF config objects of the model and its attention modules."""
    from .attention import attention_modules

    seen: dict[int, Any] = {}
    for cfg in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in attention_modules(model)]:
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _set_attention(model: Any, name: str | None) -> None:
    for cfg in _configs(model):
        cfg._attn_implementation = name


def prepare_model(model: Any, config: KVCacheConfig) -> Any:
    """Install what ``config`` needs on ``model`` (idempotent) and return it; see the module docstring."""
    from .attention import STANDARD_IMPLEMENTATIONS, install_hooks, register_attention

    name = attention_for(config)
    if name is None:
        restore_model(model)
        return model
    register_attention()
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        current = model.config._attn_implementation
        if current is not None and current not in STANDARD_IMPLEMENTATIONS \
                and not str(current).startswith("flash_attention"):
            raise ValueError(f"rlkit.kvcache: the model uses the custom attention implementation {current!r} "
                             "(another patch?); KV-cache compression would replace it")
        state = {"previous": current, "handles": install_hooks(model)}
        setattr(model, _STATE_ATTR, state)
    _set_attention(model, name)
    state["config"] = config
    return model


def restore_model(model: Any) -> Any:
    """Undo :func:`prepare_model` (hooks removed, previous attention implementation back); a no-op otherwise."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    from .attention import remove_hooks

    remove_hooks(model, state["handles"])
    _set_attention(model, state["previous"])
    delattr(model, _STATE_ATTR)
    return model


def make_cache(model: Any, config: KVCacheConfig) -> Any:
    """A fresh cache for one ``generate`` call (``None`` for ``kind="none"``)."""
    if config.kind == "none":
        return None
    from .cache import ATTENTION_NAMES, CompressedKVCache

    if attention_for(config) is not None and model.config._attn_implementation not in ATTENTION_NAMES:
        raise ValueError(f"rlkit.kvcache: kind={config.kind!r} (lut={config.lut}) needs the model prepared with "
                         "rlkit.kvcache.prepare_model(model, config) first")
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("rlkit.kvcache supports full-attention layers only; this model has layer types "
                         f"{sorted(set(layer_types))}")
    return CompressedKVCache(text.num_hidden_layers, **config.layer_kwargs())


def wrap_generate(model: Any, config: KVCacheConfig) -> Callable[..., Any]:
    """Prepare ``model`` and return ``generate(**kwargs)`` that passes a fresh cache to ``model.generate``
    (unless the call gives a cache itself, under either name)."""
    from ..compat import cache_from_call, cache_kwarg

    prepare_model(model, config)
    base_generate = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        if cache_from_call((), kwargs) is None:
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            kwargs[cache_kwarg()] = make_cache(model, config)
        return base_generate(*args, **kwargs)

    return generate


@contextlib.contextmanager
def kv_compression(model: Any, config: KVCacheConfig) -> Iterator[Any]:
    """Within the block ``model.generate`` uses a fresh compressed cache per call; on exit the model goes back
    to its previous preparation (or is restored when it had none)."""
    state = getattr(model, _STATE_ATTR, None)
    previous = state["config"] if state else None
    model.generate = wrap_generate(model, config)
    try:
        yield model
    finally:
        del model.generate
        if previous is None:
            restore_model(model)
        else:
            prepare_model(model, previous)


def key_cache_bytes(cache: Any, reference_bits: int | None = None) -> int:
    """Bytes held for keys by ``cache`` (:func:`rlkit.kvcache.cache.key_cache_bytes`)."""
    from .cache import key_cache_bytes as _bytes

    return _bytes(cache, reference_bits)


def key_cache_report(cache: Any, reference_bits: int = 16) -> dict:
    """Key bytes, 16-bit-normalised bytes, the plain 16-bit reference and their ratio
    (:func:`rlkit.kvcache.cache.key_cache_report`)."""
    from .cache import key_cache_report as _report

    return _report(cache, reference_bits)
