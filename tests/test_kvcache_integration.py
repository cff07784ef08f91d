"""The ``kv_cache`` option end to end: the recipe section (per stage, validated), held-out evaluation and
``rlkit eval`` generate through the compressed cache, GRPO's HF-generate rollouts too, and the model is put
back as it was afterwards."""

from __future__ import annotations

import json

import pytest

from rlkit.kvcache import KVCacheConfig
from rlkit.kvcache import cache as kvcache_module
from rlkit.recipe import RecipeError, recipe_from_dict, resolve_runs

from conftest import TINY_SHAPE

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning"),
]

TINY = dict(TINY_SHAPE, max_position_embeddings=256)
SYNTH = {"num_train": 32, "num_test": 4}


@pytest.fixture
def cache_spy(monkeypatch):
    """Counts the compressed caches built (one per ``generate`` call) and records their configs."""
    made = []
    original = kvcache_module.CompressedKVCache.__init__

    def init(self, *args, **kwargs):
        made.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(kvcache_module.CompressedKVCache, "__init__", init)
    return made


def test_recipe_section_defaults_stage_override_and_errors():
    base = {"seed": 0, "model": {"name": "tiny"}, "data": {"train": {"name": "synthetic"}}}
    runs = resolve_runs(recipe_from_dict({**base, "method": "grpo"}, validate=False))
    assert runs[0].kv_cache == KVCacheConfig()  # kind none
    recipe = recipe_from_dict({**base, "kv_cache": {"kind": "polarquant", "rbits": 3, "tbits": 3},
                               "stages": [{"name": "a", "method": "sft"},
                                          {"name": "b", "method": "grpo", "kv_cache": {"kind": "both"}}]},
                              validate=False)
    a, b = resolve_runs(recipe)
    assert (a.kv_cache.kind, a.kv_cache.rbits) == ("polarquant", 3)
    assert (b.kv_cache.think_heads, b.kv_cache.think_scored_keys, b.kv_cache.flush_order) == \
        ("query", "all", "attend_first")                                            # the released behaviour
    assert (b.kv_cache.kind, b.kv_cache.rbits, b.kv_cache.tbits) == ("both", 3, 3)  # merged over the top level
    with pytest.raises(RecipeError, match=r"kv_cache: unknown key 'pruning'; did you mean 'pruning_ratio'"):
        recipe_from_dict({**base, "method": "grpo", "kv_cache": {"pruning": 0.5}}, validate=False)
    with pytest.raises(RecipeError, match=r"stages\[0\]\(a\)\.kv_cache: kv cache pruning_ratio must be"):
        resolve_runs(recipe_from_dict({**base, "stages": [{"name": "a", "method": "grpo",
                                                           "kv_cache": {"kind": "think", "pruning_ratio": 1.5}}]},
                                      validate=False))
    with pytest.raises(RecipeError, match="kind must be one of none, polarquant, think, both"):
        recipe_from_dict({**base, "method": "grpo", "kv_cache": {"kind": "kivi"}}, validate=False)


def test_evaluation_generates_through_the_compressed_cache(tiny_model, cache_spy):
    from rlkit.eval.math_eval import GenerationSettings, evaluate_rows
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec

    model, tok = tiny_model
    model.eval()
    rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", synthetic=SYNTH), tok).to_list()
    plain, rec0 = evaluate_rows(model, tok, rows, GenerationSettings(max_new_tokens=6, batch_size=2), progress=False)
    assert cache_spy == []
    attn = model.config._attn_implementation
    # compression that never triggers (a residual longer than any sequence, nothing pruned) changes nothing
    off = KVCacheConfig(kind="both", residual_length=4096, group_size=128, pruning_ratio=0.0)
    _, rec1 = evaluate_rows(model, tok, rows, GenerationSettings(max_new_tokens=6, batch_size=2, kv_cache=off),
                            progress=False)
    assert len(cache_spy) == 2 and all(k["think"] and k["polar"] for k in cache_spy)  # 4 rows, batches of 2
    assert [r["completion"] for r in rec1] == [r["completion"] for r in rec0]
    assert model.config._attn_implementation == attn and "generate" not in model.__dict__  # put back


