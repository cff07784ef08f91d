"""Pretraining lab (``method: pretrain``) and the context-copying probe.

Packing and the validation split, perplexity at several context lengths against a direct computation,
the copying probe on hand-built models whose answers are known (a perfect copier scores 1, a random one
about 1/vocab), induction scores on hand-built attention maps, an end-to-end ``rlkit train`` run with the
probe logged and plotted, and resuming from a checkpoint to the same final weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rlkit.eval.copying import (ProbeError, grok_step, induction_scores, make_copy_inputs, plot_probe,
                                probe_entries, probe_log_entry, probe_token_ids, run_copy_probe)
from rlkit.methods.pretrain import (PretrainConfig, load_documents, pack, perplexity, split_validation,
                                    tokenize_documents)
from rlkit.recipe import RecipeError, recipe_from_dict

from conftest import TINY_SHAPE

TEXT = ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72 "
        "Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. #### 10 ")


# --------------------------------------------------------------------------------------------------
# Packing, documents, validation split


def test_tokenize_and_pack(char_tokenizer):
    docs = ["abc", "de"]
    ids = tokenize_documents(docs, char_tokenizer, add_eos=True)
    eos = char_tokenizer.eos_token_id
    assert ids == [char_tokenizer("abc", add_special_tokens=False)["input_ids"] + [eos],
                   char_tokenizer("de", add_special_tokens=False)["input_ids"] + [eos]]
    flat = [t for x in ids for t in x]  # 7 tokens
    blocks = pack(ids, 3)
    assert blocks.shape == (2, 3) and blocks.flatten().tolist() == flat[:6]  # remainder dropped
    assert pack(ids, 8).shape == (0, 8)
    assert tokenize_documents(docs, char_tokenizer, add_eos=False)[0] == ids[0][:-1]


def test_split_validation_is_seeded_by_document():
    docs = [[i] * 3 for i in range(40)]
    train, val = split_validation(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36 and sorted(train + val) == docs
    assert split_validation(docs, 0.1, seed=0) == (train, val)
    assert split_validation(docs, 0.1, seed=1)[1] != val
    assert split_validation(docs, 0.0) == (docs, [])
    train, val = split_validation([list(range(100))], 0.2)  # one document (txt): its tail
    assert train == [list(range(80))] and val == [list(range(80, 100))]


def test_load_documents_jsonl_txt_and_errors(tmp_path, write_jsonl):
    from rlkit.data import DataError
    from rlkit.recipe import DatasetSpec

    p = write_jsonl([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    spec = DatasetSpec(name=f"jsonl:{p}")
    assert load_documents(spec, ["question", "answer"], " | ") == ["q1 | a1", "q2 | a2"]
    assert load_documents(DatasetSpec(name=f"jsonl:{p}", limit=1), ["answer"]) == ["a1"]
    with pytest.raises(DataError, match="row 0 has no 'text' field.*text_fields"):
        load_documents(spec, ["text"])
    txt = tmp_path / "book.txt"
    txt.write_text("line one\n\nline two\n")
    assert load_documents(DatasetSpec(name=f"txt:{txt}"), ["text"]) == ["line one\n\nline two\n"]


def test_build_pretrain_data_split_eval_set_and_budget(tmp_path, write_jsonl, char_tokenizer):
    from rlkit.recipe import DataSpec, DatasetSpec
    from rlkit.methods.pretrain import build_pretrain_data

    train = write_jsonl([{"text": TEXT + str(i)} for i in range(50)], "train.jsonl")
    held = write_jsonl([{"text": TEXT[::-1]} for _ in range(10)], "held.jsonl")
    args = PretrainConfig(output_dir=str(tmp_path), seq_length=16, eval_context_lengths=[16, 48],
                          eval_max_tokens=1000, validation_split=0.2, report_to="none")
    d = build_pretrain_data(DataSpec(train=DatasetSpec(name=f"jsonl:{train}")), char_tokenizer, args)
    assert d.documents == 50 and d.train.blocks.shape[1] == 16 and d.train_tokens == d.train.blocks.numel()
    assert d.validation_ids.numel() == 1000 // 48 * 48 and len(d.eval) == d.validation_ids.numel() // 16
    row = d.train[0]
    assert torch.equal(row["input_ids"], row["labels"])
    # data.eval given: all 50 documents train, the validation text is data.eval's
    d2 = build_pretrain_data(DataSpec(train=DatasetSpec(name=f"jsonl:{train}"), eval=DatasetSpec(name=f"jsonl:{held}")),
                             char_tokenizer, args)
    assert d2.train_tokens > d.train_tokens
    rev = char_tokenizer(TEXT[::-1], add_special_tokens=False)["input_ids"]
    assert d2.validation_ids[:20].tolist() == rev[:20]
    args0 = PretrainConfig(output_dir=str(tmp_path), seq_length=16, validation_split=0.0, report_to="none")
    assert build_pretrain_data(DataSpec(train=DatasetSpec(name=f"jsonl:{train}")), char_tokenizer, args0).eval is None
    tight = PretrainConfig(output_dir=str(tmp_path), seq_length=16, eval_context_lengths=[4096], report_to="none")
    with pytest.raises(RecipeError, match="fewer than the longest evaluated context"):
        build_pretrain_data(DataSpec(train=DatasetSpec(name=f"jsonl:{train}")), char_tokenizer, tight)


def test_config_defaults_and_validation(tmp_path):
    args = PretrainConfig(output_dir=str(tmp_path), seq_length=64, report_to="none")
    assert args.eval_context_lengths == [64, 128, 256] and args.prediction_loss_only
    with pytest.raises(ValueError, match="validation_split"):
        PretrainConfig(output_dir=str(tmp_path), validation_split=1.0)
    base = {"method": "pretrain", "model": {"name": "tiny", "tiny": {"max_position_embeddings": 64}},
            "trainer": {"seq_length": 128}}
    with pytest.raises(RecipeError, match="max_position_embeddings"):
        recipe_from_dict(base)
    with pytest.raises(RecipeError, match="probe_steps"):
        recipe_from_dict({**base, "trainer": {"seq_length": 32, "probe_step": 5}})


# --------------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_equals_direct_computation(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(4, 100, (500,), generator=torch.Generator().manual_seed(0))
    for length in (16, 50, 128):
        got = perplexity(model, ids, length, batch_size=3)
        n = 500 // length
        nll, count = 0.0, 0
        with torch.no_grad():
            for b in range(n):
                x = ids[b * length:(b + 1) * length]
                logp = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1].double(), -1)
                nll -= float(logp.gather(-1, x[1:, None]).sum())
                count += length - 1
            hf = torch.stack([model(input_ids=ids[b * length:(b + 1) * length][None],
                                    labels=ids[b * length:(b + 1) * length][None]).loss for b in range(n)])
        assert got["sequences"] == n and got["tokens"] == count
        assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(float(hf.mean())), rel=1e-5)  # equal-length blocks
    assert perplexity(model, ids, 16, max_tokens=64)["sequences"] == 4


# --------------------------------------------------------------------------------------------------
# Copying probe on hand-built models


class FakeLM(torch.nn.Module):
    """``mode="copy"``: predicts the token ``n-1`` positions back once in the second copy and puts all of
    head 0's attention on the induction target; ``mode="random"``: random logits. Other heads attend
    uniformly (causally). ``attentions=False`` returns none, like sdpa."""

    def __init__(self, vocab: int, n: int, start: int, mode: str, layers: int = 2, heads: int = 3,
                 attentions: bool = True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.n, self.start, self.mode = vocab, n, start, mode
        self.layers, self.heads, self.attentions = layers, heads, attentions
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, input_ids, output_attentions=False):
        b, t = input_ids.shape
        n, s = self.n, self.start
        if self.mode == "copy":
            logits = torch.zeros(b, t, self.vocab)
            for i in range(t):
                src = i - n + 1 if i >= s + n else i
                logits[torch.arange(b), i, input_ids[:, src]] = 1.0
        else:
            logits = torch.randn(b, t, self.vocab, generator=self.gen)
        uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
        induction = torch.zeros(t, t)
        for i in range(t):
            induction[i, i - n + 1 if i >= s + n else 0] = 1.0
        layer = torch.stack([induction if self.mode == "copy" else uniform] + [uniform] * (self.heads - 1))
        atts = tuple(layer.expand(b, -1, -1, -1) for _ in range(self.layers))
        return SimpleNamespace(logits=logits, attentions=atts if self.attentions else None)


def test_copy_probe_inputs(char_tokenizer):
    ids = probe_token_ids(char_tokenizer)
    assert not set(ids) & set(char_tokenizer.all_special_ids) and len(ids) == len(char_tokenizer) - 4
    x = make_copy_inputs(ids, 8, 5, seed=3, bos_id=1)
    assert x.shape == (5, 17) and (x[:, 0] == 1).all() and torch.equal(x[:, 1:9], x[:, 9:])
    assert torch.equal(x, make_copy_inputs(ids, 8, 5, seed=3, bos_id=1))
    assert set(x[:, 1:].flatten().tolist()) <= set(ids)
    assert make_copy_inputs(ids, 8, 5, seed=3).shape == (5, 16)


def test_copy_probe_draws_are_pinned(tiny_model):
    """The probe's sequences, pinned to the values of the code before the copy task was shared with PEAR."""
    from rlkit.eval.copying import CopyingProbeCallback, CopyProbeConfig

    model, tok = tiny_model
    assert make_copy_inputs(probe_token_ids(tok), 4, 3, seed=3, bos_id=1).tolist() == [
        [1, 14, 60, 29, 7, 14, 60, 29, 7], [1, 92, 76, 4, 57, 92, 76, 4, 57], [1, 65, 23, 14, 79, 65, 23, 14, 79]]
    cb = CopyingProbeCallback(tok, 1, CopyProbeConfig(seq_length=3, num_sequences=2))
    assert cb.inputs(model).tolist() == [[1, 19, 55, 10, 19, 55, 10], [1, 57, 48, 56, 57, 48, 56]]
    cb = CopyingProbeCallback(tok, 1, CopyProbeConfig(seq_length=3, num_sequences=2, bos=False, seed=7))
    assert cb.inputs(model).tolist() == [[19, 8, 29, 19, 8, 29], [90, 71, 55, 90, 71, 55]]
    big = make_copy_inputs(probe_token_ids(tok, 98), 32, 64, seed=1234, bos_id=1).flatten()
    assert (int(big.sum()), int((big * torch.arange(big.numel())).sum())) == (207640, 426655140)


