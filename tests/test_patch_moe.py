"""MoE patches (rlkit/patches/moe.py): AoE and top-K MoE layers against a naive per-token reference (outputs
and selected experts), which experts get gradient, the aux loss (convention, padding, HF Mixtral cross-check,
balanced / collapsed cases), upcycling == dense on tiny Llama and Qwen2, padding invariance, cached
generation, bf16, defaults / parameter matching, option validation, state-dict round trip and the
one-call-per-expert dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlkit.models import build_tiny_model
from rlkit.patches import apply_patches
from rlkit.patches import auxiliary_loss
from rlkit.patches.moe import (AoEMoE, TopKMoE, dispatch, matched_aoe_width, moe_modules,
                               moe_stats)
from rlkit.recipe import TinyModelSpec

from conftest import TINY_SHAPE

SPEC = TinyModelSpec(**TINY_SHAPE)


def aux_weighted(model):
    """The weighted auxiliary loss rlkit's trainers add (``rlkit.patches.auxiliary_loss``)."""
    return auxiliary_loss(model)[0]


@pytest.fixture
def model(char_tokenizer):
    return build_tiny_model(SPEC, char_tokenizer, seed=0).eval()


def make_layer(kind: str, n: int = 6, k: int = 2, renormalize: bool = True, d: int = 16, width: int = 12,
               r: int = 5, std: float = 0.3, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if kind == "aoe":
        layer = AoEMoE(d, width, n, k, d_low=r, renormalize=renormalize, init_std=std, **kw)
    else:
        layer = TopKMoE(d, width, n, k, renormalize=renormalize, init_std=std, **kw)
    return layer.double()


def reference(layer, x: torch.Tensor):
    """Naive per-token MoE: every expert's full output, scores, softmax, top-K, combine."""
    n, k = layer.num_experts, layer.top_k
    outs, chosen = [], []
    for xt in x:
        if isinstance(layer, AoEMoE):
            r = layer.d_low
            acts = [xt @ layer.w_down[:, e * r:(e + 1) * r] for e in range(n)]
            scores = torch.stack([a.norm() for a in acts])
            full = [(F.silu(acts[e] @ layer.w_up[e]) * (xt @ layer.w_p[e])) @ layer.w_o[e] for e in range(n)]
        else:
            scores = xt @ layer.w_router
            full = [(F.silu(xt @ layer.w_g[e]) * (xt @ layer.w_p[e])) @ layer.w_o[e] for e in range(n)]
        p = torch.softmax(scores, dim=0)
        top = sorted(range(n), key=lambda e: -float(p[e].detach()))[:k]
        w = p[top]
        if layer.renormalize:
            w = w / w.sum()
        outs.append(sum(w[j] * full[top[j]] for j in range(k)))
        chosen.append(top)
    return torch.stack(outs), chosen


def batch(tok, texts=("Hello there, world!", "Hi!")):
    enc = tok(list(texts), padding=True, return_tensors="pt")
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc


# --------------------------------------------------------------------------------------------------
# Layer math


@pytest.mark.parametrize("kind", ["aoe", "moe"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_layer_matches_per_token_reference(kind, renormalize, k):
    layer = make_layer(kind, k=k, renormalize=renormalize)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out = layer(x)
    ref, chosen = reference(layer, x.reshape(-1, 16))
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(-1, 16), ref, atol=1e-12, rtol=1e-10)
    routing = layer.route(x.reshape(-1, 16))
    assert routing.experts.tolist() == chosen
    assert len({e for row in chosen for e in row}) > 2  # the batch really spreads over experts
    if renormalize:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(18, dtype=torch.float64))
    if kind == "aoe":  # scores are the norms of the per-expert slices of C = x W_down
        c = x.reshape(-1, 16) @ layer.w_down
        norms = torch.stack([c[:, e * 5:(e + 1) * 5].norm(dim=-1) for e in range(6)], -1)
        torch.testing.assert_close(routing.scores, norms)


def _expert_grads(layer, names):
    return {name: getattr(layer, name).grad for name in names}


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_gradients_reach_only_selected_experts(kind):
    body = ("w_up", "w_p", "w_o") if kind == "aoe" else ("w_g", "w_p", "w_o")
    for renormalize, with_aux in ((False, False), (True, False), (True, True)):
        layer = make_layer(kind, n=8, k=2, renormalize=renormalize)
        x = torch.randn(3, 16, dtype=torch.float64)
        out = layer(x)
        loss = (out * torch.randn_like(out)).sum()
        if with_aux:
            loss = loss + layer.aux_loss
        loss.backward()
        used = sorted({int(e) for e in layer.route(x).experts.flatten()})
        unused = [e for e in range(8) if e not in used]
        assert unused and used
        grads = _expert_grads(layer, body)
        for name, g in grads.items():
            assert torch.all(g[unused] == 0), (name, renormalize)  # never selected: exactly no gradient
            assert all(g[e].abs().sum() > 0 for e in used), name
        if kind == "aoe":  # per-expert columns of W_down
            gd = layer.w_down.grad.view(16, 8, 5).abs().sum(dim=(0, 2))
        else:  # per-expert router columns
            gd = layer.w_router.grad.abs().sum(dim=0)
        assert all(gd[e] > 1e-6 for e in used)
        if renormalize and not with_aux:
            # the softmax denominator cancels in w_k = p_k / sum_topK p: unselected scores get no gradient
            assert gd[unused].max() < 1e-12 * gd[used].max()
        else:
            # without renormalization (or through the aux loss's P_i) every expert's score matters
            assert all(gd[e] > 1e-6 * gd[used].max() for e in unused)


def test_empty_input_and_single_expert_batch():
    layer = make_layer("aoe")
    out = layer(torch.zeros(0, 16, dtype=torch.float64, requires_grad=True))
    assert out.shape == (0, 16)
    assert float(layer.aux_loss.detach()) == 0.0
    # every token on one expert (K = 1, one-hot router): backward works, other experts get zero gradient
    moe = make_layer("moe", n=4, k=1)
    with torch.no_grad():
        moe.w_router.zero_()
        moe.w_router[:, 2] = 5.0
    x = torch.rand(7, 16, dtype=torch.float64) + 0.1
    moe(x).sum().backward()
    assert moe.last_load.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert moe.w_p.grad[[0, 1, 3]].abs().sum() == 0 and moe.w_p.grad[2].abs().sum() > 0


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_dispatch_calls_each_expert_once(kind, monkeypatch):
    layer = make_layer(kind, n=8, k=2, d=64, width=32, r=16).float()
    calls = []
    original = layer.expert_forward

    def counting(e, x_e, *rest):
        calls.append((e, x_e.shape[0]))
        return original(e, x_e, *rest)

    monkeypatch.setattr(layer, "expert_forward", counting)
    x = torch.randn(4, 1024, 64)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == x.shape
    experts = [e for e, _ in calls]
    assert experts == sorted(set(experts)) and len(experts) <= 8  # one GEMM chain per expert, in order
    assert sum(rows for _, rows in calls) == 4096 * 2  # every (token, slot) assignment, batched
    load = layer.last_load
    assert [rows / 8192 for _, rows in calls] == pytest.approx([float(load[e]) for e in experts])


def test_dispatch_combines_weighted_assignments():
    x = torch.arange(5.0).unsqueeze(-1).repeat(1, 3)  # token t's row is t
    experts = torch.tensor([[1, 0], [1, 1], [2, 0], [0, 2], [1, 0]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.3, 0.7], [0.9, 0.1]])
    seen = []

    def fn(e, tokens):
        seen.append((e, tokens.tolist()))
        return x[tokens] * (e + 1)  # expert e multiplies by e + 1

    out = dispatch(x, experts, weights, 4, fn)
    assert seen == [(0, [0, 2, 3, 4]), (1, [0, 1, 1, 4]), (2, [2, 3])]  # expert 3 has no token: skipped
    expected = torch.stack([(weights[t] * (experts[t] + 1).float()).sum() * t for t in range(5)])
    torch.testing.assert_close(out, expected.unsqueeze(-1).repeat(1, 3))


