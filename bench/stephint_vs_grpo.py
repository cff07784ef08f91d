"""StepHint vs GRPO vs reference-replay-only on a task where the starting model makes near-miss errors.

Task and starting model: ``recipes/stephint/quickstart.yaml``. A tiny char-level Llama is SFT'd on
synthetic multi-step arithmetic whose demonstrations are imperfect (90% of the solutions ending in a
subtraction write the last result one too high), so it often answers one off. Its SFT stage is trained
once per seed and shared by the three RL runs of that seed (copied in, so ``rlkit``'s stage skip reuses it).
The RL stage differs only in the method, with the same 12 rollouts per problem and the same problems,
optimizer and schedule:

- ``grpo``: 12 rollouts from the plain prompt;
- ``stephint``: 5 unhinted + 2 at each of 3 hint levels + the exact reference chain (paper layout);
- ``replay``: 11 unhinted + the reference chain (what StepHint adds minus the hints; LUFFY-like).

Held-out greedy accuracy on 200 test problems is measured every ``eval_every`` steps. Reported per seed and
on the seed-mean curves: the final accuracy of each method and the first step at which StepHint (and
replay) reach GRPO's final accuracy, divided by the first step at which GRPO itself reaches it
(``steps_ratio``; target <= 0.6 with StepHint ending higher). A PNG of the mean curves is written next
to the results.

    python bench/stephint_vs_grpo.py              # 3 seeds, 500 SFT + 100 RL steps, eval every 10
    python bench/stephint_vs_grpo.py --quick      # 1 seed, 300 SFT + 40 RL steps
    python bench/stephint_vs_grpo.py --smoke      # seconds (tests)
    python bench/stephint_vs_grpo.py --jobs 2 --threads 1 --out runs/bench_stephint

Ends with ``RESULT steps_ratio=... acc_stephint=... acc_grpo=... acc_replay=...`` (seed means).
"""

from __future__ import annotations

import copy
import json
import math
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

RECIPE = ROOT / "recipes" / "stephint" / "quickstart.yaml"
METHODS = ("grpo", "stephint", "replay")
STEPHINT_KEYS = ("num_unhinted", "num_per_level", "num_levels", "include_reference", "hint_token_rule",
                 "hint_splitter", "hint_end_marker", "hint_min_step_tokens", "hints_path", "steps_column")
PRESETS = {  # seeds, sft steps, rl steps, eval every, eval limit, problems per step, train rows (None: all)
    "smoke": ([0], 2, 2, 1, 8, 1, 24),
    "quick": ([0], 300, 40, 10, 200, 4, None),
    "full": ([0, 1, 2], 500, 100, 10, 200, 4, None),
}


def rl_stage(base: dict, method: str, rl_steps: int, eval_every: int, problems: int) -> dict:
    stage = copy.deepcopy(next(s for s in base["stages"] if s["name"] == "rl"))
    trainer = stage["trainer"]
    trainer.update(max_steps=rl_steps, save_steps=max(rl_steps, 1), per_device_train_batch_size=12 * problems)
    stage["eval"] = dict(stage.get("eval", {}), every_steps=eval_every)
    if method == "grpo":
        stage["method"] = "grpo"
        for k in STEPHINT_KEYS:
            trainer.pop(k, None)
        trainer["num_generations"] = 12
    elif method == "replay":
        trainer.update(num_unhinted=11, num_per_level=0, include_reference=True)
    return stage


def first_reaching(curve: list[tuple[int, float]], target: float) -> float:
    for step, acc in curve:
        if step > 0 and acc >= target - 1e-9:
            return step
    return math.inf


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    return [(s, statistics.mean(dict(c)[s] for c in curves)) for s in steps]


