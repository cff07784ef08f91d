"""Reward-guided speculative decoding vs draft-only, target-only and best-of-N with the draft: accuracy and FLOPs.

Models: ``recipes/rsd/tiny.yaml``. The **draft** is the tiny char-level Llama generator of ``recipes/prm/tiny.yaml``
(0.8M parameters), SFT'd on demonstrations that end one too high on 90% of final subtractions, so it often
answers one off; the **target** is a 4x larger model (3.2M) SFT'd on exact demonstrations; the **PRM** is the
ER-PRM trained on the draft's own rollouts (0.8M, the draft's size, as the paper's 1.5B PRM with a 1.5B draft).
One step is one line (separator ``"\\n"``); decoding is greedy, as the paper's code.

On the held-out problems: draft-only and target-only decoding through the same step loop; best-of-N (N = 8)
sampled from the draft at temperature 1 and picked by the PRM's min-over-steps score; RSD with the binary
weighting at delta in {0.5, 0.6, 0.7, 0.8, 0.9}; and, as a control, RSD at delta 0.7 steered by an exact step
verifier of the task (the OREO bench's oracle) instead of the learned PRM, with its cost counted as the PRM's. FLOPs = 2 x parameters x tokens, counted two ways: **processed**
tokens (every context token a model prefills, with a prefix cache, plus the tokens it generates: the honest
compute count), and **generated** tokens only for the draft and the target (the PRM's scored tokens always
count), which is closer to how decoding cost is usually quoted. The paper's claim: RSD reaches the target's
accuracy (or beats it) with far fewer FLOPs, up to 4.4x fewer (the configuration and the FLOPs formula behind
that figure are not published).

    python bench/rsd.py            # 512 labelled problems, 500 test problems
    python bench/rsd.py --quick    # the recipe as shipped (256 labelled problems), 200 test problems
    python bench/rsd.py --smoke    # seconds (tests)

Ends with ``RESULT acc_target=... acc_draft=... acc_rsd=... flops_ratio_rsd_target=... acceptance_rate=...``
(RSD at delta 0.7; ``flops_ratio_rsd_target`` = RSD FLOPs / target-only FLOPs, processed tokens).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, done, preset_of, print_result, train  # noqa: E402

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "rsd" / "tiny.yaml"
DELTAS = (0.5, 0.6, 0.7, 0.8, 0.9)
PRESETS = {
    "smoke": dict(sft_steps=30, target_steps=10, problems=6, samples=2, rollouts=2, epochs=1, test=8, bon=2,
                  deltas=(0.7,), target_shape={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "num_key_value_heads": 2}),
    "quick": dict(sft_steps=500, target_steps=500, problems=256, samples=4, rollouts=16, epochs=3, test=200, bon=8,
                  deltas=DELTAS),
    "full": dict(sft_steps=500, target_steps=500, problems=512, samples=4, rollouts=16, epochs=3, test=500, bon=8,
                 deltas=DELTAS),
}


def bench_recipe(p: dict) -> dict:
    from rlkit.recipe import load_raw

    r = load_raw(RECIPE)
    stages = {s["name"]: s for s in r["stages"]}
    stages["policy"]["trainer"]["max_steps"] = p["sft_steps"]
    stages["target"]["trainer"]["max_steps"] = p["target_steps"]
    if p.get("target_shape"):  # the smoke preset: a small target, fast (its numbers mean nothing)
        stages["target"]["model"]["tiny"].update(p["target_shape"])
    stages["sample"]["data"] = {"train": {"limit": p["problems"]}}
    stages["sample"]["args"]["num_samples"] = p["samples"]
    stages["label"]["args"]["num_rollouts"] = p["rollouts"]
    stages["prm"]["trainer"]["num_train_epochs"] = p["epochs"]
    r["eval"] = dict(r.get("eval", {}), limit=min(p["test"], 200))
    return r


def flops(models: dict, generated_only: bool = False) -> float:
    """FLOPs of a summary's ``models`` (2 x parameters x tokens); ``generated_only``: the draft's and target's
    generated tokens only (the PRM's processed tokens always count)."""
    total = 0.0
    for role, m in models.items():
        tokens = m["generated_tokens"] if generated_only and role != "prm" else m["tokens_processed"]
        total += 2.0 * m["parameters"] * tokens
    return total


def run(out: Path, p: dict, threads: int) -> dict:
    import torch

    from rlkit.data import build_dataset
    from rlkit.eval.math_eval import judge
    from rlkit.models import load_model
    from rlkit.process_reward import ProcessRewardModel
    from rlkit.recipe import DatasetSpec, ModelSpec, load_raw
    from rlkit.rollout import GenerationSettings, generate
    from rlkit.rollout.rsd import DecodingModel, RSDSettings, best_of_n_cost, rsd_decode, step_decode, summarize

    torch.set_num_threads(threads)
    draft = DecodingModel(*load_model(ModelSpec(name=str(out / "policy" / "final"))))
    target = DecodingModel(*load_model(ModelSpec(name=str(out / "target" / "final"))))
    prm = ProcessRewardModel.from_pretrained(out / "prm" / "final")
    prm.batch_size = 256
    spec = load_raw(RECIPE)["data"]["eval"]
    rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", limit=p["test"],
                                     synthetic=dict(spec["synthetic"], num_test=max(p["test"], 200))),
                         draft.tokenizer).to_list()
    prompts = [r["prompt"] for r in rows]
    settings = RSDSettings(step_separator="\n", max_step_tokens=24, max_total_tokens=48, max_steps=12, seed=0)
    results: dict[str, dict] = {}

    def record(name: str, res: list, seconds: float) -> None:
        s = summarize(res)
        acc = sum(judge(r.text, row["answer"])[1] for r, row in zip(res, rows)) / len(rows)
        results[name] = {"acc": acc, "flops": flops(s["models"]), "flops_generated": flops(s["models"], True),
                         "acceptance_rate": s["acceptance_rate"],
                         "target_step_share": s["target_steps"] / max(1, s["steps"]),
                         "models": s["models"], "seconds": round(seconds, 1)}

    for role, model in (("draft", draft), ("target", target)):
        t0 = time.time()
        record(f"{role}_only", step_decode(model, prompts, settings, role=role, progress=False), time.time() - t0)
    for delta in p["deltas"]:
        t0 = time.time()
        res = rsd_decode(draft, target, prm, prompts, RSDSettings(**{**settings.__dict__, "threshold": delta}),
                         progress=False)
        record(f"rsd_{delta}", res, time.time() - t0)
    # a control: RSD steered by an exact step verifier of the task instead of the learned PRM (its cost counted
    # as a PRM of the learned one's size), separating the decoding rule from the PRM's quality
    from oreo import oracle_value
    from rlkit.rollout.search import FunctionScorer

    t0 = time.time()
    res = rsd_decode(draft, target, FunctionScorer(oracle_value), prompts, settings,
                     scorer_parameters=prm.num_parameters(), progress=False)
    record("rsd_oracle", res, time.time() - t0)
    # best-of-N with the draft, picked by the PRM (cost: N samples sharing one prompt prefill, and PRM scoring)
    t0 = time.time()
    gen = GenerationSettings(max_new_tokens=48, batch_size=256, temperature=1.0, seed=0)
    outs = generate(draft.model, draft.tokenizer, prompts, gen, num_samples=p["bon"], do_sample=True, progress=False)
    texts = [c.text for cs in outs for c in cs]
    flat = prm.score_texts([q for q in prompts for _ in range(p["bon"])], texts)
    correct, f_proc, f_gen = 0, 0.0, 0.0
    n_draft, n_prm = draft.num_parameters(), prm.num_parameters()
    for i, (row, cs) in enumerate(zip(rows, outs)):
        scores = flat[i * p["bon"]:(i + 1) * p["bon"]]
        best = max(range(len(cs)), key=lambda j: (scores[j], -j))
        correct += judge(cs[best].text, row["answer"])[1]
        prm_ids = [prm.encode(prompts[i], prm.split(c.text))[0] for c in cs]
        prompt_len = len(prm.encode(prompts[i], [])[0])
        cost = best_of_n_cost(draft.tokenizer(prompts[i])["input_ids"], [c.token_ids for c in cs], n_draft,
                              prm_prompt_ids=prm_ids[0][:prompt_len],
                              prm_completion_ids=[x[prompt_len:] for x in prm_ids], prm_parameters=n_prm)
        f_proc += cost["flops"]
        f_gen += flops(cost["models"], generated_only=True)
    results[f"bon_{p['bon']}"] = {"acc": correct / len(rows), "flops": f_proc, "flops_generated": f_gen,
                                  "seconds": round(time.time() - t0, 1)}
    results["parameters"] = {"draft": n_draft, "target": target.num_parameters(), "prm": n_prm}
    return results


