"""Reward-guided speculative decoding (rlkit/rollout/rsd.py) and ``rlkit eval --decoder rsd``.

Two tiny char-level Llamas (different seeds) play draft and target. Their weights are drawn wider than the
default initialisation and their logits get a fixed bias towards the newline and EOS (special tokens other than
EOS are suppressed, so decoded text re-tokenises to the generated ids): greedy outputs are then several
``"\\n"``-separated steps, some ending with EOS, which is what the step loop needs to be exercised."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlkit.config import ConfigError
from rlkit.rollout import GenerationSettings, generate_hf
from rlkit.rollout.rsd import (DecodingModel, RSDResult, RSDSettings, best_of_n_cost, rsd_decode,
                               safetensors_parameters, step_decode, summarize, weight)

PROMPTS = ["Q: 12+5-3\nA: ", "Q: 40-7+21\nA: ", "Q: 3+4\nA: ", "Q: 7\nA: ", "Q: 8+9+10\nA: ", "Q: 55-13\nA: "]
MAX = 48


def _tiny(tok, seed: int, std: float = 0.3, newline_bias: float = 2.5, eos_bias: float = 1.0):
    from conftest import TINY_SHAPE

    from rlkit.models import build_tiny_model
    from rlkit.recipe import TinyModelSpec

    model = build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=gen)
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("\n")] = newline_bias
    bias[tok.eos_token_id] = eos_bias
    for t in (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id):
        bias[t] = -1e4
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model


@pytest.fixture(scope="module")
def tok():
    from rlkit.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    torch.set_num_threads(1)
    return DecodingModel(_tiny(tok, 3), tok), DecodingModel(_tiny(tok, 0), tok)


def _greedy(lm: DecodingModel, prompts=PROMPTS, max_new_tokens=MAX):
    outs = generate_hf(lm.model, lm.tokenizer, list(prompts), GenerationSettings(max_new_tokens=max_new_tokens),
                       progress=False)
    return [o[0] for o in outs]


class HashScorer:
    """A deterministic step scorer in [0, 1] with a tokenizer (so its tokens are counted): the last step's score
    is a hash of the solution so far."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.calls = 0

    def score(self, prompt, steps):
        self.calls += 1
        return [(sum(map(ord, prompt + "".join(steps[:k + 1]))) % 101) / 100 for k in range(len(steps))]


def _settings(**kw):
    return RSDSettings(**{"step_separator": "\n", "max_total_tokens": MAX, **kw})


# --------------------------------------------------------------------------------------------------
# Settings and weightings


def test_weighting_functions_on_hand_picked_rewards():
    s = lambda **kw: RSDSettings(**kw)  # noqa: E731
    binary = s(threshold=0.7)
    assert [weight(r, binary) for r in (0.0, 0.69, 0.7, 0.71, 1.0, float("nan"))] == [0, 0, 1, 1, 1, 0]
    assert [weight(r, s(weighting="constant", constant_p=0.3)) for r in (-5, 0.2, 9)] == [0.3, 0.3, 0.3]
    assert [weight(r, s(weighting="clipped")) for r in (-0.5, 0.0, 0.25, 1.0, 3.0)] == [0, 0, 0.25, 1, 1]
    sig = s(weighting="sigmoidal")
    assert [weight(r, sig) for r in (-3.0, -0.5, 0.0)] == [0, 0, 0]
    assert weight(1.0, sig) == 0.5 and weight(3.0, sig) == 0.75 and weight(0.25, sig) == pytest.approx(0.2)
    log = s(weighting="logistic", threshold=0.7, logistic_alpha=10.0)
    assert weight(0.7, log) == 0.5
    assert weight(0.8, log) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert weight(0.5, log) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert weight(-1e6, log) == 0.0 and weight(1e6, log) == 1.0  # no overflow


