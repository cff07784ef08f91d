"""``method: dricl`` (DR-ICL, arXiv 2501.04070): the zero-shot mask reaches the attention function hiding exactly the
earlier demonstrations (eager and sdpa), the reweighting is the released loop on hand-made losses, the modes switch
the terms, the weights carry no gradient, encoding and truncation, resume, the recipe-level stage and the shipped
recipes."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from conftest import REPO_ROOT, TINY_SHAPE

TINY = dict(TINY_SHAPE, max_position_embeddings=512)


def episode(shots: int, seed: int) -> dict:
    """A hand-made ICL-50 episode: parity labels of numbers, the instruction in the first user turn."""
    rng, messages = random.Random(seed), []
    for i in range(shots):
        x = rng.randint(0, 99)
        messages.append({"role": "user", "content": ("Say even or odd.\n\n" if i == 0 else "") + f"Input: {x}\nOutput:",
                         "loss": 0})
        messages.append({"role": "assistant", "content": "even" if x % 2 == 0 else "odd", "loss": 1})
    return {"id": seed, "messages": messages, "resource": "parity"}


EPISODES = [episode(3, 0), episode(5, 1), episode(4, 2), episode(6, 3)]


@pytest.fixture(scope="module")
def tok():
    from rlkit.models import build_char_tokenizer

    return build_char_tokenizer()


def tiny_model(tok, impl: str = "sdpa", seed: int = 0):
    from rlkit.models import build_tiny_model
    from rlkit.recipe import TinyModelSpec

    return build_tiny_model(TinyModelSpec(**TINY), tok, seed=seed, attn_implementation=impl)


def config(out, **kw):
    from rlkit.methods.dricl import DrICLConfig

    base = dict(output_dir=str(out), report_to="none", max_length=512, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, learning_rate=1e-3, dataloader_num_workers=0, save_strategy="no",
                logging_steps=1, dataloader_pin_memory=False)
    return DrICLConfig(**{**base, **kw})


def batch_of(tok, rows, tmp_path):
    from rlkit.methods.dricl import DrICLCollator, encode_episodes

    items = encode_episodes(rows, tok, config(tmp_path))
    return items, DrICLCollator(tok.pad_token_id)(items)


def answer_bounds(span_ids: list[int]) -> list[tuple[int, int]]:
    """(first, last) token of each answer, from the span ids."""
    out: dict[int, list[int]] = {}
    for t, k in enumerate(span_ids):
        if k >= 0:
            out.setdefault(k, []).append(t)
    return [(v[0], v[-1]) for _, v in sorted(out.items())]


# --------------------------------------------------------------------------------------------------
# Encoding


def test_encoding_labels_the_answers_and_truncates_whole_demonstrations(tok, tmp_path):
    from rlkit.methods.dricl import encode_episodes

    row = EPISODES[1]
    item = encode_episodes([row], tok, config(tmp_path))[0]
    text = tok.decode(item["input_ids"])
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    bounds = answer_bounds(item["span_ids"])
    assert len(bounds) == 5
    for (a, b), ans in zip(bounds, answers):  # the answer with the space before it and the newline after it
        assert tok.decode(item["input_ids"][a:b + 1]) == f" {ans}\n"
        assert item["labels"][a:b + 1] == item["input_ids"][a:b + 1]
    assert sum(x != -100 for x in item["labels"]) == sum(b - a + 1 for a, b in bounds)
    assert text.startswith("user: Say even or odd.")
    # a max_length that cuts inside demonstration 3 keeps the first two demonstrations whole
    limit = bounds[2][0] + 1
    short = encode_episodes([row], tok, config(tmp_path, max_length=limit))[0]
    assert max(short["span_ids"]) == 1 and len(short["input_ids"]) <= limit
    assert short["input_ids"] == item["input_ids"][:len(short["input_ids"])]
    assert tok.decode(short["input_ids"]).endswith(f"assistant: {answers[1]}\n")


def test_bad_episodes_are_one_line_errors(tok, tmp_path):
    from rlkit.data import DataError
    from rlkit.methods.dricl import encode_episodes

    bad = [({"messages": "x"}, "messages"), ({"messages": [{"role": "user", "content": "a", "loss": 1}]}, "loss"),
           ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": 0}]},
            "no answer with loss 1")]
    for row, words in bad:
        with pytest.raises(DataError, match=words) as e:
            encode_episodes([row], tok, config(tmp_path))
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="max_length 8"):
        encode_episodes([EPISODES[0]], tok, config(tmp_path, max_length=8))
    with pytest.raises(ValueError, match="schema"):
        config(tmp_path, schema="both")
    with pytest.raises(ValueError, match="train_type"):
        config(tmp_path, train_type="few-shot")


# --------------------------------------------------------------------------------------------------
# The zero-shot mask


def test_zero_shot_mask_reaching_attention_hides_exactly_earlier_demonstrations(tok, tmp_path):
    """A registered attention function records what each layer gets: in the zero-shot pass, query q of an episode
    sees key k iff k <= q and no answer ends in [k, q); padding keys are hidden."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from rlkit.methods.dricl import DrICLTrainer

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            seen.append(None if attention_mask is None else attention_mask.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dricl_probe", probe)
    AttentionMaskInterface.register("dricl_probe", sdpa_mask)
    model = tiny_model(tok, "dricl_probe")
    items, batch = batch_of(tok, EPISODES[:2], tmp_path)
    trainer = DrICLTrainer(model=model, args=config(tmp_path), train_dataset=items, processing_class=tok)
    trainer.terms(model, batch)
    assert len(seen) == 2  # the many-shot pass, then the zero-shot pass
    many, zero = seen
    assert many is None or many.dtype == torch.bool  # transformers' own causal mask
    assert zero.shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert zero.dtype == torch.float32
    width = batch["input_ids"].shape[1]
    for r, item in enumerate(items):
        ends = [b for _, b in answer_bounds(item["span_ids"])]
        n = len(item["input_ids"])
        for q in range(n):
            last_end = max([e for e in ends if e < q], default=-1)
            for k in range(width):
                visible = bool(zero[r, 0, q, k] == 0)
                assert visible == (last_end < k <= q), (r, q, k)
                if not visible:
                    assert zero[r, 0, q, k] == torch.finfo(torch.float32).min
        # every answer after the first sees its own demonstration and nothing before it
        bounds = answer_bounds(item["span_ids"])
        for (a, b), (_, prev_end) in zip(bounds[1:], bounds[:-1]):
            row = zero[r, 0, a] == 0
            assert not row[:prev_end + 1].any() and row[prev_end + 1:a + 1].all() and not row[a + 1:].any()
        # padding query rows see only themselves
        for q in range(n, width):
            assert (zero[r, 0, q] == 0).nonzero().flatten().tolist() == [q]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zero_shot_answers_equal_their_demonstration_alone(tok, tmp_path, impl):
    """Under the mask, answer k's logits are those of its own demonstration run alone (RoPE is relative, so the
    original positions change nothing), for both attention implementations; the many-shot logits differ."""
    from rlkit.methods.dricl import zero_shot_mask

    model = tiny_model(tok, impl)
    items, batch = batch_of(tok, EPISODES[:2], tmp_path)
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"],
                       attention_mask=zero_shot_mask(batch["span_ids"], batch["attention_mask"], torch.float32)).logits
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for r, item in enumerate(items):
            bounds = answer_bounds(item["span_ids"])
            for k in range(1, len(bounds)):
                lo, hi = bounds[k - 1][1] + 1, bounds[k][1] + 1
                alone = model(input_ids=torch.tensor([item["input_ids"][lo:hi]])).logits[0]
                torch.testing.assert_close(masked[r, lo:hi], alone, atol=2e-5, rtol=1e-4)
                assert (plain[r, lo:hi] - alone).abs().max() > 1e-3