# --------------------------------------------------------------------------------------------------
# Aux loss


def test_aux_loss_balanced_collapsed_and_hf_convention():
    layer = make_layer("moe", n=4, k=1, d=8)
    with torch.no_grad():
        layer.w_router.zero_()
        layer.w_router[:4, :4] = 3.0 * torch.eye(4, dtype=torch.float64)
    eye = torch.eye(8, dtype=torch.float64)[:4]
    layer(eye.repeat(2, 1))  # token t -> expert t mod 4, each expert equally often, P_i = 1/4 by symmetry
    assert float(layer.aux_loss.detach()) == pytest.approx(1.0, abs=1e-12)
    assert layer.last_load.tolist() == [0.25] * 4
    assert moe_stats(layer)["moe/load_entropy"] == pytest.approx(1.0)
    layer(eye[:1].repeat(8, 1))  # all tokens -> expert 0
    p0 = torch.softmax(torch.tensor([3.0, 0, 0, 0], dtype=torch.float64), 0)[0]
    aux = float(layer.aux_loss.detach())
    assert aux == pytest.approx(4 * float(p0), rel=1e-9) and aux > 2.0
    assert moe_stats(layer)["moe/load_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert moe_stats(layer)["moe/load_max"] == pytest.approx(4.0)

    # HF Mixtral's load_balancing_loss_func (same as the AoE reference moe.py) is K times ours
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = make_layer("moe", n=6, k=2)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :2] = 0
    layer.token_mask = mask
    layer(x)
    logits = layer.route(x.reshape(-1, 16)).scores
    hf = load_balancing_loss_func((logits,), 6, 2, attention_mask=mask)
    torch.testing.assert_close(layer.aux_loss * 2, hf.to(layer.aux_loss.dtype))
    layer.token_mask = None
    layer(x)
    torch.testing.assert_close(layer.aux_loss * 2, load_balancing_loss_func((logits,), 6, 2).to(torch.float64))


