"""BOLT at small scale: format adherence and outcome score after each stage (base, bootstrapped SFT, DPO iterations
1-3) and the paper's Table 3 comparison (the online stage as DPO vs as GRPO from the same SFT model).

Model and task: the built-in SmolLM2-135M-Instruct on GSM8K (``../shared/data``; ``--smoke``: the tiny char-level
model of ``recipes/bolt/tiny.yaml`` on synthetic arithmetic, seconds). The pipeline is ``recipes/bolt/
smollm2_gsm8k_cpu.yaml`` sized by the preset: Stage 1 bootstraps with 3 of the 10 shipped in-context examples, 8
samples per training query, math_accuracy of the solution part, the global 30th-percentile cut and the best per
query; Stage 2 SFTs on them (4 epochs, lr 2e-5); Stage 3 runs 3 iterations of 8 on-policy samples per prompt at T = 1
-> best/worst pairs (format violators lowest) -> DPO (beta 0.1, 2 epochs, reference = the SFT model). The GRPO arm
starts from the same SFT model, samples the same number of responses (3 x prompts x 8, 8 per group) on the same
prompts, and is rewarded by ``thought_solution``: math_accuracy of the solution part, -1 for a format violator.
Both online arms use the same learning rate (``--lr``, default 5e-6: 10x the paper's 5e-7, since they see tens of
prompts where the paper's see 33k per iteration).

Every model is evaluated on the same held-out GSM8K test problems, greedy, with the plain chat prompt (no examples):
``format`` = share of responses that pass the format filter, ``score`` = math_accuracy of the solution part with
violators scored 0 (the outcome score BOLT trains on), ``acc`` = math_accuracy of the whole response (verifiable
accuracy whatever the format). The base model is evaluated twice: zero-shot (as every trained model) and with the
3-shot in-context prompt of Stage 1 (``*_base_icl``: the bootstrapping condition); ``format_base`` / ``score_base``
are the in-context figures (zero-shot, the base never writes the markers).

    python bench/bolt.py            # 64 bootstrap queries, 32 prompts per online iteration, 100 test problems
    python bench/bolt.py --quick    # 6 queries x 4 samples, 4 prompts x 4 per iteration, 8 test problems, 160 tokens
    python bench/bolt.py --smoke    # tiny model, seconds (tests)

Ends with ``RESULT format_base=... format_sft=... score_base=... score_sft=... score_dpo1=... score_dpo3=...
score_grpo=... format_dpo3=...`` (and the other stages' figures).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, data_dir, preset_of, print_result, train  # noqa: E402

sys.path.insert(0, str(ROOT))

PRESETS = {
    "smoke": dict(recipe="tiny.yaml", queries=8, samples=4, prompts=4, test=8, tokens=80, sft_epochs=1, warmup=120,
                  lr=5e-5),
    "quick": dict(recipe="smollm2_gsm8k_cpu.yaml", queries=4, samples=4, prompts=2, test=4, tokens=128,
                  sft_epochs=4, lr=5e-6),
    # recipes/bolt/tiny.yaml as shipped (its model and warm-up) at a toy scale where the stages have something to
    # learn: --tiny (minutes)
    "tiny": dict(recipe="tiny.yaml", queries=64, samples=8, prompts=32, test=100, tokens=80, sft_epochs=4,
                 warmup=150, lr=5e-5, shrink=False),
    "full": dict(recipe="smollm2_gsm8k_cpu.yaml", queries=64, samples=8, prompts=32, test=100, tokens=320,
                 sft_epochs=4, lr=5e-6),
}
STAGES = ["base", "base_icl", "sft", "dpo1", "dpo2", "dpo3", "grpo"]


def bench_recipe(p: dict, lr: float) -> dict:
    """The shipped recipe sized by the preset, with one evaluation stage per model and the GRPO arm."""
    from rlkit.recipe import load_raw

    r = load_raw(ROOT / "recipes" / "bolt" / p["recipe"])
    tiny = p["recipe"] == "tiny.yaml"
    stages = {s["name"]: s for s in r["stages"]}
    online = copy.deepcopy(stages["online"])
    inner = {s["name"]: s for s in online["stages"]}
    gen = {"max_new_tokens": p["tokens"]}
    stages["bootstrap"]["data"] = {"train": {"limit": p["queries"]}}
    stages["bootstrap"]["args"].update(gen, num_samples=p["samples"])
    stages["sft"]["trainer"]["num_train_epochs"] = p["sft_epochs"]
    if "sft_lr" in p:
        stages["sft"]["trainer"]["learning_rate"] = p["sft_lr"]
    inner["sample"]["data"] = {"train": {"limit": p["prompts"]}}
    inner["sample"]["args"].update(gen, num_samples=p["samples"])
    inner["dpo"]["trainer"].update(learning_rate=lr, no_pairs="keep_model")  # small models: often no pair
    test = dict(r["data"]["eval"], limit=p["test"])
    plain = {"stop": stages["bootstrap"]["args"].get("stop", [])}

    def evaluate(name: str, model: str | None, icl: bool = False) -> dict:
        st = {"name": f"eval_{name}", "method": "bolt_bootstrap" if icl else "bolt_sample", "data": {"train": test},
              "args": {**gen, **plain, "num_samples": 1, "temperature": 0.0, "batch_size": 32, "chunk_size": 128}}
        if icl:
            shots = {k: v for k, v in stages["bootstrap"]["args"].items()
                     if k in ("examples", "n_shots", "instruction")}
            st["args"].update(min_selected=0, **shots)
        st["model"] = {"from": model} if model else {"name": r["model"]["name"]}
        return st

    out = []
    if tiny and p.get("shrink", True):  # seconds: a smaller model, a short warm-up at a high learning rate
        r["model"]["tiny"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        stages["warmup"]["trainer"].update(max_steps=p["warmup"], learning_rate=1e-2, warmup_steps=5,
                                           per_device_train_batch_size=16)
    if tiny:
        out.append(stages["warmup"])
    base = "warmup" if tiny else None
    out += [evaluate("base", base), evaluate("base_icl", base, icl=True), stages["bootstrap"], stages["sft"],
            evaluate("sft", "sft")]
    for it in (1, 2, 3):
        sample = copy.deepcopy(inner["sample"])
        sample.update(name=f"sample{it}", model={"from": "sft" if it == 1 else f"dpo{it - 1}"})
        dpo = copy.deepcopy(inner["dpo"])
        dpo.update(name=f"dpo{it}", model={"from": f"sample{it}"}, seed=r.get("seed", 0) + it - 1)
        dpo["data"] = {"train": {"from": f"sample{it}", "dataset": "samples"}}
        out += [sample, dpo, evaluate(f"dpo{it}", f"dpo{it}")]
    # the GRPO arm: the same SFT model, prompts, samples per prompt and total samples, the format in the reward
    budget = 3 * p["prompts"] * p["samples"]
    grpo_trainer = {"num_generations": p["samples"], "per_device_train_batch_size": p["samples"], "max_steps":
                    budget // p["samples"], "learning_rate": lr, "beta": 0.1, "temperature": 1.0,
                    "max_completion_length": p["tokens"], "lr_scheduler_type": "cosine", "warmup_steps": 0.1,
                    "logging_steps": 1}
    top = r.pop("trainer", {})  # the recipe's shared trainer keys, for the stages they were written for
    for st in out:
        if st["method"] in ("sft", "dpo"):
            st["trainer"] = {**top, **st.get("trainer", {})}
    grpo_trainer = {**{k: v for k, v in top.items() if k != "max_length"}, **grpo_trainer}
    out += [{"name": "grpo", "method": "grpo", "model": {"from": "sft"},
             "data": {"train": dict(r["data"]["train"], limit=p["prompts"])},
             "rewards": [{"name": "thought_solution", "options": {"rewards": r["rewards"], "violation_score": -1.0}}],
             "trainer": grpo_trainer}, evaluate("grpo", "grpo")]
    r["stages"] = out
    r["eval"] = dict(r.get("eval", {}), enabled=False)
    return r


def figures(run: Path) -> dict[str, dict]:
    """format / score / acc of every evaluated model, from its evaluation stage's rows."""
    import rlkit_rewards

    acc = rlkit_rewards.get("math_accuracy")
    out = {}
    for name in STAGES:
        rows = [json.loads(line) for line in (run / f"eval_{name}" / "samples.jsonl").read_text().splitlines()]
        whole = acc(prompts=[r["prompt"] for r in rows], completions=[r["completion"] for r in rows],
                    answer=[r["answer"] for r in rows])
        out[name] = {"format": sum(r["format_ok"] for r in rows) / len(rows),
                     "score": sum(r["reward"] or 0.0 for r in rows) / len(rows),
                     "acc": sum(whole) / len(rows), "n": len(rows),
                     "tokens": sum(r["completion_tokens"] for r in rows) / len(rows)}
    return out