def run(seeds, sft_steps, rl_steps, eval_every, limit, problems, train_rows, out: Path, jobs: int, threads: int,
        methods):
    base = load_recipe_dict(RECIPE)
    base["eval"] = dict(base["eval"], limit=limit)
    if train_rows is not None:
        base["data"]["train"]["limit"] = train_rows
    base["plot"] = False
    base.setdefault("reward_engine", {})["num_workers"] = 1
    next(s for s in base["stages"] if s["name"] == "sft")["trainer"]["max_steps"] = sft_steps
    out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def sft(seed):
        d = out / f"seed{seed}" / "base"
        if not done(d, "sft"):
            train(only_stages(base, "sft"), [f"output_dir={d}", f"seed={seed}"], out / f"sft_seed{seed}.log", threads)
        return summary(d, "sft")["after"]["pass@1"]

    def rl(key):
        seed, method = key
        d = out / f"seed{seed}" / method
        if not done(d, "rl"):
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "sft").exists():
                shutil.copytree(out / f"seed{seed}" / "base" / "sft", d / "sft")
            recipe = dict(base, stages=[next(s for s in base["stages"] if s["name"] == "sft"),
                                        rl_stage(base, method, rl_steps, eval_every, problems)])
            train(recipe, [f"output_dir={d}", f"seed={seed}"], out / f"{method}_seed{seed}.log", threads)
        result = {"final": summary(d, "rl")["after"]["pass@1"], "curve": heldout_curve(d, "rl"),
                  "wall_s": summary(d, "rl").get("wall_seconds")}
        with lock, open(out / "finished.jsonl", "a") as f:
            f.write(json.dumps({"seed": seed, "method": method, **result}) + "\n")
        return result

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        sft_acc = dict(zip(seeds, pool.map(sft, seeds)))
        keys = [(s, m) for s in seeds for m in methods]
        results = dict(zip(keys, pool.map(rl, keys)))
    return sft_acc, results, time.time() - t0


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", ms=3, label=method)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy accuracy (mean over seeds)")
    ax.set_title("StepHint vs GRPO vs reference replay (12 rollouts/problem)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="1 seed, 300 SFT + 40 RL steps", smoke="seconds: 2 + 2 steps, for the test suite",
                     seeds=True)
    p.add_argument("--rl-steps", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_jobs_threads(p)
    add_out(p, "output folder (default: runs/bench_stephint_<preset>)")
    a = p.parse_args(argv)
    preset = preset_of(a)
    seeds, sft_steps, rl_steps, eval_every, limit, problems, train_rows = PRESETS[preset]
    seeds, rl_steps = a.seeds or seeds, a.rl_steps or rl_steps
    out = Path(a.out or ROOT / "runs" / f"bench_stephint_{preset}")
    print(f"StepHint vs GRPO ({preset}): seeds {seeds}, {rl_steps} RL steps, methods {a.methods}, out {out}", flush=True)
    sft_acc, res, wall = run(seeds, sft_steps, rl_steps, eval_every, limit, problems, train_rows, out, a.jobs, a.threads,
                             a.methods)

    print(f"\n{'seed':>4} {'SFT':>6} " + " ".join(f"{m:>9}" for m in a.methods))
    for s in seeds:
        print(f"{s:>4} {sft_acc[s]:6.3f} " + " ".join(f"{res[(s, m)]['final']:9.3f}" for m in a.methods))
    curves = {m: mean_curve([res[(s, m)]["curve"] for s in seeds]) for m in a.methods}
    for m, c in curves.items():
        print(f"mean curve {m:>8}: " + ", ".join(f"{st}:{acc:.3f}" for st, acc in c))
    finals = {m: statistics.mean(res[(s, m)]["final"] for s in seeds) for m in a.methods}
    fields = {f"acc_{m}": finals[m] for m in a.methods}
    if "grpo" in a.methods:
        target = curves["grpo"][-1][1]
        g_steps = first_reaching(curves["grpo"], target)
        print(f"GRPO's final mean accuracy {target:.3f}, first reached at step {g_steps}")
        for m in a.methods:
            if m == "grpo":
                continue
            steps = first_reaching(curves[m], target)
            ratio = steps / g_steps if math.isfinite(steps) and g_steps else math.inf
            per_seed = []
            for s in seeds:
                tgt = res[(s, "grpo")]["final"]
                gs = first_reaching(res[(s, "grpo")]["curve"], tgt)
                ms = first_reaching(res[(s, m)]["curve"], tgt)
                per_seed.append(f"seed {s}: {ms}/{gs}")
            print(f"{m}: reaches it at step {steps} -> ratio {ratio:.2f} ({'; '.join(per_seed)})")
            key = "steps_ratio" if m == "stephint" else f"steps_ratio_{m}"
            fields[key] = ratio
    png = out / "stephint_vs_grpo.png"
    plot(curves, png)
    (out / "results.json").write_text(json.dumps({
        "sft": sft_acc, "finals": finals, "curves": curves,
        "runs": {f"{m}/seed{s}": v for (s, m), v in res.items()}}, indent=1) + "\n")
    print(f"plot {png}\nwall time {wall:.0f} s")
    order = ["steps_ratio", "acc_stephint", "acc_grpo", "acc_replay"]
    keys = [k for k in order if k in fields] + [k for k in fields if k not in order]
    print_result(**{k: float(fields[k]) if math.isfinite(fields[k]) else "inf" for k in keys})
    return 0


if __name__ == "__main__":
    sys.exit(main())