def test_attention_without_4d_masks_is_refused(tok, tmp_path):
    from rlkit.methods.dricl import DrICLTrainer

    model = tiny_model(tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4D mask"):
        DrICLTrainer(model=model, args=config(tmp_path), train_dataset=EPISODES, processing_class=tok)
    # plain NLL needs no mask
    DrICLTrainer(model=model, args=config(tmp_path, train_type="many-shot"), train_dataset=EPISODES,
                 processing_class=tok)


# --------------------------------------------------------------------------------------------------
# The reweighting


def test_reweighting_is_the_released_loop_on_hand_made_losses():
    from rlkit.methods.dricl import importance_score, reweight

    # p/q = 0.3 e^{0.8x} + 0.7 e^{0.2x}
    assert importance_score(1.5) == pytest.approx(0.3 * math.exp(1.2) + 0.7 * math.exp(0.3))
    # W = 2, worked by hand through the released loop (history appended first, then sliced [2s, 2s+2), s = k//2 - 1):
    # k1: slice [-2:0] empty -> b = l0;  k2: history [5] -> b = 5;  k3: [5, 2] -> b = 5;  k4: [5, 2, 4][2:4] = [4];
    # k5: [4, .5][2:4] empty -> b = l4;  k6: [6][4:6] empty -> b = l5
    losses = [1.0, 3.0, 5.0, 2.0, 4.0, 0.5, 6.0]
    weights, adv = reweight(losses, window=2, gamma=11.0)
    assert adv == pytest.approx([0.0, 2.0, 0.0, -3.0, 0.0, -3.5, 5.5])
    assert weights == pytest.approx([math.exp(a / 11) for a in adv])
    assert weights[1] == pytest.approx(1.1994, abs=1e-4)  # A = 2: a loss above its baseline is up-weighted
    # no window: the baseline is the largest loss so far, the current one included
    assert reweight([1.0, 3.0, 5.0, 2.0], window=None)[1] == pytest.approx([0.0, 0.0, 0.0, -3.0])

    # W = 10 over 35 losses: previous loss for 1..9, the running max of l10..lk for 10..19, 0 at 20, previous after
    rng = random.Random(0)
    losses = [rng.uniform(0.1, 4.0) for _ in range(35)]
    expected = [0.0]
    for k in range(1, 35):
        if 10 <= k < 20:
            expected.append(losses[k] - max(losses[10:k + 1]))
        elif k == 20:
            expected.append(0.0)
        else:
            expected.append(losses[k] - losses[k - 1])
    weights, adv = reweight(losses, window=10, gamma=11.0)
    assert adv == pytest.approx(expected)
    assert all(a <= 0 for a in adv[10:20])


def forward_counter(model):
    calls = []
    handle = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw.get("attention_mask").dim()),
                                         with_kwargs=True)
    return calls, handle