@pytest.mark.parametrize("kw, message", [
    ({"weighting": "sigmoid"}, "unknown weighting 'sigmoid'"),
    ({"constant_p": 1.5}, "constant_p is a probability"),
    ({"logistic_alpha": 0}, "logistic_alpha must be > 0"),
    ({"step_separator": ""}, "step_separator must be a non-empty string"),
    ({"max_steps": 0}, "max_steps must be at least 1"),
    ({"max_total_tokens": 0}, "max_total_tokens must be at least 1"),
    ({"draft_temperature": -1}, "draft_temperature must be >= 0"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"backend": "tgi"}, "unknown backend"),
])
def test_settings_errors_are_one_line(kw, message):
    with pytest.raises(ConfigError) as e:
        RSDSettings(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# The endpoints: delta = 0 is the draft, delta > 1 the target, token for token


def test_threshold_zero_is_the_drafts_greedy_output(pair, tok):
    draft, target = pair
    res = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.0), progress=False)
    steps = 0
    for r, comp in zip(res, _greedy(draft)):
        ids = tok(r.text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r.finish_reason == "eos"
                                                                    else [])
        assert ids == comp.token_ids, (r.text, comp.text)
        assert set(r.sources) == {"draft"} and r.draft_discarded_tokens == r.target_tokens == 0
        assert r.draft_accepted_tokens == len(comp.token_ids) and r.acceptance_rate == 1.0
        assert r.models["target"].calls == 0 and r.prm_calls == len(r.steps)
        assert "".join(r.steps) == r.text and all(s.endswith("\n") for s in r.steps[:-1])
        steps += len(r.steps)
    assert steps >= 15 and {r.finish_reason for r in res} == {"eos", "length"}, "the check needs multi-step chains"


def test_threshold_above_one_is_the_targets_greedy_output(pair, tok):
    draft, target = pair
    res = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=1.01), progress=False)
    for r, comp in zip(res, _greedy(target)):
        ids = tok(r.text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r.finish_reason == "eos"
                                                                    else [])
        assert ids == comp.token_ids, (r.text, comp.text)
        assert set(r.sources) == {"target"} and r.draft_accepted_tokens == 0 and r.acceptance_rate == 0.0
        assert r.target_tokens == len(comp.token_ids)
        assert r.draft_discarded_tokens == r.models["draft"].generated_tokens > 0
        assert all(t["discarded"] is not None and t["weight"] == 0.0 for t in r.trace)
    assert sum(len(r.steps) for r in res) >= 15


