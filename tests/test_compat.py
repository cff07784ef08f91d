"""rlkit.compat: the cache argument under both names, and the deprecation watch the test suite relies on."""

from __future__ import annotations

import warnings

import pytest
import torch

from rlkit.compat import cache_from_call, cache_kwarg, cache_kwargs, output_cache, record_own_deprecations
from rlkit.kvcache import KVCacheConfig, make_cache, prepare_model, restore_model
from rlkit.kvcache.attention import _pre_hook, attention_modules


@pytest.mark.parametrize("how", ["cache", "past_key_values", "positional"])
def test_kv_hook_finds_the_cache_under_either_name(tiny_model, how):
    """The ThinK/LUT pre-hook must see a compressed cache whichever way the attention module gets it:
    ``cache=`` (transformers >= 5.24), ``past_key_values=`` (older) or positionally."""
    model, _ = tiny_model
    cfg = KVCacheConfig(kind="think")
    prepare_model(model, cfg)
    try:
        cache = make_cache(model, cfg)
        module = attention_modules(model)[1]
        if how == "positional":
            _pre_hook(module, (torch.zeros(1), None, None, cache), {})
        else:
            _pre_hook(module, (), {how: cache})
        assert module.rlkit_kv_layer() is cache.layers[1]
        assert cache.layers[1].attn_impl == "think_sdpa"
        _pre_hook(module, (), {how if how != "positional" else "cache": None})  # training: no cache
        assert module.rlkit_kv_layer is None
    finally:
        restore_model(model)


def test_cache_helpers_round_trip(tiny_model):
    model, tok = tiny_model
    enc = tok(["12+3="], return_tensors="pt")
    out = model(**enc, use_cache=True)
    cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == enc["input_ids"].shape[1]
    assert cache_kwarg() in ("cache", "past_key_values")
    step = model(input_ids=enc["input_ids"][:, -1:], **cache_kwargs(cache), use_cache=True)
    assert output_cache(step).get_seq_length() == enc["input_ids"].shape[1] + 1
    assert cache_from_call((), {"past_key_values": 1}) == 1 and cache_from_call((), {"cache": 2}) == 2
    assert cache_from_call((0, 0, 0, 3), {}) == 3 and cache_from_call((), {}) is None


# --- the deprecation watch -------------------------------------------------------------------------

def _module(name: str, source: str, **names) -> dict:
    """Run ``source`` as if it were module ``name`` (its frames report that package)."""
    namespace = {"__name__": name, "warnings": warnings, **names}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace


def _fake_dependencies():
    lib = _module("transformers.fake", (
        "def old_api(x=None):\n"
        "    warnings.warn('`x` is deprecated', FutureWarning, stacklevel=2)\n"
        "def wrapper(x=None):\n"
        "    return old_api(x)\n"))
    trl = _module("trl.fake", "def train():\n    return wrapper(1)\n", wrapper=lib["wrapper"])
    return lib, trl


def test_own_call_into_a_deprecated_api_is_caught():
    lib, _ = _fake_dependencies()
    with warnings.catch_warnings(record=True), record_own_deprecations() as caught:
        warnings.simplefilter("always")
        lib["wrapper"](1)  # this test file calls transformers, which warns inside its own frames
    assert len(caught) == 1 and "test_compat.py" in caught[0] and "deprecated" in caught[0]


def test_dependency_calling_a_dependency_is_not_blamed_on_rlkit():
    _, trl = _fake_dependencies()
    with warnings.catch_warnings(record=True) as shown, record_own_deprecations() as caught:
        warnings.simplefilter("always")
        trl["train"]()
    assert caught == [] and len(shown) == 1  # still shown, just not ours


def test_warnings_are_still_recorded_while_watched():
    lib, _ = _fake_dependencies()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with record_own_deprecations():
            lib["old_api"]()
    assert [str(w.message) for w in shown] == ["`x` is deprecated"]


@pytest.mark.allow_deprecated
@pytest.mark.skipif(cache_kwarg() != "cache", reason="this transformers has no `cache` argument yet")
def test_the_real_rename_is_caught(tiny_model):
    """transformers >= 5.24: ``generate(past_key_values=...)`` from our code is reported (this test is
    marked so that the suite's own watch lets it through)."""
    from transformers import DynamicCache

    model, tok = tiny_model
    enc = tok(["1+1="], return_tensors="pt")
    with record_own_deprecations() as caught:
        model.generate(**enc, max_new_tokens=2, do_sample=False, past_key_values=DynamicCache())
    assert any("past_key_values" in c for c in caught), caught
    with record_own_deprecations() as caught:
        model.generate(**enc, max_new_tokens=2, do_sample=False, **cache_kwargs(DynamicCache()))
    assert caught == []


def test_renamed_trainer_fields_take_either_spelling():
    from rlkit.compat import trainer_field

    new = {"activation_checkpointing", "gradient_checkpointing", "learning_rate"}  # transformers >= 5.23
    old = {"gradient_checkpointing", "learning_rate"}                               # before 5.23
    assert trainer_field("gradient_checkpointing", new) == "activation_checkpointing"  # no deprecation
    assert trainer_field("activation_checkpointing", new) == "activation_checkpointing"
    assert trainer_field("activation_checkpointing", old) == "gradient_checkpointing"
    assert trainer_field("gradient_checkpointing", old) == "gradient_checkpointing"
    assert trainer_field("activation_checkpointing_kwargs", {"gradient_checkpointing_kwargs"}) == \
        "gradient_checkpointing_kwargs"
    assert trainer_field("learning_rate", old) == "learning_rate"


def test_recipe_takes_either_checkpointing_spelling(tmp_path):
    from rlkit.recipe import recipe_from_dict, resolve_runs
    from rlkit.methods import get_method

    for key in ("gradient_checkpointing", "activation_checkpointing"):
        recipe = recipe_from_dict({"method": "sft", "output_dir": str(tmp_path), "trainer": {key: True}})
        run = resolve_runs(recipe)[0]
        args = get_method("sft").make_config(run)
        assert args.gradient_checkpointing is True
