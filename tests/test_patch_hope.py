"""HoPE patch (rlkit/patches/hope.py): the exact set of zeroed rotary frequencies for a given L_train, the
rotation math against a direct reference (positions beyond L_train included), the cutoff override, patch off
== plain HF, save/reload through rlkit.models, cached generation == uncached, dynamic/scaled rope types and
the Qwen2 / Mistral families."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.compat import cache_kwargs, output_cache
from rlkit.models import build_tiny_model, load_model
from rlkit.patches import apply_patches
from rlkit.patches.hope import hope_keep_mask, resolve_train_length
from rlkit.recipe import ModelSpec, TinyModelSpec

from conftest import TINY_SHAPE

SPEC = TinyModelSpec(**TINY_SHAPE)  # head_dim 16 -> 8 rotary pairs


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """HF's default RoPE frequencies (float32), as ``compute_default_rope_parameters`` builds them."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


@pytest.fixture
def model(char_tokenizer):
    m = build_tiny_model(SPEC, char_tokenizer, seed=0)
    m.eval()
    return m


def batch(tok, texts=("Question: 12+7=?", "Hi")):
    return tok(list(texts), padding=True, return_tensors="pt")


# --------------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("base,dim,length,kept", [
    (1e4, 128, 4096, 46),   # Llama-2
    (5e5, 128, 8192, 35),   # Llama-3 before llama3 scaling
    (1e6, 128, 32768, 40),  # Qwen2/2.5-7B
    (1e6, 64, 32768, 20),   # Qwen2.5-0.5B
    (1e4, 64, 2048, 21),    # small from-scratch model
    (1e4, 64, 512, 16),     # small model at L=512
])
def test_keep_counts_match_spec_table(base, dim, length, kept):
    keep = hope_keep_mask(default_inv_freq(base, dim), train_length=length)
    assert int(keep.sum()) == kept
    # the kept pairs are a prefix: the highest frequencies
    assert keep[:kept].all() and not keep[kept:].any()


def test_exact_zeroed_set_for_train_length(model):
    rot = model.model.rotary_emb
    before = rot.inv_freq.clone()
    # tiny model: theta_j = 1e4 ** (-2j/16) = 10 ** (-j/2); 2*pi/32 = 0.196 -> only j=0 (1.0), j=1 (0.316) rotate
    apply_patches(model, [{"name": "hope", "train_length": 32}])
    expected_zero = [j for j in range(8) if 10 ** (-j / 2) * 32 < 2 * math.pi]
    assert expected_zero == [2, 3, 4, 5, 6, 7]
    for buf in (rot.inv_freq, rot.original_inv_freq):
        zero = (buf == 0).nonzero().flatten().tolist()
        assert zero == expected_zero
        assert torch.equal(buf[:2], before[:2])  # kept frequencies untouched
    assert model.config.rlkit_patches == [{"name": "hope", "train_length": 32}]


def test_default_length_from_config_and_cutoff_override(char_tokenizer):
    m = build_tiny_model(SPEC, char_tokenizer)
    assert resolve_train_length(m.config) == 128
    apply_patches(m, [{"name": "hope"}])  # L = max_position_embeddings = 128: 2*pi/128 = 0.049 -> j = 0, 1, 2
    assert (m.model.rotary_emb.inv_freq != 0).nonzero().flatten().tolist() == [0, 1, 2]

    m = build_tiny_model(SPEC, char_tokenizer)
    apply_patches(m, [{"name": "hope", "train_length": 32, "cutoff": 0.02}])  # cutoff wins over 2*pi/L
    assert (m.model.rotary_emb.inv_freq != 0).nonzero().flatten().tolist() == [0, 1, 2, 3]

    m = build_tiny_model(SPEC, char_tokenizer)
    apply_patches(m, [{"name": "hope", "cutoff": 5.0}])  # nothing qualifies: keep the highest frequency
    assert (m.model.rotary_emb.inv_freq != 0).nonzero().flatten().tolist() == [0]
    with pytest.raises(ValueError, match="train_length must be a positive integer"):
        apply_patches(build_tiny_model(SPEC, char_tokenizer), [{"name": "hope", "train_length": 0}])


# --------------------------------------------------------------------------------------------------
# Math against a direct reference


def reference_hope_rotation(x: torch.Tensor, pos: torch.Tensor, theta: torch.Tensor, keep: torch.Tensor):
    """Rotate pair (j, j + D/2) by pos * theta_j when keep[j], identity otherwise (float64, by hand)."""
    x = x.double()
    half = x.shape[-1] // 2
    out = x.clone()
    for j in range(half):
        if not keep[j]:
            continue
        ang = (pos.float() * theta[j]).double()  # the angle as HF forms it (float32), then exact cos/sin
        c, s = torch.cos(ang), torch.sin(ang)  # [T], broadcast over batch and heads
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * c - b * s
        out[..., j + half] = b * c + a * s
    return out


