"""StepHint with vLLM colocated rollouts on SmolLM2-135M, and the stale-weights guard (run by tests/test_vllm.py
in a subprocess: a colocated engine initialises torch.distributed in its process).

Trains one StepHint step through rlkit's method contract with ``use_vllm: true, vllm_mode: colocate`` and prints
one JSON line: whether every hinted member's completion starts with its hint tokens and goes on, the probe's
gap after the real weight syncs, and what the guard did when the policy moved without a sync.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str, data: str) -> None:
    import torch

    from rlkit.methods import RunContext, get_method
    from rlkit.models import load_model
    from rlkit.recipe import recipe_from_dict, resolve_runs

    recipe = recipe_from_dict({
        "method": "stephint", "seed": 0, "output_dir": out, "plot": False,
        "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {"train": {"name": "gsm8k", "split": "train", "template": "chat", "limit": 4, "path": data}},
        "rewards": [{"name": "math_accuracy"}],
        "reward_engine": {"enabled": False},
        "vllm": {"max_model_len": 1024},
        "trainer": {"max_steps": 1, "per_device_train_batch_size": 6, "num_unhinted": 2, "num_per_level": 1,
                    "num_levels": 3, "include_reference": True, "max_completion_length": 24, "beta": 0.0,
                    "learning_rate": 1e-6, "logging_steps": 1, "save_strategy": "no", "bf16": False,
                    "hint_splitter": "paragraph", "use_vllm": True, "vllm_mode": "colocate",
                    "vllm_max_model_length": 1024, "dataloader_num_workers": 0},
    })
    (run,) = resolve_runs(recipe)
    method = get_method("stephint")
    model, tok = load_model(run.model, seed=0)
    ctx = RunContext(model=model, tokenizer=tok, final_dir=Path(out) / "final")
    trainer = method.build_trainer(run, ctx, method.make_config(run))

    captured = []
    generate = trainer._generate_single_turn

    def spy(*args, **kwargs):
        result = generate(*args, **kwargs)
        if trainer._plan is not None:
            captured.append(([list(m.prefix) for m in trainer._plan], [m.reference for m in trainer._plan],
                             [m.role for m in trainer._plan], [list(ids) for ids in result[0]]))
        return result

    trainer._generate_single_turn = spy
    trainer.train()

    hinted = starts = continued = 0
    for prefixes, refs, roles, outs in captured:
        for prefix, ref, role, ids in zip(prefixes, refs, roles, outs):
            if prefix and not ref and role > 0:
                hinted += 1
                starts += ids[:len(prefix)] == prefix
                continued += len(ids) > len(prefix)
    probes = [h["vllm/sync_probe_max_abs_logprob_diff"] for h in trainer.state.log_history
              if "vllm/sync_probe_max_abs_logprob_diff" in h]

    report = {"hinted": hinted, "start_with_hint": starts, "continued": continued, "probe_max_diff": probes}
    # the guard: the policy moves but vLLM is not synced (a sync that did nothing)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(1.05)
    try:
        trainer.check_vllm_weights()
        report["stale_detected"] = False
    except RuntimeError as e:
        report["stale_detected"] = "weight sync check failed" in str(e)
    trainer.vllm_generation.sync_weights()  # a real sync (wrapped: sync, then probe) makes it pass again
    report["after_resync"] = trainer.check_vllm_weights().max_abs_diff
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
