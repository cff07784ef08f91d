"""Noisy-reward experiment on the quickstart task: does GRPO still learn when rewards are flipped?

The claim under test (Lv et al., arXiv 2505.22653, "The Climb Carves Wisdom Deeper Than the Summit"):
RL with question-wise flipped math rewards still learns at a 40% flip rate, and a reward that only counts
reasoning phrases (RPR) recovers much of the gain. Conditions, each from the SAME SFT checkpoint:

- ``p0``: ``math_accuracy`` (clean verifier)
- ``p0.2`` / ``p0.4``: ``noisy`` wrapping ``math_accuracy``, question-wise flip probability 0.2 / 0.4
- ``rpr``: ``rpr`` only (no correctness signal at all)

The task and schedule are ``recipes/quickstart.yaml``: its SFT stage is trained once per seed, copied into
each condition's folder (so ``rlkit``'s stage skip reuses it), and only the GRPO stage's ``rewards`` differ.
Each condition runs ``rlkit train`` in its own process (``--jobs`` at a time, ``--threads`` torch threads
each, one reward worker each). Reported: held-out greedy accuracy on 200 test problems after SFT and after
GRPO, per seed and averaged.

    python bench/noisy_rewards.py                     # 3 seeds, 150 GRPO steps (quickstart schedule)
    python bench/noisy_rewards.py --quick             # 1 seed, 60 GRPO steps, 300 SFT steps
    python bench/noisy_rewards.py --smoke             # seconds: 1 seed, 2 + 2 steps (tests)
    python bench/noisy_rewards.py --seeds 0 1 2 --jobs 12 --threads 1 --out runs/noisy

Ends with ``RESULT acc_sft=... acc_p0=... acc_p02=... acc_p04=... acc_rpr=...`` (means over seeds).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, done, heldout_curve, load_recipe_dict,  # noqa: E402
                   only_stages, preset_of, print_result, summary, train)

RECIPE = ROOT / "recipes" / "quickstart.yaml"

CONDITIONS = {
    "p0": [{"name": "math_accuracy"}],
    "p0.2": [{"name": "noisy", "options": {"p": 0.2}}],
    "p0.4": [{"name": "noisy", "options": {"p": 0.4}}],
    "rpr": [{"name": "rpr"}],
}

PRESETS = {  # seeds, sft steps, grpo steps, eval limit, grpo batch
    "smoke": ([0], 2, 2, 8, 16),
    "quick": ([0], 300, 60, 200, 64),
    "full": ([0, 1, 2], None, None, 200, None),  # None: the recipe's own values
}


def _overrides(out: Path, seed: int, sft_steps, grpo_steps, limit, batch) -> list[str]:
    o = [f"output_dir={out}", f"seed={seed}", f"eval.limit={limit}", "reward_engine.num_workers=1",
         "plot=false"]
    if sft_steps is not None:
        o.append(f"stages.sft.trainer.max_steps={sft_steps}")
    if grpo_steps is not None:
        o += [f"stages.grpo.trainer.max_steps={grpo_steps}", f"stages.grpo.trainer.save_steps={max(1, grpo_steps)}",
              f"stages.grpo.eval.every_steps={max(1, grpo_steps // 6)}"]
    if batch is not None:
        o.append(f"stages.grpo.trainer.per_device_train_batch_size={batch}")
    return o


def run(seeds, sft_steps, grpo_steps, limit, batch, out: Path, jobs: int, threads: int, conditions) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lock = threading.Lock()

    def sft(seed: int) -> float:
        base = out / f"seed{seed}" / "base"
        if not done(base, "sft"):
            overrides = [o for o in _overrides(base, seed, sft_steps, grpo_steps, limit, batch) if "stages.grpo" not in o]
            train(only_stages(load_recipe_dict(RECIPE), "sft"), overrides, out / f"sft_seed{seed}.log", threads)
        return summary(base, "sft")["after"]["pass@1"]

    def grpo(seed: int, cond: str) -> dict:
        run_dir = out / f"seed{seed}" / cond
        if not done(run_dir, "grpo"):
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "sft").exists():
                shutil.copytree(out / f"seed{seed}" / "base" / "sft", run_dir / "sft")
            rewards = copy.deepcopy(CONDITIONS[cond])
            for r in rewards:
                if r["name"] == "noisy":
                    r["options"]["seed"] = seed  # flip draws differ between experiment seeds
            overrides = _overrides(run_dir, seed, sft_steps, grpo_steps, limit, batch)
            train(RECIPE, overrides + ["stages.grpo.rewards=" + json.dumps(rewards)], out / f"{cond}_seed{seed}.log",
                  threads)
        s = summary(run_dir, "grpo")
        result = {"before": s["before"]["pass@1"], "after": s["after"]["pass@1"],
                  "curve": heldout_curve(run_dir, "grpo"), "wall_s": s.get("wall_seconds")}
        with lock, open(out / "finished.jsonl", "a") as f:  # partial results survive an interrupted run
            f.write(json.dumps({"seed": seed, "condition": cond, **result}) + "\n")
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        sft_acc = dict(zip(seeds, pool.map(sft, seeds)))
        keys = [(s, c) for s in seeds for c in conditions]
        results = dict(zip(keys, pool.map(lambda k: grpo(*k), keys)))
    return {"sft": sft_acc, "grpo": results, "wall_s": time.time() - t0}


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="1 seed, 300 SFT + 60 GRPO steps", smoke="seconds: 2 + 2 steps, for the test suite",
                     seeds=True)
    p.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    add_jobs_threads(p, jobs=1)
    add_out(p, "output folder (default: a folder under runs/)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    preset = preset_of(a)
    seeds, sft_steps, grpo_steps, limit, batch = PRESETS[preset]
    seeds = a.seeds or seeds
    out = Path(a.out or ROOT / "runs" / f"bench_noisy_{preset}")
    print(f"noisy-reward experiment ({preset}): seeds {seeds}, conditions {a.conditions}, out {out}", flush=True)
    res = run(seeds, sft_steps, grpo_steps, limit, batch, out, a.jobs, a.threads, a.conditions)

    print(f"\n{'seed':>4} {'after SFT':>10} " + " ".join(f"{c:>8}" for c in a.conditions))
    for s in seeds:
        row = " ".join(f"{res['grpo'][(s, c)]['after']:8.3f}" for c in a.conditions)
        print(f"{s:>4} {res['sft'][s]:10.3f} {row}")
    means = {"sft": statistics.mean(res["sft"].values())}
    for c in a.conditions:
        vals = [res["grpo"][(s, c)]["after"] for s in seeds]
        means[c] = statistics.mean(vals)
        spread = f" (min {min(vals):.3f}, max {max(vals):.3f})" if len(vals) > 1 else ""
        print(f"{c:>5}: mean held-out accuracy after GRPO {means[c]:.3f}, {means[c] - means['sft']:+.3f} vs SFT{spread}")
    for s in seeds:
        for c in a.conditions:
            curve = res["grpo"][(s, c)]["curve"]
            print(f"curve seed {s} {c}: " + ", ".join(f"{st}:{acc:.3f}" for st, acc in curve))
    print(f"wall time {res['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "sft": res["sft"], "means": means,
            "runs": {f"{c}/seed{s}": v for (s, c), v in res["grpo"].items()}}, indent=1) + "\n")
    print_result(**{f"acc_{k.replace('.', '')}": float(v) for k, v in means.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