def test_run_eval_cli_kv_options(tiny_model, tmp_path, cache_spy, capsys):
    from rlkit.cli import main

    model, tok = tiny_model
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--limit", "2", "--max-new-tokens", "4",
                 "--template", "plain", "--output-dir", str(out), "--kv-cache", "polarquant",
                 "--kv-option", "group_size=16", "--kv-option", "residual_length=16", "--kv-option", "lut=true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kv_cache"]["kind"] == "polarquant" and summary["kv_cache"]["lut"] is True
    assert cache_spy and cache_spy[0]["group_size"] == 16 and cache_spy[0]["lut"] is True
    # the old ThinK / PolarQuant behaviours are options (issue 20: the released ones are the defaults)
    cache_spy.clear()
    assert main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--limit", "2", "--max-new-tokens", "4",
                 "--template", "plain", "--output-dir", str(tmp_path / "eval_kv"), "--kv-cache", "both",
                 "--kv-option", "think_heads=kv", "--kv-option", "think_scored_keys=prefix",
                 "--kv-option", "flush_order=quantize_first", "--kv-option", "recent=2"]) == 0
    summary = json.loads((tmp_path / "eval_kv" / "summary.json").read_text())
    assert (summary["kv_cache"]["think_heads"], summary["kv_cache"]["flush_order"]) == ("kv", "quantize_first")
    assert cache_spy and all((k["think_heads"], k["think_scored_keys"], k["flush_order"])
                             == ("kv", "prefix", "quantize_first") for k in cache_spy)
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--output-dir", str(out),
                 "--kv-cache", "think", "--kv-option", "lut=true"]) == 2
    assert "lut=True is the PolarQuant table-lookup decode" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--output-dir", str(out),
                 "--kv-cache", "think", "--kv-option", "think_heads=group"]) == 2
    assert "think_heads must be one of query, kv" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must look like key=value"):
        main(["eval", "--model", str(ckpt), "--benchmark", "synthetic", "--kv-cache", "think", "--kv-option", "oops"])


def test_grpo_rollouts_use_the_compressed_cache(tmp_path, monkeypatch, cache_spy):
    from rlkit.pipeline import run_recipe

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = recipe_from_dict({
        "method": "grpo", "seed": 0, "output_dir": str(tmp_path / "run"), "plot": False,
        "model": {"name": "tiny", "tiny": TINY},
        "data": {"train": {"name": "synthetic", "template": "plain", "synthetic": SYNTH}},
        "rewards": [{"name": "math_accuracy"}], "reward_engine": {"enabled": False},
        "kv_cache": {"kind": "think", "pruning_ratio": 0.5, "obs_window": 4, "recent": 2},
        "trainer": dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2,
                        logging_steps=1, learning_rate=1e-3, save_strategy="no", dataloader_num_workers=0)})
    summary = run_recipe(recipe)[0]
    assert len(cache_spy) == 2 and all(k["think"] and not k["polar"] and k["pruning_ratio"] == 0.5 for k in cache_spy)
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    final, _ = load_model(ModelSpec(name=summary["final_model"]))
    assert final.config._attn_implementation != "think_sdpa"  # the saved model is a normal model


def test_grpo_refuses_kv_cache_with_vllm():
    from rlkit.methods.grpo import check_kv_cache_backend

    assert check_kv_cache_backend(KVCacheConfig(kind="none"), use_vllm=True) is None
    assert check_kv_cache_backend(None, use_vllm=True) is None
    kv = KVCacheConfig(kind="think")
    assert check_kv_cache_backend(kv, use_vllm=False) is kv
    with pytest.raises(RecipeError, match="vLLM manages its own KV cache"):
        check_kv_cache_backend(kv, use_vllm=True)