@pytest.mark.parametrize("bos", [True, False])
def test_perfect_copier_scores_one(bos):
    vocab, n = 50, 16
    start = 1 if bos else 0
    x = make_copy_inputs(list(range(4, vocab)), n, 20, seed=0, bos_id=1 if bos else None)
    r = run_copy_probe(FakeLM(vocab, n, start, "copy"), x, n, start=start, batch_size=7)
    assert r["copy_accuracy"] == 1.0 and r["copy_exact_match"] == 1.0
    assert r["induction"].shape == (2, 3)
    assert torch.allclose(r["induction"][:, 0], torch.ones(2))
    # uniform causal heads: A[i, i-n+1] = 1/(i+1), averaged over the queries i = start+n .. start+2n-2
    expect = sum(1 / (i + 1) for i in range(start + n, start + 2 * n - 1)) / (n - 1)
    assert torch.allclose(r["induction"][:, 1:], torch.full((2, 2), expect), atol=1e-6)
    assert r["induction_heads"] == 2 and r["induction_max"] == pytest.approx(1.0)
    assert r["loss_second_copy"] < r["loss_first_copy"]


def test_random_model_scores_about_one_over_vocab():
    vocab, n = 40, 32
    x = make_copy_inputs(list(range(vocab)), n, 256, seed=0, bos_id=None)
    r = run_copy_probe(FakeLM(vocab, n, 0, "random"), x, n, start=0, batch_size=64)
    assert abs(r["copy_accuracy"] - 1 / vocab) < 0.01 and r["copy_exact_match"] == 0.0
    assert r["induction_heads"] == 0