def test_modes_switch_the_terms(tok, tmp_path):
    """Each mode's loss from independent pieces: HF's own loss with and without the 4D mask (token means), the
    per-answer means through ``reweight``."""
    from rlkit.methods.dricl import DrICLTrainer, reweight, zero_shot_mask

    model = tiny_model(tok)
    items, batch = batch_of(tok, EPISODES[:2], tmp_path)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        many = model(input_ids=ids, attention_mask=am, labels=labels).loss
        zero = model(input_ids=ids, attention_mask=zero_shot_mask(batch["span_ids"], am, torch.float32),
                     labels=labels).loss
        logits = model(input_ids=ids, attention_mask=am).logits
    per_episode = []
    for r, item in enumerate(items):
        demo = []
        for a, b in answer_bounds(item["span_ids"]):
            nll = torch.nn.functional.cross_entropy(logits[r, a - 1:b], ids[r, a:b + 1])
            demo.append(nll.item())
        w, _ = reweight(demo, 10, 11.0)
        per_episode.append(sum(x * y for x, y in zip(w, demo)) / len(demo))
    local = sum(per_episode) / len(per_episode)
    expected = {("zero-shot", "all"): (zero.item(), [4]), ("many-shot", "all"): (many.item(), [2]),
                ("dynamic-shot", "global"): (0.5 * (1.2 * many.item() + 0.8 * zero.item()), [2, 4]),
                ("dynamic-shot", "local"): (local, [2]),
                ("dynamic-shot", "all"): (0.5 * (1.2 * local + 0.8 * zero.item()), [2, 4])}
    assert len({round(v, 6) for v, _ in expected.values()}) == 5  # the modes really differ here
    for (train_type, schema), (value, passes) in expected.items():
        trainer = DrICLTrainer(model=model, args=config(tmp_path, train_type=train_type, schema=schema),
                               train_dataset=items, processing_class=tok)
        calls, handle = forward_counter(model)
        with torch.no_grad():
            loss, figures = trainer.terms(model, batch)
        handle.remove()
        assert loss.item() == pytest.approx(value, rel=1e-5), (train_type, schema)
        assert calls == passes, (train_type, schema)  # 2: the 2D padding mask, 4: the zero-shot mask
    assert figures["loss_many"] == pytest.approx(many.item(), rel=1e-5)
    assert figures["loss_zero"] == pytest.approx(zero.item(), rel=1e-5)


