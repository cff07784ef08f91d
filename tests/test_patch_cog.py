"""Cog attention patch (rlkit/patches/cog.py): the math against a direct reference on random tensors (GQA,
padding, causal shortcut, decoding), hand-written gradients against autograd and finite differences,
softmax layers bit-identical to plain HF (eager and SDPA), patch off == plain HF, training-mode gradients,
save/reload through rlkit.models, cached generation == uncached with a padding mask, Qwen2 / Mistral, and
the benchmark's smoke run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlkit.compat import cache_kwargs, output_cache
from rlkit.models import build_tiny_model, load_model
from rlkit.patches import apply_patches
from rlkit.patches.cog import cog_attention, cog_attention_reference, cog_layers
from rlkit.recipe import ModelSpec, TinyModelSpec

from conftest import TINY_SHAPE, result_fields, subprocess_env

SPEC = TinyModelSpec(**dict(TINY_SHAPE, num_hidden_layers=4))  # GQA: 2 query heads per kv head


def make(tok, impl="sdpa", spec=SPEC):
    m = build_tiny_model(spec, tok, seed=0)
    m.set_attn_implementation(impl)
    return m.eval()


def batch(tok, texts=("Question: 12+7=? Answer:", "Hi")):
    return tok(list(texts), padding=True, return_tensors="pt")  # left padding


# --------------------------------------------------------------------------------------------------
# Math


def direct_reference(q, k, v, allowed, scaling):
    """A = sign(P) exp(|P|) / sum_{allowed} exp(|P|), o = A V, with explicit GQA indexing (float64)."""
    b, h, tq, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // group].double(), v[bi, hi // group].double()
            p = q[bi, hi].double() @ kh.T * scaling
            e = torch.exp(p.abs()) * allowed[bi]
            a = torch.sign(p) * e / e.sum(-1, keepdim=True)
            out[bi, :, hi] = a @ vh
    return out


def random_qkv(b=2, h=4, hkv=2, tq=6, tk=6, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    return q, k, v


def test_math_against_direct_reference_gqa_padding_and_decode():
    from transformers.masking_utils import eager_mask, sdpa_mask

    q, k, v = random_qkv()
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False  # left padding in row 1
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None] & pad[:, None, :]
    real = pad  # compare only real query rows (fully masked pad rows have no defined Cog weights)
    ref = direct_reference(q, k, v, allowed, 0.35)
    masks = {"eager": eager_mask(2, 6, 6, attention_mask=pad, dtype=torch.float64),
             "sdpa_bool": sdpa_mask(2, 6, 6, attention_mask=pad)}
    for name, mask in masks.items():
        for out in (cog_attention(q, k, v, mask, 0.35), cog_attention_reference(q, k, v, mask, 0.35)[0]):
            torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-10, msg=name)
    # SDPA's causal shortcut (mask None) = full causal mask
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None].expand(2, 6, 6)
    torch.testing.assert_close(cog_attention(q, k, v, None, 0.35), direct_reference(q, k, v, causal, 0.35))
    # decoding: one query against 6 cached keys, with and without a padding mask
    q1 = q[:, :, -1:]
    dec = eager_mask(2, 1, 6, q_offset=5, attention_mask=pad, dtype=torch.float64)
    torch.testing.assert_close(cog_attention(q1, k, v, dec, 0.35), ref[:, -1:])
    torch.testing.assert_close(cog_attention(q1[:1], k[:1], v[:1], None, 0.35), ref[:1, -1:])
    # weights: signed, |A| rows sum to one, sign row sum in [-1, 1]
    _, a = cog_attention_reference(q, k, v, masks["eager"], 0.35)
    torch.testing.assert_close(a.abs().sum(-1)[0], torch.ones(4, 6, dtype=torch.float64))
    assert (a < 0).any() and (a.sum(-1).abs() <= 1 + 1e-12).all()


def test_fused_gradients_match_autograd_and_finite_differences():
    from transformers.masking_utils import eager_mask

    q, k, v = (t.requires_grad_() for t in random_qkv(tq=5, tk=5))
    mask = eager_mask(2, 5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: cog_attention(q, k, v, mask, 0.35), (q, k, v))
    pad = torch.ones(2, 5, dtype=torch.bool)
    pad[0, :1] = False
    mask = eager_mask(2, 5, 5, attention_mask=pad, dtype=torch.float64)
    g = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    fused = torch.autograd.grad(cog_attention(q, k, v, mask, 0.35), (q, k, v), g)
    plain = torch.autograd.grad(cog_attention_reference(q, k, v, mask, 0.35)[0], (q, k, v), g)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_float32_and_bfloat16_close_to_float64():
    q, k, v = random_qkv(tq=16, tk=16, d=16, dtype=torch.float64, seed=1)
    ref = cog_attention(q, k, v, None, 0.25)
    out32 = cog_attention(q.float(), k.float(), v.float(), None, 0.25)
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    out16 = cog_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 0.25)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), ref, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------------------
# Per-layer dispatch and patch off


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_patch_off_and_softmax_layers_bit_identical(impl, char_tokenizer):
    ids = batch(char_tokenizer)
    plain = make(char_tokenizer, impl)
    ref = plain(**ids).logits

    off = make(char_tokenizer, impl)
    apply_patches(off, [])
    assert torch.equal(off(**ids).logits, ref)
    apply_patches(off, [{"name": "cog", "layers": []}])  # registered, but no Cog layer
    assert off.config._attn_implementation == {"eager": "cog", "sdpa": "cog_sdpa"}[impl]
    assert torch.equal(off(**ids).logits, ref)

    patched = make(char_tokenizer, impl)
    apply_patches(patched, [{"name": "cog"}])
    assert cog_layers(patched) == [1, 2]  # default: all but the first and the last
    assert not torch.allclose(patched(**ids).logits, ref)
    # the softmax layers (0 and 3) run exactly the original attention: same inputs -> bit-identical outputs
    seen = {}

    def grab(i):
        def hook(mod, args, kwargs, out):
            seen[i] = (args, kwargs, out[0])
        return hook

    handles = [patched.model.layers[i].self_attn.register_forward_hook(grab(i), with_kwargs=True) for i in (0, 3)]
    patched(**ids, use_cache=False)
    for h in handles:
        h.remove()
    for i in (0, 3):
        args, kwargs, out = seen[i]
        expected = plain.model.layers[i].self_attn(*args, **kwargs)[0]
        assert torch.equal(out, expected), f"layer {i}"


def test_layer_options_and_errors(char_tokenizer):
    m = make(char_tokenizer)
    apply_patches(m, [{"name": "cog", "layers": [0, -1]}])
    assert cog_layers(m) == [0, 3]
    assert m.config.rlkit_patches == [{"name": "cog", "layers": [0, -1]}]
    two = TinyModelSpec(**TINY_SHAPE)
    with pytest.raises(ValueError, match="leaves no Cog layer"):
        apply_patches(make(char_tokenizer, spec=two), [{"name": "cog"}])
    with pytest.raises(ValueError, match="out of range"):
        apply_patches(make(char_tokenizer), [{"name": "cog", "layers": [4]}])
    with pytest.raises(ValueError, match="kernel must be one of"):
        apply_patches(make(char_tokenizer), [{"name": "cog", "kernel": "triton"}])
    flash = make(char_tokenizer)
    flash.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="'eager' or 'sdpa'"):
        apply_patches(flash, [{"name": "cog"}])


# --------------------------------------------------------------------------------------------------
# Training, save/reload, generation


def test_training_gradients_fused_equal_autograd_reference(char_tokenizer):
    ids = batch(char_tokenizer, ["Question: 3*4=? Answer: 12", "Answer: 7"])
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    grads = {}
    for kernel in ("fused", "autograd"):
        m = make(char_tokenizer)
        apply_patches(m, [{"name": "cog", "kernel": kernel}])
        m.train()
        loss = m(**ids, labels=labels).loss
        loss.backward()
        grads[kernel] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(grads["fused"][0], grads["autograd"][0], atol=1e-6, rtol=1e-6)
    for name, g in grads["fused"][1].items():
        torch.testing.assert_close(g, grads["autograd"][1][name], atol=1e-6, rtol=1e-4, msg=name)
    # the Cog layers' projections do get gradient
    assert grads["fused"][1]["model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0


def test_save_reload_keeps_patch(char_tokenizer, tmp_path):
    m = make(char_tokenizer)
    apply_patches(m, [{"name": "cog", "layers": [1]}])
    ids = batch(char_tokenizer)
    ref = m(**ids).logits
    m.save_pretrained(tmp_path / "ckpt")
    char_tokenizer.save_pretrained(tmp_path / "ckpt")
    back, _ = load_model(ModelSpec(name=str(tmp_path / "ckpt")))
    back.eval()
    assert back.config.rlkit_patches == [{"name": "cog", "layers": [1]}]
    assert back.config._attn_implementation == "cog_sdpa" and cog_layers(back) == [1]
    assert torch.equal(back(**ids).logits, ref)
    # loaded by name, without rlkit (as TRL builds a reference model): the layers come from the config
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="cog_sdpa").eval()
    assert cog_layers(ref_model) == [1]
    assert torch.equal(ref_model(**ids).logits, ref)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generation_with_cache_equals_without_padding(impl, char_tokenizer):
    m = make(char_tokenizer, impl)
    apply_patches(m, [{"name": "cog"}])
    ids = batch(char_tokenizer)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
    assert torch.equal(m.generate(**ids, use_cache=True, **kw), m.generate(**ids, use_cache=False, **kw))
    # incremental logits with a cache and a padding mask equal the full forward
    seq, mask = ids["input_ids"], ids["attention_mask"]
    full = m(input_ids=seq, attention_mask=mask).logits
    n = seq.shape[1] - 5
    out = m(input_ids=seq[:, :n], attention_mask=mask[:, :n], use_cache=True)
    steps, cache = [out.logits], output_cache(out)
    for t in range(n, seq.shape[1]):
        out = m(input_ids=seq[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwargs(cache), use_cache=True)
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(family, char_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}[family]
    cfg = cfg_cls(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
    torch.manual_seed(0)
    m = cls(cfg).eval()
    ids = batch(char_tokenizer)
    ref = m(**ids).logits
    apply_patches(m, [{"name": "cog"}])
    assert cog_layers(m) == [1]
    out = m(**ids).logits
    assert not torch.allclose(out, ref)
    m.model.layers[1].self_attn.rlkit_cog_kernel = "autograd"
    torch.testing.assert_close(m(**ids).logits, out, atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
    assert torch.equal(m.generate(**ids, use_cache=True, **kw), m.generate(**ids, use_cache=False, **kw))


def test_bench_smoke(repo_root, data_dir):
    env = subprocess_env(RLKIT_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "cog_attention.py"), "--smoke", "--hidden", "32",
                           "--layers", "3", "--batch", "2"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = result_fields(proc.stdout)
    for key in ("cog_step_ratio", "eager_step_s", "sdpa_step_s", "cog_step_s", "loss_eager", "loss_cog"):
        assert float(res[key]) > 0, key
    assert abs(float(res["loss_eager"]) - float(res["loss_sdpa"])) < 1e-3  # same math, same batches
    assert "cog / eager softmax step time" in proc.stdout
