"""ThinK: query-driven key-cache channel pruning (Xu et al., Salesforce; arXiv 2407.21018, ICLR 2025): the math.

After the prefill, ThinK drops the key channels that carry the least attention-logit mass for the prompt's
last queries. Per (batch, head) channel ``c`` gets the score ``||Q_obs[:, c]||^2 * ||K[:, c]||^2`` (the squared
Frobenius norm of the rank-1 product ``Q_obs[:, c] K[:, c]^T``; the official code uses the means of the
squares, which ranks identically), ``Q_obs`` being the last ``obs_window = 32`` prefill queries (post-RoPE).
The top ``D - floor(lambda * D)`` channels are kept (the code removes ``int(D * lambda)`` with
``topk(largest=False)``; ``lambda = pruning_ratio``, 0.4 in the official eval scripts). The last ``recent = 32``
prompt tokens and every generated token keep all ``D`` channels; values are never pruned. Pruned channels are
zero-filled when the keys are handed to attention, which is exact: ``q . (k * m) = q[m] . k[m]``.

This module holds the tensor-level functions; the cache layer (``ThinKLayer``, importable from here too)
lives in :mod:`rlkit.kvcache.cache` and the prefill attention function that feeds it the queries
(``"think_sdpa"``) in :mod:`rlkit.kvcache.attention`.

Two behaviours where the released code (``ThinK_eager``, read for this module) does one thing and rlkit offers
a second one as an option (``KVCacheConfig.think_heads`` / ``think_scored_keys``):

- **Heads on GQA models** (``heads``). ``"query"`` (default) is the released code: it calls ``repeat_kv`` on
  the keys *before* pruning, so every query head ``h`` scores ``||K_kv(h)[:, c]||^2 * ||Q_h[:, c]||^2`` with
  the keys of its KV head ``kv(h) = h // (H / Hkv)`` and keeps its own channels; the pruned prefix is stored
  once per query head (``[B, H, S - recent, T_keep]``), ``H / Hkv`` times the keys of a KV-head cache, so on a
  GQA model ThinK then holds *more* key bytes than the plain cache (the recent and generated tokens, unpruned,
  are stored once per KV head here: the released code keeps those repeated too, which changes no number).
  ``"kv"`` (an rlkit extension, spec: UNCONFIRMED) chooses channels per **KV head** with
  ``score_c = ||K_kv[:, c]||^2 * sum_{h in group} ||Q_h[:, c]||^2`` (the query heads of the group share the
  pruned keys), so the compact keys ``[B, Hkv, S - recent, T_keep]`` really take less memory. With one query
  head per KV head the two modes are the same rule.
- **Which keys are scored** (``n_keys``, from ``think_scored_keys``). ``"all"`` (default) is the released
  eager code: the key norms run over every prompt key, the ``recent`` window included (only the pruning
  spares it). ``"prefix"`` scores only the keys that get pruned (all but the ``recent`` last), which is what
  the released KIVI variant does (it scores the part it quantizes).

Choices made where the paper and the official code are silent:

- **Padding.** The official code runs batch 1. Here padding positions (left padding in a batch) are excluded
  from both the key and the query norms, using the attention mask the prefill attention receives (a position
  is real iff it may attend to itself). With no prefix left (``S <= recent``) nothing is pruned.
- **Pairs, for composition with PolarQuant** (``pairs=True``): PolarQuant quantizes RoPE pairs
  ``(j, j + D/2)``, so the pair score is ``score[j] + score[j + D/2]`` and the top ``P - floor(lambda * P)``
  pairs are kept (``P = D/2``; at ``D = 64``, ``lambda = 0.4``: 20 pairs = 40 channels against 39 for
  channel-wise pruning). The kept channel indices are then ``[pairs..., pairs + D/2...]``, so the compact
  head is itself in ``rotate_half`` layout (its first half pairs with its second half).
- Kept indices are sorted ascending (the order does not change ``q[m] . k[m]``); ties are broken by
  ``torch.topk`` (keeping the largest; the official code removes the smallest, which can break an exact tie
  the other way).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["num_kept", "valid_positions", "think_channel_scores", "think_keep_channels",
           "gather_channels", "zero_fill"]


def __getattr__(name: str) -> Any:
    # The cache layer lives in rlkit.kvcache.cache (which imports this module); re-exported lazily here.
    if name == "ThinKLayer":
        from .cache import ThinKLayer

        return ThinKLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def num_kept(n: int, pruning_ratio: float) -> int:
    """``n - floor(pruning_ratio * n)``: channels (or pairs) kept out of ``n``."""
    return n - int(n * pruning_ratio)


def valid_positions(attention_mask: torch.Tensor | None, batch_size: int, length: int) -> torch.Tensor | None:
    """``[B, length]`` bool, True for real (non-padding) positions of a prefill, from its 4D attention mask.

    The mask is the one the attention function receives (``sdpa_mask``: bool, True = attend; ``eager_mask``:
    additive 0 / dtype-min; ``None``: no padding). Position ``t`` is real iff query ``t`` may attend to key
    ``t`` (the diagonal of the last ``length x length`` block), which holds for left and right padding.
    """
    if attention_mask is None:
        return None
    m = attention_mask[..., -length:, -length:]
    diag = torch.diagonal(m[:, 0], dim1=-2, dim2=-1)                     # [B or 1, length]
    if diag.dtype != torch.bool:
        diag = diag > torch.finfo(diag.dtype).min / 2
    return diag.expand(batch_size, length)


def think_channel_scores(query: torch.Tensor, key: torch.Tensor, num_key_value_groups: int, n_keys: int,
                         obs_window: int = 32, valid: torch.Tensor | None = None, heads: str = "query"
                         ) -> torch.Tensor:
    """Channel scores (float32): ``[B, Hq, D]`` per query head (``heads="query"``) or ``[B, Hkv, D]`` per KV
    head (``heads="kv"``); see the module docstring.

    ``query[B, Hq, S, D]`` and ``key[B, Hkv, S, D]`` are the post-RoPE prefill states; the keys scored are
    positions ``:n_keys``, the queries the last ``obs_window``; ``valid[B, S]`` masks out padding. Query head
    ``h`` belongs to KV head ``h // num_key_value_groups`` (HF's ``repeat_kv`` order).
    """
    if heads not in ("query", "kv"):
        raise ValueError(f"think_channel_scores: heads must be 'query' or 'kv', got {heads!r}")
    b, hq, s, d = query.shape
    h = key.shape[1]
    if hq != h * num_key_value_groups:
        raise ValueError(f"think_channel_scores: {hq} query heads != {h} KV heads x {num_key_value_groups}")
    k = key[:, :, :n_keys].float()
    q = query[:, :, -obs_window:].float()
    if valid is not None:
        k = k * valid[:, None, :n_keys, None].to(k.dtype)
        q = q * valid[:, None, -obs_window:, None].to(q.dtype)
    k2 = k.square().sum(2)                                                # [B, Hkv, D]
    q2 = q.square().sum(2)                                                # [B, Hq, D]
    if heads == "query":
        return k2.repeat_interleave(num_key_value_groups, dim=1) * q2
    return k2 * q2.reshape(b, h, num_key_value_groups, d).sum(2)


def think_keep_channels(scores: torch.Tensor, pruning_ratio: float, pairs: bool = False) -> torch.Tensor:
    """Sorted indices ``[B, H, T_keep]`` (int64) of the kept channels of ``scores[B, H, D]`` (see the module
    docstring)."""
    d = scores.shape[-1]
    if not pairs:
        keep = torch.topk(scores, num_kept(d, pruning_ratio), dim=-1).indices
        return keep.sort(dim=-1).values
    half = d // 2
    pair_scores = scores[..., :half] + scores[..., half:]
    keep = torch.topk(pair_scores, num_kept(half, pruning_ratio), dim=-1).indices.sort(dim=-1).values
    return torch.cat([keep, keep + half], dim=-1)


def gather_channels(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``keys[B, H, T, D]`` -> ``[B, H, T, T_keep]`` at the channels ``index[B, H, T_keep]``."""
    idx = index.long().unsqueeze(2).expand(*keys.shape[:3], index.shape[-1])
    return keys.gather(-1, idx)


def zero_fill(compact: torch.Tensor, index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``compact[B, H, T, T_keep]`` scattered into zeros ``[B, H, T, head_dim]`` at ``index[B, H, T_keep]``."""
    full = compact.new_zeros(*compact.shape[:3], head_dim)
    idx = index.long().unsqueeze(2).expand_as(compact)
    return full.scatter_(-1, idx, compact)