def test_rotation_matches_reference_beyond_train_length(model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    theta = model.model.rotary_emb.inv_freq.clone()
    apply_patches(model, [{"name": "hope", "train_length": 32}])
    keep = hope_keep_mask(theta, train_length=32)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 16)
    k = torch.randn(1, 2, 6, 16)
    # positions inside and far beyond L_train = 32 (and beyond max_position_embeddings = 128)
    pos = torch.tensor([0, 5, 31, 32, 400, 5000])
    cos, sin = model.model.rotary_emb(q, pos[None])
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_rot.double(), reference_hope_rotation(q, pos, theta, keep), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot.double(), reference_hope_rotation(k, pos, theta, keep), atol=2e-5, rtol=1e-5)
    # position-free dims are exactly the identity at every position (both halves of each pair)
    free = torch.cat([~keep, ~keep])
    assert torch.equal(q_rot[..., free], q[..., free]) and torch.equal(k_rot[..., free], k[..., free])
    assert torch.equal(cos[..., free], torch.ones_like(cos[..., free]))
    assert torch.equal(sin[..., free], torch.zeros_like(sin[..., free]))
    # the kept dims still rotate
    assert not torch.allclose(q_rot[..., ~free], q[..., ~free])


# --------------------------------------------------------------------------------------------------
# Model-level behaviour


def test_patch_off_is_bit_identical(model, char_tokenizer):
    plain = build_tiny_model(SPEC, char_tokenizer, seed=0).eval()
    ids = batch(char_tokenizer)
    ref = plain(**ids).logits
    apply_patches(model, [])
    assert not hasattr(model.config, "rlkit_patches")
    assert torch.equal(model(**ids).logits, ref)
    apply_patches(model, [{"name": "hope", "cutoff": 0.0}])  # zeroes nothing
    assert torch.equal(model(**ids).logits, ref)
    apply_patches(model, [{"name": "hope", "train_length": 32}])
    assert not torch.allclose(model(**ids).logits, ref)


def test_save_reload_keeps_patch(model, char_tokenizer, tmp_path):
    apply_patches(model, [{"name": "hope", "train_length": 32}])
    ids = batch(char_tokenizer)
    ref = model(**ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    char_tokenizer.save_pretrained(tmp_path / "ckpt")
    back, _ = load_model(ModelSpec(name=str(tmp_path / "ckpt")))
    back.eval()
    assert back.config.rlkit_patches == [{"name": "hope", "train_length": 32}]
    assert (back.model.rotary_emb.inv_freq == 0).nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]
    assert torch.equal(back(**ids).logits, ref)


def test_generation_with_cache_equals_without(model, char_tokenizer):
    apply_patches(model, [{"name": "hope", "train_length": 32}])
    ids = batch(char_tokenizer)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
    with_cache = model.generate(**ids, use_cache=True, **kw)
    without = model.generate(**ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    # incremental logits equal the full forward, past L_train = 32
    seq = torch.randint(4, 90, (1, 48))
    full = model(input_ids=seq).logits
    out = model(input_ids=seq[:, :40], use_cache=True)
    steps = [out.logits]
    cache = output_cache(out)
    for t in range(40, 48):
        out = model(input_ids=seq[:, t:t + 1], **cache_kwargs(cache), use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_dynamic_rope_keeps_dims_position_free(char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    apply_patches(m, [{"name": "hope", "train_length": 32}])
    rot = m.model.rotary_emb
    x = torch.zeros(1)
    for length in (16, 300, 16):  # inside, far beyond (inv_freq recomputed), back (reset)
        cos, sin = rot(x, torch.arange(length)[None])
        free = torch.tensor([False, False] + [True] * 6)
        free = torch.cat([free, free])
        assert torch.equal(cos[..., free], torch.ones_like(cos[..., free]))
        assert torch.equal(sin[..., free], torch.zeros_like(sin[..., free]))
        assert sin[..., ~free].abs().sum() > 0


def test_llama3_rope_uses_original_length(char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32})
    m = LlamaForCausalLM(cfg)
    assert resolve_train_length(m.config) == 32
    scaled = m.model.rotary_emb.inv_freq.clone()
    apply_patches(m, [{"name": "hope"}])
    expected = (scaled.double() >= 2 * math.pi / 32)
    assert torch.equal(m.model.rotary_emb.inv_freq != 0, expected)
    assert torch.equal(m.model.rotary_emb.original_inv_freq != 0, expected)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(family, char_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}[family]
    cfg = cfg_cls(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    m = cls(cfg).eval()
    ids = batch(char_tokenizer)
    ref = m(**ids).logits
    apply_patches(m, [{"name": "hope", "train_length": 64}])
    theta = default_inv_freq(1e6, 16)
    assert torch.equal(m.model.rotary_emb.inv_freq != 0, theta.double() >= 2 * math.pi / 64)
    assert not torch.allclose(m(**ids).logits, ref)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
    assert torch.equal(m.generate(**ids, use_cache=True, **kw), m.generate(**ids, use_cache=False, **kw))