def test_target_with_a_different_tokenizer(pair, tok):
    """Steps travel as text: a target whose tokenizer numbers the characters differently still continues the
    text, and its tokens are counted in its own tokenizer."""
    from rlkit.models import CHAR_VOCAB

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(reversed(CHAR_VOCAB)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    rev = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    assert rev("a")["input_ids"] != tok("a")["input_ids"]
    target = DecodingModel(_tiny(rev, 0), rev)
    res = rsd_decode(pair[0], target, HashScorer(), PROMPTS[:3], _settings(threshold=1.01), progress=False)
    for r, comp in zip(res, _greedy(target, PROMPTS[:3])):
        assert r.text == comp.text and r.target_tokens == len(comp.token_ids)


# --------------------------------------------------------------------------------------------------
# Counters


def _lcp(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _expected_prefill(prompt: str, r: RSDResult, role: str, tok) -> int:
    """The prefix-cache count rebuilt from the result's trace: a generating model's last sequence is its context
    plus what it generated (the PRM's: what it scored); a new context costs the tokens beyond the common
    prefix."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    last, total = [], 0
    for k, t in enumerate(r.trace):
        context = enc(prompt + "".join(r.steps[:k]))
        if role == "prm":  # it reads the prompt, the steps so far and the draft's proposal
            seq = context + enc(r.steps[k] if t["source"] == "draft" else t["discarded"])
            total += len(seq) - _lcp(last, seq)
            last = seq
            continue
        if role == "draft":
            out = r.steps[k] if t["source"] == "draft" else t["discarded"]
        elif t["source"] == "target":
            out = r.steps[k]
        else:
            continue
        total += len(context) - _lcp(last, context)
        last = context + enc(out)
    return total


def test_counters_add_up(pair, tok):
    draft, target = pair
    scorer = HashScorer(tok)
    res = rsd_decode(draft, target, scorer, PROMPTS, _settings(threshold=0.5), progress=False,
                     scorer_parameters=1234)
    sources = [s for r in res for s in r.sources]
    assert "draft" in sources and "target" in sources, "the check needs both kinds of steps"
    params = draft.model.num_parameters()
    for prompt, r in zip(PROMPTS, res):
        d, t, p = r.models["draft"], r.models["target"], r.models["prm"]
        assert r.draft_accepted_tokens + r.draft_discarded_tokens == r.draft_tokens == d.generated_tokens
        assert r.target_tokens == t.generated_tokens and r.tokens == r.draft_accepted_tokens + r.target_tokens
        assert r.draft_accepted_tokens == sum(x["tokens"] for x in r.trace if x["source"] == "draft")
        assert r.draft_discarded_tokens == sum(x["draft_tokens"] for x in r.trace if x["source"] == "target")
        assert r.acceptance_rate == r.draft_accepted_tokens / r.draft_tokens
        assert d.calls == r.prm_calls == p.calls == len(r.steps) and t.calls == r.sources.count("target")
        assert d.prefill_tokens == _expected_prefill(prompt, r, "draft", tok)
        assert t.prefill_tokens == _expected_prefill(prompt, r, "target", tok)
        for c, n in ((d, params), (t, params), (p, 1234)):
            assert c.parameters == n and c.flops == 2 * n * c.tokens_processed
        assert r.flops == d.flops + t.flops + p.flops
        assert [x["reward"] for x in r.trace] == r.scores
        assert p.prefill_tokens == _expected_prefill(prompt, r, "prm", tok)
    total = summarize(res)
    assert total["draft_accepted_tokens"] == sum(r.draft_accepted_tokens for r in res)
    assert total["acceptance_rate"] == pytest.approx(total["draft_accepted_tokens"] / sum(r.draft_tokens for r in res))
    assert total["models"]["draft"]["flops"] == sum(r.models["draft"].flops for r in res)
    assert total["flops"] == pytest.approx(sum(r.flops for r in res))
    assert total["steps"] == total["draft_steps"] + total["target_steps"] == len(sources)
    json.dumps([r.to_dict() for r in res])  # records are JSON


def test_prm_prefix_cache_on_hand_made_steps(tok):
    """The PRM's count by hand: accepted steps extend its cache; after a discarded step only the prefix it was
    scored on stays."""
    from rlkit.rollout.rsd import _PrefixCache

    cache = _PrefixCache()
    first = [1, 2, 3, 4]
    assert cache.new_tokens(first) == 4
    cache.ids = first
    assert cache.new_tokens(first + [5, 6]) == 2  # an accepted step: only its tokens are new
    cache.ids = first + [5, 6]
    assert cache.new_tokens(first + [7, 8, 9]) == 3  # the discarded [5, 6] is not reused
    assert cache.new_tokens([1, 2, 9]) == 1


def test_step_decode_baselines(pair, tok):
    draft, target = pair
    rsd0 = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.0), progress=False)
    alone = step_decode(draft, PROMPTS, _settings(), role="draft", progress=False)
    assert [r.text for r in alone] == [r.text for r in rsd0]
    for a, b, prompt in zip(alone, rsd0, PROMPTS):
        assert set(a.models) == {"draft"} and a.prm_calls == 0 and a.draft_discarded_tokens == 0
        assert a.models["draft"].to_dict() == b.models["draft"].to_dict()
        # one model alone: the prompt once plus every generated token
        assert a.models["draft"].tokens_processed == len(tok(prompt)["input_ids"]) + a.draft_accepted_tokens
    tgt = step_decode(target, PROMPTS, _settings(), progress=False)
    assert [r.text for r in tgt] == [c.text for c in _greedy(target)]
    assert all(set(r.models) == {"target"} and set(r.sources) == {"target"} and r.acceptance_rate is None
               for r in tgt)
    with pytest.raises(ValueError, match="role"):
        step_decode(target, PROMPTS, role="prm")


# --------------------------------------------------------------------------------------------------
# Stopping


def test_stops_at_eos_length_and_step_limit(pair, tok):
    draft, target = pair
    res = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.0), progress=False)
    eos = [r for r in res if r.finish_reason == "eos"]
    assert eos and all("\n" not in r.steps[-1] for r in eos)
    for r in res:
        if r.finish_reason == "length":
            assert r.tokens == MAX
    short = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.0, max_total_tokens=10),
                       progress=False)
    assert all(r.tokens <= 10 for r in short) and any(r.finish_reason == "length" and r.tokens == 10 for r in short)
    assert [r.text for r in short] == [c.text for c in _greedy(draft, max_new_tokens=10)]
    steps = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.5, max_steps=2), progress=False)
    assert all(len(r.steps) <= 2 for r in steps)
    capped = [r for r in steps if r.finish_reason == "steps"]
    assert capped and all(len(r.steps) == 2 and r.steps[-1].endswith("\n") for r in capped)
    per_step = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(threshold=0.0, max_step_tokens=3),
                          progress=False)
    cut = 0
    for r, full in zip(per_step, res):
        if full.steps[0].endswith("\n") and len(full.steps[0]) > 3:  # the first step needs more than 3 tokens
            assert (r.steps, r.finish_reason) == ([full.steps[0][:3]], "length")
            cut += 1
    assert cut >= 2


# --------------------------------------------------------------------------------------------------
# Batching, seeds, scorer interfaces


def test_batched_equals_unbatched_and_seeded_acceptance_reproduces(pair):
    draft, target = pair
    s = dict(weighting="logistic", threshold=0.5, logistic_alpha=4.0, seed=7)
    together = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(**s), progress=False)
    apart = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(batch_size=2, **s), progress=False)
    assert [r.to_dict() for r in together] == [r.to_dict() for r in apart]
    again = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(**s), progress=False)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in together]
    other = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(**{**s, "seed": 8}), progress=False)
    assert [r.sources for r in other] != [r.sources for r in together]


def test_constant_weighting_draws_one_uniform_per_scored_step(pair):
    """Acceptance is ``u < omega`` with u from one Random stream per problem (seed * 1000003 + problem index)."""
    draft, target = pair
    res = rsd_decode(draft, target, HashScorer(), PROMPTS, _settings(weighting="constant", constant_p=0.5, seed=3),
                     progress=False)
    for i, r in enumerate(res):
        rng = random.Random(3 * 1_000_003 + i)
        assert r.sources == ["draft" if rng.random() < 0.5 else "target" for _ in r.steps]
        assert all(t["weight"] == 0.5 for t in r.trace)
    assert {s for r in res for s in r.sources} == {"draft", "target"}


def test_scorer_interfaces(pair, tok):
    draft, target = pair
    seen = []

    class Batched:  # score_batch is preferred: one call per round for all live problems
        def score_batch(self, prompts, steps_lists):
            seen.append(len(prompts))
            return [[0.0] * (len(s) - 1) + [1.0 if len(s[-1]) % 2 else 0.0] for s in steps_lists]

        def score(self, prompt, steps):
            raise AssertionError("score_batch should be used")

    res = rsd_decode(draft, target, Batched(), PROMPTS, _settings(), progress=False)
    assert seen[0] == len(PROMPTS) and len(seen) == max(len(r.steps) for r in res)
    for r in res:
        for step, t in zip(r.steps, r.trace):
            proposal = step if t["source"] == "draft" else t["discarded"]
            assert t["reward"] == (1.0 if len(proposal) % 2 else 0.0)  # the last step's score
    with pytest.raises(TypeError, match="not a step scorer"):
        rsd_decode(draft, target, object(), PROMPTS, _settings(), progress=False)


def test_value_model_scorer_reads_the_last_step_directly(pair, tok):
    from rlkit.rollout.rsd import last_step_scores, scorer_ids
    from rlkit.value import ValueModel

    vm = ValueModel.from_causal_lm(pair[0].model).attach_tokenizer(tok)
    torch.nn.init.normal_(vm.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    steps = [["ab\n", "cd\n"], ["x"]]
    direct = last_step_scores(vm, ["Q: 1\nA: ", "Q: 2\nA: "], steps)
    assert direct == pytest.approx([vm.score("Q: 1\nA: ", steps[0])[-1], vm.score("Q: 2\nA: ", steps[1])[-1]],
                                   abs=1e-5)  # batched (padded) vs one sequence
    assert scorer_ids(vm, "Q: 1\nA: ", steps[0]) == vm.encode("Q: 1\nA: ", steps[0])


# --------------------------------------------------------------------------------------------------
# Parameters and best-of-N cost


def test_safetensors_parameters_and_best_of_n_cost(pair, tmp_path):
    model = pair[0].model
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert safetensors_parameters(tmp_path / "m") == model.num_parameters()
    assert DecodingModel(None, pair[0].tokenizer, path=str(tmp_path / "m")).num_parameters() == model.num_parameters()
    assert DecodingModel(None, None, path="x", parameters=5).num_parameters() == 5
    from rlkit.models import ModelError

    with pytest.raises(ModelError, match="no safetensors weights"):
        safetensors_parameters(tmp_path)
    cost = best_of_n_cost([1] * 10, [[2] * 5, [3] * 7], 100, prm_prompt_ids=[1] * 12,
                          prm_completion_ids=[[2] * 6, [3] * 8], prm_parameters=10)
    assert cost["models"]["policy"]["tokens_processed"] == 10 + 12
    assert cost["models"]["prm"]["tokens_processed"] == 12 + 14
    assert cost["flops"] == 2 * 100 * 22 + 2 * 10 * 26
    assert best_of_n_cost([1], [[2]], 3)["flops"] == 2 * 3 * 2


# --------------------------------------------------------------------------------------------------
# rlkit eval --decoder rsd


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """A draft and a target checkpoint (plain tiny models; their greedy outputs are short) and a value model."""
    from conftest import TINY_SHAPE

    from rlkit.models import build_tiny_model
    from rlkit.recipe import TinyModelSpec
    from rlkit.value import ValueModel

    root = tmp_path_factory.mktemp("rsd_ckpt")
    paths = {}
    for name, seed in (("draft", 1), ("target", 2)):
        m = build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=seed)
        m.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    vm = ValueModel.from_causal_lm(build_tiny_model(TinyModelSpec(**TINY_SHAPE), tok, seed=3))
    vm.save_pretrained(root / "critic")
    tok.save_pretrained(root / "critic")
    paths["critic"] = str(root / "critic")
    from rlkit.process_reward import ProcessRewardModel

    prm = ProcessRewardModel(_tiny(tok, 4), tok, step_tag=" @")
    prm.model._forward_hooks.clear()  # saved weights only
    prm.save_pretrained(root / "prm")
    paths["prm"] = str(root / "prm")
    return paths


def test_eval_rsd_end_to_end(saved, tmp_path, capsys):
    from rlkit.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--decoder", "rsd", "--draft", saved["draft"], "--target", saved["target"],
            "--scorer", saved["critic"], "--threshold", "0.0", "--benchmark", "synthetic", "--limit", "3",
            "--template", "plain", "--max-new-tokens", "12", "--step-separator", "\\n", "--max-steps", "4",
            "--batch-size", "2", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed["pass@1"] == summary["pass@1"] and summary["n"] == 3 and summary["decoder"] == "rsd"
    assert summary["draft"] == saved["draft"] and summary["target"] == saved["target"]
    assert summary["scorer"] == saved["critic"] and summary["threshold"] == 0.0
    assert summary["weighting"] == "binary" and summary["step_separator"] == "\n" and summary["max_steps"] == 4
    assert summary["acceptance_rate"] == 1.0  # a zero-initialised value head scores 0 >= 0: every draft step kept
    records = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        rsd = rec["rsd"]
        assert rec["completion"] == "".join(rsd["steps"]) == rsd["text"] and len(rsd["steps"]) <= 4
        assert rsd["draft_accepted_tokens"] + rsd["draft_discarded_tokens"] == rsd["draft_tokens"]
        assert set(rsd["models"]) == {"draft", "target", "prm"}
        assert set(rec) >= {"question", "gold", "completion", "extracted", "correct"}
    for role in ("draft", "target", "prm"):
        m = summary["models"][role]
        assert m["flops"] == 2 * m["parameters"] * m["tokens_processed"]
    assert summary["models"]["draft"]["generated_tokens"] == sum(r["rsd"]["draft_tokens"] for r in records)
    assert summary["models"]["prm"]["parameters"] > 0 and summary["models"]["prm"]["tokens_processed"] > 0


def test_eval_rsd_with_a_prm_scorer(saved, tmp_path, capsys):
    """A saved PRM as the scorer: rewards are its p('+') at the last step tag, its tokens are counted in its own
    tagged layout and its parameters from the model."""
    from rlkit.cli import main
    from rlkit.process_reward import ProcessRewardModel

    out = tmp_path / "eval"
    argv = ["eval", "--decoder", "rsd", "--draft", saved["draft"], "--target", saved["target"],
            "--scorer", saved["prm"], "--threshold", "0.5", "--benchmark", "synthetic", "--limit", "2",
            "--template", "plain", "--max-new-tokens", "10", "--step-separator", "\\n", "--output-dir", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    prm = ProcessRewardModel.from_pretrained(saved["prm"])
    assert summary["models"]["prm"]["parameters"] == prm.num_parameters()
    records = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec

    rows = build_dataset(DatasetSpec(name="synthetic", split="test", limit=2, template="plain"), prm.tokenizer)
    for rec, row in zip(records, rows.to_list()):
        rsd = rec["rsd"]
        assert all(0.0 <= r <= 1.0 for r in rsd["scores"]) and rsd["prm_calls"] == len(rsd["steps"])
        last, expected = [], 0  # the PRM's prefix-cache count in its own tagged layout
        for k, t in enumerate(rsd["trace"]):
            proposal = rsd["steps"][k] if t["source"] == "draft" else t["discarded"]
            ids = prm.encode(row["prompt"], rsd["steps"][:k] + [proposal])[0]
            expected += len(ids) - _lcp(last, ids)
            last = ids
        assert rsd["models"]["prm"]["prefill_tokens"] == expected > 0


def test_eval_rsd_model_is_the_default_target(saved, tmp_path, capsys):
    from rlkit.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--decoder", "rsd", "--model", saved["target"], "--draft", saved["draft"],
            "--scorer", saved["critic"], "--threshold", "2", "--weighting", "binary", "--benchmark", "synthetic",
            "--limit", "2", "--template", "plain", "--max-new-tokens", "6", "--output-dir", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == saved["target"] and summary["acceptance_rate"] in (0.0, None)
    assert summary["step_separator"] == "\n\n" and summary["target_tokens"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--draft", "D", "--target", "T"], "needs --scorer DIR"),
    (["--target", "T", "--scorer", "S"], "needs --draft"),
    (["--draft", "D", "--scorer", "S"], "needs --target"),
    (["--draft", "D", "--target", "T", "--scorer", "NOTDIR"], "is not a PRM or value-model folder"),
    (["--draft", "D", "--target", "T", "--scorer", "S", "--samples", "4"], "--samples"),
    (["--draft", "D", "--target", "T", "--scorer", "S", "--weighting", "sigmoid"], "unknown weighting"),
    (["--draft", "D", "--target", "T", "--scorer", "S", "--kv-cache", "think"], "--kv-cache"),
    (["--draft", "D", "--target", "T", "--scorer", "S", "--value-model", "V"], "--value-model"),
])
def test_eval_rsd_user_errors(extra, message, saved, tmp_path, capsys):
    from rlkit.cli import main

    names = {"D": saved["draft"], "T": saved["target"], "S": saved["critic"], "V": saved["critic"],
             "NOTDIR": saved["draft"]}
    extra = [names.get(x, x) for x in extra]
    argv = ["eval", "--decoder", "rsd", "--benchmark", "synthetic", "--output-dir", str(tmp_path / "o"), *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlkit: error: ") and len(err.splitlines()) == 1 and message in err, err


def test_eval_rsd_flags_only_with_rsd(saved, tmp_path, capsys):
    from rlkit.cli import main

    for extra in (["--draft", saved["draft"]], ["--scorer", saved["critic"]], ["--threshold", "0.5"]):
        argv = ["eval", "--model", saved["target"], "--benchmark", "synthetic", "--output-dir", str(tmp_path), *extra]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "--decoder rsd" in err and len(err.splitlines()) == 1, err
    capsys.readouterr()
    assert main(["eval", "--benchmark", "synthetic", "--output-dir", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err