def test_moe_aux_loss_and_stats_on_model(model, char_tokenizer):
    ids = batch(char_tokenizer)
    assert aux_weighted(model) is None and moe_stats(model) == {}
    apply_patches(model, [{"name": "aoe", "num_experts": 4, "top_k": 2}])
    assert aux_weighted(model) is None  # no forward yet
    model(**ids)
    assert aux_weighted(model) is None  # coefficient 0: logged, not added
    stats = moe_stats(model)
    assert set(stats) == {"moe/aux_loss", "moe/load_entropy", "moe/load_max"}
    assert stats["moe/aux_loss"] >= 1.0 - 1e-6 and 0 < stats["moe/load_entropy"] <= 1

    m2 = build_tiny_model(SPEC, char_tokenizer, seed=0)
    apply_patches(m2, [{"name": "aoe", "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.05}])
    assert len(moe_modules(m2)) == 2 and m2._rlkit_moe_modules == moe_modules(m2)
    captured = {}
    for layer in moe_modules(m2):
        layer.register_forward_hook(lambda mod, args, out: captured.__setitem__(mod.layer_idx, args[0].detach()))
    m2(**ids)
    total = aux_weighted(m2)
    assert total.requires_grad
    # recompute L_aux = n * sum f_i P_i from each layer's input over the real tokens
    mask = ids["attention_mask"].reshape(-1).bool()
    expected = 0.0
    for layer in moe_modules(m2):
        x = captured[layer.layer_idx].reshape(-1, 64)[mask]
        with torch.no_grad():
            routing = layer.route(x)
        f = torch.bincount(routing.experts.flatten(), minlength=4).double() / (x.shape[0] * 2)
        expected += 0.05 * 4 * float((f * routing.probs.double().mean(0)).sum())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert moe_modules(m2)[0].w_down.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Model-level behaviour


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_upcycled_single_expert_equals_dense(kind, model, char_tokenizer):
    ids = batch(char_tokenizer)
    dense = model(**ids).logits
    patched = build_tiny_model(SPEC, char_tokenizer, seed=0).eval()
    apply_patches(patched, [{"name": kind, "num_experts": 1, "top_k": 1, "upcycle": True}])
    mlp = patched.model.layers[0].mlp
    assert mlp.expert_size == 128 and (kind == "moe" or mlp.d_low == 64)
    torch.testing.assert_close(patched(**ids).logits, dense, atol=1e-4, rtol=1e-4)
    # several identical experts (no noise) with renormalized weights: still the dense model
    same = build_tiny_model(SPEC, char_tokenizer, seed=0).eval()
    apply_patches(same, [{"name": kind, "num_experts": 4, "top_k": 2, "upcycle": True, "upcycle_noise": 0.0}])
    torch.testing.assert_close(same(**ids).logits, dense, atol=1e-4, rtol=1e-4)
    # with noise: expert 0 exact, the others perturbed by ~1% of each matrix's std
    noisy = build_tiny_model(SPEC, char_tokenizer, seed=0).eval()
    apply_patches(noisy, [{"name": kind, "num_experts": 4, "top_k": 2, "upcycle": True}])
    w_p = noisy.model.layers[0].mlp.w_p.detach()
    up = model.model.layers[0].mlp.up_proj.weight.detach().t()
    assert torch.equal(w_p[0], up)
    rel = (w_p[1:] - up).std() / up.std()
    assert 0.005 < float(rel) < 0.02
    assert not torch.equal(noisy(**ids).logits, dense)


def test_upcycled_aoe_truncated_svd(model):
    gate = model.model.layers[1].mlp.gate_proj.weight.detach().t().double()
    apply_patches(model, [{"name": "aoe", "layers": [1], "num_experts": 2, "top_k": 1, "upcycle": True,
                           "d_low": 10}])
    mlp = model.model.layers[1].mlp
    u, s, vh = torch.linalg.svd(gate, full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    torch.testing.assert_close((mlp.w_down[:, :10] @ mlp.w_up[0]).double(), best, atol=1e-5, rtol=1e-4)
    # balanced split: both factors carry sqrt(S)
    torch.testing.assert_close(mlp.w_down[:, :10].norm(dim=0), mlp.w_up[0].norm(dim=1), atol=1e-5, rtol=1e-4)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # untouched layer


def test_upcycled_qwen2_equals_dense(char_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=char_tokenizer.pad_token_id)
    ids = batch(char_tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = Qwen2ForCausalLM(cfg).eval()
    ref = dense(**ids).logits
    for kind in ("aoe", "moe"):
        m = Qwen2ForCausalLM(cfg).eval()
        m.load_state_dict(dense.state_dict())
        apply_patches(m, [{"name": kind, "num_experts": 1, "top_k": 1, "upcycle": True}])
        torch.testing.assert_close(m(**ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_padding_invariance_and_masked_aux(kind, model, char_tokenizer):
    apply_patches(model, [{"name": kind, "num_experts": 4, "top_k": 2, "init_std": 0.2}])
    ids = batch(char_tokenizer)
    captured, aux = {}, {}

    def grab(mod, args, out):
        captured[mod.layer_idx] = args[0].detach()
        aux[mod.layer_idx] = mod.aux_loss.detach()

    handles = [m.register_forward_hook(grab) for m in moe_modules(model)]
    logits = model(**ids).logits
    for h in handles:
        h.remove()
    mask = ids["attention_mask"]
    assert (mask == 0).any()
    for m in moe_modules(model):
        assert m.token_mask is mask
    # the short row is left-padded: its real tokens' logits equal the unpadded sequence's
    single = char_tokenizer(["Hi!"], return_tensors="pt")
    n_real = int(mask[1].sum())
    alone = model(**single).logits
    torch.testing.assert_close(logits[1, -n_real:], alone[0], atol=1e-5, rtol=1e-5)
    # the aux loss (and load) of the padded batch only counts real tokens
    for m in moe_modules(model):
        x = captured[m.layer_idx]
        real = x.reshape(-1, 64)[mask.reshape(-1).bool()]
        m.token_mask = None
        m(real.unsqueeze(0))
        torch.testing.assert_close(aux[m.layer_idx], m.aux_loss.detach())
        m(x)  # pad tokens counted: a different value, so the mask mattered
        assert not torch.allclose(aux[m.layer_idx], m.aux_loss.detach())
    # no attention_mask: the hook clears the stored mask
    model(input_ids=single["input_ids"])
    assert all(m.token_mask is None for m in moe_modules(model))


def test_mask_hook_positional_and_deepcopy(model, char_tokenizer):
    import copy

    apply_patches(model, [{"name": "moe", "num_experts": 4}])
    ids = batch(char_tokenizer)
    model.model(ids["input_ids"], ids["attention_mask"])  # positional attention_mask on the decoder
    assert all(m.token_mask is ids["attention_mask"] for m in moe_modules(model))
    twin = copy.deepcopy(model)  # e.g. a TRL reference model: the hook and the module list follow the copy
    assert all(a is not b for a, b in zip(moe_modules(twin), moe_modules(model)))
    model(input_ids=ids["input_ids"])
    twin(**ids)
    assert all(m.token_mask is None for m in moe_modules(model))
    assert all(m.token_mask is ids["attention_mask"] for m in moe_modules(twin))


def test_gradient_checkpointing_keeps_forward_aux(char_tokenizer):
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    layer = make_layer("aoe")
    for early_stop in (True, False):  # without early stop the recomputation runs the whole forward again
        x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
        with set_checkpoint_early_stop(early_stop):
            out = checkpoint(layer, x, use_reentrant=False)
        aux = layer.aux_loss
        assert aux.requires_grad
        (out.sum() + aux).backward()  # the recomputation inside backward does not replace aux_loss
        assert layer.aux_loss is aux and x.grad is not None
    # model level: HF gradient checkpointing + the aux loss in the objective
    m = build_tiny_model(SPEC, char_tokenizer, seed=0)
    apply_patches(m, [{"name": "aoe", "num_experts": 4, "aux_loss_coef": 0.01}])
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    m.train()
    ids = batch(char_tokenizer)
    loss = m(**ids, labels=ids["input_ids"]).loss + aux_weighted(m)
    loss.backward()
    grads = [p.grad for p in moe_modules(m)[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_generation_with_cache_equals_without(kind, model, char_tokenizer):
    apply_patches(model, [{"name": kind, "num_experts": 4, "top_k": 2, "init_std": 0.2}])
    ids = char_tokenizer(["Question: 1+1=", "Hi"], padding=True, return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
    assert torch.equal(model.generate(**ids, use_cache=True, **kw), model.generate(**ids, use_cache=False, **kw))


def test_bf16_forward(char_tokenizer):
    for kind in ("aoe", "moe"):
        m = build_tiny_model(SPEC, char_tokenizer, seed=0).to(torch.bfloat16).eval()
        apply_patches(m, [{"name": kind, "num_experts": 4, "top_k": 2}])
        mlp = m.model.layers[0].mlp
        assert all(p.dtype == torch.bfloat16 for p in mlp.parameters())
        logits = m(**batch(char_tokenizer)).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
        assert mlp(x).dtype == torch.bfloat16
        assert mlp.aux_loss.dtype == torch.float32 and mlp.route(x.reshape(-1, 64)).probs.dtype == torch.float32
        assert mlp.float()(x.float()).dtype == torch.float32


def test_defaults_and_parameter_matching(char_tokenizer):
    def patched(spec):
        m = build_tiny_model(SPEC, char_tokenizer, seed=0)
        apply_patches(m, [spec])
        return m.model.layers[0].mlp

    aoe = patched({"name": "aoe"})
    assert (aoe.num_experts, aoe.top_k, aoe.d_low, aoe.renormalize, aoe.aux_loss_coef) == (8, 2, 21, True, 0.0)
    assert aoe.expert_size == matched_aoe_width(64, 64, 21) == 73  # round((3*64*64 - 21*64) / (21 + 128))
    moe = patched({"name": "moe"})
    assert moe.expert_size == 64  # intermediate_size // top_k
    aoe_params = sum(getattr(aoe, n)[0].numel() for n in ("w_up", "w_p", "w_o")) + 64 * 21
    moe_params = sum(getattr(moe, n)[0].numel() for n in ("w_g", "w_p", "w_o"))
    assert abs(aoe_params - moe_params) <= (21 + 128) / 2
    assert patched({"name": "aoe", "expert_size": 40}).expert_size == 40  # given: used as is
    matched = patched({"name": "aoe", "expert_size": 40, "match_params": True})
    assert matched.expert_size == matched_aoe_width(64, 40, 21)
    assert patched({"name": "aoe", "match_params": False}).expert_size == 64
    assert matched_aoe_width(1536, 768, 512) == round((3 * 1536 * 768 - 512 * 1536) / (512 + 2 * 1536))
    # state-dict names
    m = build_tiny_model(SPEC, char_tokenizer, seed=0)
    apply_patches(m, [{"name": "aoe", "layers": [0]}, {"name": "moe", "layers": [-1]}])
    keys = set(m.state_dict())
    assert {k for k in keys if ".mlp." in k} == {
        "model.layers.0.mlp.w_down", "model.layers.0.mlp.w_up", "model.layers.0.mlp.w_p", "model.layers.0.mlp.w_o",
        "model.layers.1.mlp.w_router", "model.layers.1.mlp.w_g", "model.layers.1.mlp.w_p", "model.layers.1.mlp.w_o"}
    assert m.config.rlkit_patches == [{"name": "aoe", "layers": [0]}, {"name": "moe", "layers": [-1]}]
    assert len(moe_modules(m)) == 2


def test_patching_is_deterministic_and_leaves_global_rng(char_tokenizer):
    def params(seed):
        m = build_tiny_model(SPEC, char_tokenizer, seed=0)
        apply_patches(m, [{"name": "moe", "num_experts": 4, "seed": seed}])
        return m.model.layers[1].mlp.state_dict()

    state = torch.random.get_rng_state()
    a, b, c = params(0), params(0), params(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w_router"], c["w_router"])
    assert float(a["w_p"].std()) == pytest.approx(0.02, rel=0.05)
    torch.manual_seed(123)  # build_tiny_model and the patch both fork the RNG
    expected = torch.rand(3)
    torch.random.set_rng_state(state)
    torch.manual_seed(123)
    params(5)
    assert torch.equal(torch.rand(3), expected)


def test_state_dict_round_trip(model, char_tokenizer, tmp_path):
    from safetensors.torch import load_file

    specs = [{"name": "aoe", "layers": [0], "num_experts": 4}, {"name": "moe", "layers": [1], "num_experts": 4}]
    apply_patches(model, specs)
    ids = batch(char_tokenizer)
    ref = model(**ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    fresh = build_tiny_model(SPEC, char_tokenizer, seed=0).eval()
    apply_patches(fresh, [dict(s, seed=7) for s in specs])
    assert not torch.allclose(fresh(**ids).logits, ref)
    result = fresh.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    torch.testing.assert_close(fresh(**ids).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind,options,match", [
    ("aoe", {"num_experts": 0}, "num_experts must be a positive integer"),
    ("moe", {"num_experts": 2, "top_k": 3}, r"top_k \(3\) must be <= num_experts \(2\)"),
    ("aoe", {"top_k": True}, r"\(aoe\)\.top_k: expected an integer, got True"),  # typed options
    ("aoe", {"layers": [5]}, "out of range"),
    ("moe", {"layers": []}, "non-empty list"),
    ("moe", {"layers": "first"}, "'all' or a non-empty list"),
    ("aoe", {"layers": [0, -2]}, "twice"),
    ("moe", {"expert_size": 0}, "expert_size must be a positive integer"),
    ("moe", {"upcycle": True, "expert_size": 32}, "must be the intermediate size 128"),
    ("aoe", {"upcycle": True, "d_low": 65}, "cannot exceed min"),
    ("aoe", {"upcycle": True, "match_params": True}, "cannot be combined with upcycle"),
    ("moe", {"d_low": 8}, "aoe patch only"),
    ("moe", {"match_params": True}, "aoe patch only"),
    ("aoe", {"d_low": 0}, "d_low must be a positive integer"),
    ("aoe", {"d_low": 200, "expert_size": 10, "match_params": True}, "leaves no parameters"),
    ("aoe", {"aux_loss_coef": -0.1}, "aux_loss_coef must be a finite number >= 0"),
    ("moe", {"upcycle_noise": -1}, "upcycle_noise"),
    ("moe", {"init_std": 0}, "init_std must be > 0"),
    ("aoe", {"seed": 1.5}, r"\(aoe\)\.seed: expected an integer, got 1.5"),
    ("moe", {"renormalize": "yes"}, r"\(moe\)\.renormalize: expected true/false, got 'yes'"),
    ("moe", {"upcycle": 1}, r"\(moe\)\.upcycle: expected true/false, got 1"),
])
def test_option_validation(kind, options, match, model):
    with pytest.raises(ValueError, match=match):
        apply_patches(model, [{"name": kind, **options}])
    # nothing was replaced by a rejected patch
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)


def test_model_level_errors(model):
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        apply_patches(model, [{"name": "aoe"}])
    model.config.hidden_act = "silu"
    apply_patches(model, [{"name": "moe", "layers": [1]}])
    with pytest.raises(ValueError, match="layer 1 is already a MoE layer"):
        apply_patches(model, [{"name": "aoe"}])
    with pytest.raises(ValueError, match="top_k"):
        AoEMoE(16, 8, num_experts=2, top_k=4)
    with pytest.raises(ValueError, match="unknown patch"):
        apply_patches(model, [{"name": "moee"}])