def main() -> None:
    p = bench_parser(__doc__, quick="6 queries, 4 prompts per online iteration, 8 test problems (tens of minutes)",
                     smoke="the tiny model on synthetic arithmetic (seconds; tests)")
    p.add_argument("--tiny", action="store_true", help="recipes/bolt/tiny.yaml's model and warm-up at 64 queries, "
                   "32 prompts per iteration, 100 test problems (minutes)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both online arms (DPO and GRPO)")
    p.add_argument("--sft-lr", type=float, default=None, help="Stage 2's learning rate (default: the recipe's 2e-5)")
    for key, what in (("queries", "bootstrap queries"), ("samples", "samples per query / prompt"),
                      ("prompts", "prompts per online iteration"), ("test", "test problems"),
                      ("tokens", "new tokens per response")):
        p.add_argument(f"--{key}", type=int, default=None, help=f"{what} (default: the preset's)")
    add_jobs_threads(p, jobs=None)
    add_out(p, "output folder (default runs/bench_bolt_<preset>; finished stages are reused)", Path)
    args = p.parse_args()
    preset = "tiny" if args.tiny and not args.smoke else preset_of(args)
    cfg = dict(PRESETS[preset], **{k: getattr(args, k) for k in ("queries", "samples", "prompts", "test", "tokens")
                                    if getattr(args, k) is not None})
    if args.sft_lr is not None:
        cfg["sft_lr"] = args.sft_lr
    lr = args.lr if args.lr is not None else cfg["lr"]
    out = (args.out or ROOT / "runs" / f"bench_bolt_{preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = bench_recipe(cfg, lr)
    recipe["output_dir"] = str(out)
    t0 = time.time()
    import os

    os.environ.setdefault("RLKIT_DATA_DIR", str(data_dir()))
    train(recipe, [], out / "train.log", threads=args.threads)
    wall = time.time() - t0
    figs = figures(out)
    boot = json.loads((out / "bootstrap" / "summary.json").read_text())
    print(f"model {recipe['model']['name']}, preset {preset}: {cfg['queries']} bootstrap queries x {cfg['samples']}, "
          f"{cfg['prompts']} prompts x {cfg['samples']} per online iteration, online lr {lr:g}; {cfg['test']} test "
          f"problems, greedy, {cfg['tokens']} new tokens; wall {wall:.0f} s")
    print(f"bootstrap: format {boot['format_rate']:.3f} of {boot['samples']} samples, kept {boot['selected']} "
          f"(correct among kept {boot['selected_ok_rate']})")
    print(f"{'model':<10} {'format':>7} {'score':>7} {'acc':>7} {'tokens':>7}")
    for name, f in figs.items():
        print(f"{name:<10} {f['format']:7.3f} {f['score']:7.3f} {f['acc']:7.3f} {f['tokens']:7.1f}")
    dpo3, grpo = figs["dpo3"]["score"], figs["grpo"]["score"]
    print(f"Table 3 at this scale: score DPO x3 {dpo3:.3f} vs GRPO {grpo:.3f} (difference {dpo3 - grpo:+.3f})")
    (out / "results.json").write_text(json.dumps({"preset": preset, "settings": cfg, "lr": lr, "wall_s": wall, "figures": figs,
                                                  "bootstrap": boot}, indent=2) + "\n")
    print_result(format_base=figs["base_icl"]["format"], format_sft=figs["sft"]["format"],
                 score_base=figs["base_icl"]["score"], score_sft=figs["sft"]["score"],
                 score_dpo1=figs["dpo1"]["score"], score_dpo3=figs["dpo3"]["score"], score_grpo=grpo,
                 format_dpo3=figs["dpo3"]["format"], format_dpo1=figs["dpo1"]["format"],
                 format_dpo2=figs["dpo2"]["format"], score_dpo2=figs["dpo2"]["score"],
                 format_grpo=figs["grpo"]["format"], format_base_zeroshot=figs["base"]["format"],
                 acc_base=figs["base"]["acc"], acc_sft=figs["sft"]["acc"], acc_dpo3=figs["dpo3"]["acc"],
                 acc_grpo=figs["grpo"]["acc"], kept=boot["selected"], wall_s=round(wall))


if __name__ == "__main__":
    main()