def test_probe_without_attention_weights_raises():
    x = make_copy_inputs(list(range(4, 20)), 4, 2, seed=0, bos_id=1)
    with pytest.raises(ProbeError, match="attention"):
        run_copy_probe(FakeLM(20, 4, 1, "copy", attentions=False), x, 4)


def test_induction_scores_on_known_maps():
    n, start, t = 3, 1, 7  # [BOS] a b c a b c: queries 4, 5 -> keys 2, 3
    a = torch.zeros(2, 2, t, t)
    a[:, 0, 4, 2] = 1.0
    a[:, 0, 5, 3] = 0.5
    a[0, 1, 4, 2] = 0.2
    a[1, 1, 5, 3] = 0.6
    a[:, 1, 6, 4] = 1.0  # the last token is not a scored query
    got = induction_scores([a, torch.zeros_like(a)], n, start)
    assert torch.allclose(got, torch.tensor([[0.75, 0.2], [0.0, 0.0]]))
    with pytest.raises(ProbeError):
        induction_scores([None], n, start)


def test_probe_on_tiny_model_switches_to_eager_and_back(tiny_model):
    model, tok = tiny_model
    assert model.config._attn_implementation == "sdpa"
    model.train()
    x = make_copy_inputs(probe_token_ids(tok), 8, 6, seed=0, bos_id=tok.bos_token_id)
    r = run_copy_probe(model, x, 8, batch_size=4)
    assert model.config._attn_implementation == "sdpa" and model.training
    assert r["induction"].shape == (2, 4) and 0.0 <= r["copy_accuracy"] <= 1.0
    entry = probe_log_entry(r)
    assert set(entry) >= {"probe/copy_accuracy", "probe/induction/L1H3", "probe/induction/L0_max"}
    assert entry["probe/induction/L1_max"] == pytest.approx(float(r["induction"][1].max()), abs=1e-6)