def test_weights_carry_no_gradient(tok, tmp_path):
    """The local loss's gradient is that of sum_k w_k l_k / K with the weights as constants."""
    from rlkit.methods.dricl import DrICLTrainer, reweight

    model = tiny_model(tok)
    items, batch = batch_of(tok, EPISODES[1:2], tmp_path)
    trainer = DrICLTrainer(model=model, args=config(tmp_path, schema="local", per_device_train_batch_size=1),
                           train_dataset=items, processing_class=tok)
    loss, _ = trainer.terms(model, batch)
    grad = torch.autograd.grad(loss, model.model.embed_tokens.weight)[0]
    logits = model(input_ids=batch["input_ids"]).logits[0]
    ids = batch["input_ids"][0]
    demo = [torch.nn.functional.cross_entropy(logits[a - 1:b], ids[a:b + 1])
            for a, b in answer_bounds(items[0]["span_ids"])]
    w, adv = reweight([d.item() for d in demo], 10, 11.0)
    assert any(abs(a) > 1e-3 for a in adv)
    manual = sum(wk * d for wk, d in zip(w, demo)) / len(demo)
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(manual, model.model.embed_tokens.weight)[0],
                               atol=1e-7, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Training, resume, recipes


def test_training_lowers_the_loss_and_resume_continues_exactly(tok, tmp_path):
    from rlkit.methods.dricl import DrICLTrainer

    base = tiny_model(tok)
    rows = [episode(4, s) for s in range(8)]

    def run(out, resume=None):
        args = config(out, max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine")
        t = DrICLTrainer(model=copy.deepcopy(base), args=args, train_dataset=rows, processing_class=tok)
        t.train(resume_from_checkpoint=resume)
        return t

    whole = run(tmp_path / "whole")
    logged = [h for h in whole.state.log_history if "loss" in h]
    assert len(logged) == 4 and logged[-1]["loss"] < logged[0]["loss"]
    assert {"loss_many", "loss_zero", "mean_weight"} <= set(logged[0])
    assert (tmp_path / "whole" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_recipe_stage_trains_from_an_episodes_file(tmp_path):
    from rlkit.methods import load
    from rlkit.models import load_model
    from rlkit.pipeline import read_manifest, run_recipe
    from rlkit.recipe import ModelSpec, recipe_from_dict

    load("rlkit.methods.dricl")  # registered on import, whatever the registry lists
    data = tmp_path / "episodes.jsonl"
    data.write_text("".join(json.dumps(episode(3 + s % 4, s)) + "\n" for s in range(6)))
    raw = {"method": "dricl", "seed": 0, "plot": False, "output_dir": str(tmp_path / "run"),
           "model": {"name": "tiny", "tiny": TINY},
           "data": {"train": {"name": f"jsonl:{data}"}},
           "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                       "learning_rate": 1e-3, "save_strategy": "no", "logging_steps": 1, "max_length": 256,
                       "dataloader_num_workers": 0}}
    run_recipe(recipe_from_dict(raw))
    manifest = read_manifest(tmp_path / "run")
    assert manifest["method"] == "dricl"
    model, _ = load_model(ModelSpec(name=manifest["model"]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["episodes"] == 6 and summary["schema"] == "all"

    from rlkit.config import RecipeError

    bad = {**raw, "data": {"train": {"name": "synthetic"}}}
    with pytest.raises(RecipeError, match="episodes"):
        run_recipe(recipe_from_dict(bad))


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes" / "dricl").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    from rlkit.methods import load
    from rlkit.recipe import load_recipe, validate_recipe

    load("rlkit.methods.dricl")
    load("rlkit.methods.manyshot_data")

    validate_recipe(load_recipe(path))


@pytest.mark.slow
def test_smollm2_zero_shot_mask_with_eager_and_sdpa(tmp_path):
    """On the real SmolLM2 (chat template, GQA): the zero-shot logits of an answer are those of its demonstration
    alone, with eager and with sdpa."""
    from rlkit.methods.dricl import encode_episodes, zero_shot_mask
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    model, tokenizer = load_model(ModelSpec(name="smollm2-135m-instruct"))
    item = encode_episodes([EPISODES[0]], tokenizer, config(tmp_path))[0]
    ids = torch.tensor([item["input_ids"]])
    bounds = answer_bounds(item["span_ids"])
    mask = zero_shot_mask(torch.tensor([item["span_ids"]]), torch.ones_like(ids), torch.float32)
    lo, hi = bounds[1][1] + 1, bounds[2][1] + 1
    out = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            out[impl] = model(input_ids=ids, attention_mask=mask).logits[0, lo:hi]
            alone = model(input_ids=ids[:, lo:hi]).logits[0]
            torch.testing.assert_close(out[impl], alone, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=2e-3, rtol=1e-3)