def main() -> None:
    p = bench_parser(__doc__, quick="the recipe as shipped (256 labelled problems), 200 test problems", smoke="a few steps (tests)")
    add_jobs_threads(p, jobs=None)
    add_out(p, "output folder (default runs/bench_rsd[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = PRESETS[preset]
    out = a.out or ROOT / "runs" / ("bench_rsd" + ("" if preset == "full" else f"_{preset}"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (done(out, "prm") and done(out, "target")):
        train(bench_recipe(cfg), [f"output_dir={out}"], out / "train.log", a.threads)
    train_s = time.time() - t0
    res = run(out, cfg, a.threads)
    target = res["target_only"]
    print(f"\nparameters: {json.dumps(res['parameters'])}; {cfg['test']} test problems, greedy, one line per step")
    print(f"{'decoder':>12} {'acc':>6} {'FLOPs':>10} {'vs target':>9} {'FLOPs(gen)':>11} {'vs target':>9} "
          f"{'accept':>7} {'target steps':>12}")
    for name, r in res.items():
        if name == "parameters":
            continue
        acc_rate = r.get("acceptance_rate")
        share = r.get("target_step_share")
        print(f"{name:>12} {r['acc']:6.3f} {r['flops']:10.3e} {r['flops'] / target['flops']:9.3f} "
              f"{r['flops_generated']:11.3e} {r['flops_generated'] / target['flops_generated']:9.3f} "
              f"{'' if acc_rate is None else f'{acc_rate:.3f}':>7} {'' if share is None else f'{share:.3f}':>12}")
    print(f"\ntraining {train_s:.0f} s")
    (out / "results.json").write_text(json.dumps({"preset": preset, **res}, indent=2) + "\n")
    main_delta = 0.7
    rsd = res[f"rsd_{main_delta}"]
    figures = dict(acc_target=target["acc"], acc_draft=res["draft_only"]["acc"], acc_rsd=rsd["acc"],
                   flops_ratio_rsd_target=rsd["flops"] / target["flops"],
                   flops_ratio_rsd_target_generated=rsd["flops_generated"] / target["flops_generated"],
                   acceptance_rate=rsd["acceptance_rate"], target_step_share=rsd["target_step_share"],
                   acc_rsd_oracle=res["rsd_oracle"]["acc"],
                   flops_ratio_rsd_oracle_target=res["rsd_oracle"]["flops"] / target["flops"],
                   acc_bon=res[f"bon_{cfg['bon']}"]["acc"],
                   flops_ratio_bon_target=res[f"bon_{cfg['bon']}"]["flops"] / target["flops"])
    for delta in cfg["deltas"]:
        if delta != main_delta:
            figures[f"acc_rsd_{int(round(delta * 10)):02d}"] = res[f"rsd_{delta}"]["acc"]
            figures[f"flops_ratio_rsd_{int(round(delta * 10)):02d}"] = res[f"rsd_{delta}"]["flops"] / target["flops"]
    print_result(**figures)


if __name__ == "__main__":
    main()