def test_grok_step_and_plot(tmp_path):
    hist = [{"step": s, "probe/copy_accuracy": a, "probe/induction_max": a, "probe/induction/L0_max": a / 2,
             "probe/induction/L1_max": a} for s, a in [(0, 0.0), (10, 0.3), (20, 0.7), (30, 0.9)]]
    hist.append({"step": 10, "loss": 3.0})
    assert grok_step(probe_entries(hist)) == 20
    assert plot_probe(hist, tmp_path / "p.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------------
# End to end through `rlkit train`, and resume


def _recipe(tmp_path: Path, write_jsonl, **trainer) -> Path:
    rows = [{"question": f"{TEXT[i:]} {i}", "answer": TEXT[: 40 + i]} for i in range(60)]
    data = write_jsonl(rows, "text.jsonl")
    recipe = {
        "method": "pretrain", "seed": 0,
        "model": {"name": "tiny", "tiny": TINY_SHAPE},
        "data": {"train": {"name": f"jsonl:{data}"}},
        "trainer": {"text_fields": ["question", "answer"], "seq_length": 32, "validation_split": 0.1,
                    "eval_context_lengths": [32, 64], "eval_max_tokens": 512, "probe_steps": 2,
                    "probe_seq_length": 8, "probe_num_sequences": 8, "max_steps": 4, "save_steps": 2,
                    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
                    "logging_steps": 1, "dataloader_num_workers": 0, **trainer},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _final_state(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_rlkit_train_end_to_end_then_resume(tmp_path, write_jsonl, monkeypatch):
    from rlkit.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = _recipe(tmp_path, write_jsonl)
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={out}"]) == 0

    history = json.loads((out / "log_history.json").read_text())
    probes = probe_entries(history)
    assert [p["step"] for p in probes] == [0, 2, 4]
    assert all(0.0 <= p["probe/copy_accuracy"] <= 1.0 and "probe/induction/L1H3" in p for p in probes)
    assert (out / "probe.png").stat().st_size > 1000
    saved = json.loads((out / "probe_history.json").read_text())
    assert [h["step"] for h in saved["history"]] == [0, 2, 4] and "grok_step" in saved
    ppl = json.loads((out / "perplexity.json").read_text())
    assert set(ppl["ppl"]) == {"32", "64"} and ppl["step"] == 4
    assert ppl["validation_tokens"] % 64 == 0 and 0 < ppl["validation_tokens"] <= 512
    evals = [h for h in history if "eval_ppl_64" in h]
    assert evals and evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-6)
    assert evals[-1]["eval_ppl_32"] == pytest.approx(ppl["ppl"]["32"])
    assert (out / "final" / ".rlkit_done").exists() and (out / "final" / "model.safetensors").exists()
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]

    # Resume: a fresh output folder holding only checkpoint-2 continues to the same final weights.
    out2 = tmp_path / "resumed"
    out2.mkdir()
    shutil.copytree(out / "checkpoint-2", out2 / "checkpoint-2")
    assert main(["train", str(recipe), f"output_dir={out2}", "--resume"]) == 0
    h2 = json.loads((out2 / "log_history.json").read_text())
    assert [p["step"] for p in probe_entries(h2)] == [0, 2, 4]
    assert [h["step"] for h in h2 if "loss" in h] == [1, 2, 3, 4]
    a, b = _final_state(out), _final_state(out2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_pretrain_with_hope_patch(tmp_path, write_jsonl, monkeypatch):
    """``model.patches`` reach the trained model, and the saved model loads back patched."""
    from rlkit.patches import available_patches

    if "hope" not in available_patches():
        pytest.skip("the hope patch is not installed")
    from rlkit.cli import main
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = _recipe(tmp_path, write_jsonl, max_steps=2, probe_steps=0, save_strategy="no")
    out = tmp_path / "hope"
    assert main(["train", str(recipe), f"output_dir={out}", "model.patches=[{name: hope, train_length: 32}]"]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["rlkit_patches"] == [
        {"name": "hope", "train_length": 32}]
    assert json.loads((out / "perplexity.json").read_text())["ppl"]["64"] > 0
    model, _ = load_model(ModelSpec(name=str(out / "final")))
    inv = model.model.rotary_emb.inv_freq
    assert (inv == 0).any() and (inv > 0).any()
    assert not (out / "probe.png").exists()


def test_shipped_recipes_validate(repo_root):
    from rlkit.recipe import load_recipe

    paths = sorted((repo_root / "recipes" / "pretrain").glob("*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        r = load_recipe(p)
        assert r.method == "pretrain"
