"""DR-ICL vs plain many-shot NLL fine-tuning from the same SmolLM2-135M-Instruct: many-shot accuracy on held-out
tasks at 0, 1, 5, 10, 25, 50 and 100 demonstrations.

Task: ``recipes/dricl/smollm2.yaml``. A ``manyshot_data`` stage writes many-shot episodes (ICL-50 format) of the
built-in *training* tasks (``rlkit.data.manyshot``; every kind in turn), packed into a token budget of the model's
chat template; from the one base model, per seed:

- ``nll``: ``method: dricl`` with ``train_type: many-shot``, the plain causal NLL of every answer (the paper's
  many-shot fine-tuning baseline);
- ``dricl``: ``train_type: dynamic-shot``, ``schema: all``: 1/2[(1 + 0.2) L_many' + (1 - 0.2) L_zero] with the
  released reweighting (W 10, gamma 11);

and the base model as it is. Every model is evaluated by ``rlkit.eval.manyshot.evaluate_manyshot`` on *held-out*
tasks (rules no training task uses): greedy, exact match, the same queries and nested demonstrations for every k.
The paper's claim (Llama-2-7B-chat / Mistral-7B on ICL-50): with DR-ICL the many-shot accuracy stays above the
zero-shot one and does not fall as the shots grow, where NLL fine-tuning's does.

    python bench/dricl.py            # 2 seeds, 128 episodes of up to 1,024 tokens, 13 held-out tasks x 10 items
    python bench/dricl.py --quick    # 1 seed, 32 episodes of up to 512 tokens, 4 held-out tasks x 4 items
    python bench/dricl.py --smoke    # seconds (tests): a tiny random char-level model, the plumbing only

Measured on 2 CPU cores shared with other jobs: --smoke about 2 minutes; --quick 27 minutes (training 7,
evaluation 19; the 100-shot prompts dominate).

Ends with ``RESULT acc_base_<k>=... acc_nll_<k>=... acc_dricl_<k>=...`` for k in 0 1 5 10 25 50 100 (means over
seeds; ``nan`` for a k whose prompts exceed the model's context), then ``gain_nll`` / ``gain_dricl`` (mean accuracy
over k >= 1 minus the 0-shot accuracy), ``dricl_minus_nll`` (mean over k of the difference) and the wall times.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, done, load_recipe_dict, only_stages,  # noqa: E402
                   preset_of, print_result, train)

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "dricl" / "smollm2.yaml"
TINY_RECIPE = ROOT / "recipes" / "dricl" / "tiny.yaml"
SHOTS = (0, 1, 5, 10, 25, 50, 100)
ARMS = ("nll", "dricl")
QUICK_TASKS = ["word_category:color-body:north/south", "number_rule:below_10:north/south", "string_op:last_letter",
               "arithmetic:add_10"]
PRESETS = {
    "smoke": dict(seeds=[0], recipe=TINY_RECIPE, episodes=8, max_shots=10, max_tokens=256, epochs=1, steps=2,
                  grad_acc=1, lr=1e-3, tasks=QUICK_TASKS[:2], items=2, shots=(0, 1, 5), eval_batch=8),
    "quick": dict(seeds=[0], recipe=RECIPE, episodes=32, max_shots=100, max_tokens=512, epochs=1, steps=None,
                  grad_acc=2, lr=5e-5, tasks=QUICK_TASKS, items=4, shots=SHOTS, eval_batch=8),
    "full": dict(seeds=[0, 1], recipe=RECIPE, episodes=128, max_shots=100, max_tokens=1024, epochs=1, steps=None,
                 grad_acc=4, lr=5e-5, tasks="heldout", items=10, shots=SHOTS, eval_batch=8),
}


def mixed_train_tasks() -> str:
    """Every training task, ordered round-robin over the task kinds (the generator takes task ``i mod n`` for episode
    ``i``, and the catalogue lists 28 word-category tasks first): a few dozen episodes cover every kind."""
    from rlkit.data.manyshot import task_names

    kinds: dict[str, list[str]] = {}
    for name in task_names("train"):
        kinds.setdefault(name.split(":")[0], []).append(name)
    order = []
    while any(kinds.values()):
        order += [names.pop(0) for names in kinds.values() if names]
    return ",".join(order)


def bench_recipe(p: dict) -> dict:
    """The shipped recipe with the preset's data and trainer, plus an ``nll`` stage: the same trainer with
    ``train_type: many-shot``, from the same base model."""
    raw = load_recipe_dict(p["recipe"])
    raw["plot"] = False
    stages = {s["name"]: s for s in raw["stages"]}
    stages["data"]["args"].update(tasks=mixed_train_tasks(), num_episodes=p["episodes"], max_shots=p["max_shots"],
                                  max_tokens=p["max_tokens"])
    dricl = stages.pop("dricl")
    trainer = dricl["trainer"]
    trainer.update(max_length=p["max_tokens"], gradient_accumulation_steps=p["grad_acc"], learning_rate=p["lr"],
                   per_device_train_batch_size=1, num_train_epochs=p["epochs"], logging_steps=1)
    if p["steps"]:
        trainer["max_steps"] = p["steps"]
    trainer.pop("save_steps", None)
    base_model = copy.deepcopy(raw["model"])
    arms = []
    for arm in ARMS:
        stage = copy.deepcopy(dricl)
        stage["name"] = arm
        stage["model"] = copy.deepcopy(base_model)  # both arms start from the base model, not the stage before
        stage["trainer"]["train_type"] = "many-shot" if arm == "nll" else "dynamic-shot"
        arms.append(stage)
    raw["stages"] = [stages["data"], *arms]
    return raw


def evaluate(model_name: str, p: dict, seed: int, threads: int) -> dict:
    import torch

    from rlkit.eval.manyshot import evaluate_manyshot
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    torch.set_num_threads(threads)
    model, tok = load_model(ModelSpec(name=model_name))
    model.eval()
    return evaluate_manyshot(model, tok, p["tasks"], shots=p["shots"], items=p["items"], seed=seed,
                             max_new_tokens=8, batch_size=p["eval_batch"])


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    ap = bench_parser(__doc__, quick="1 seed, 32 short episodes, 4 held-out tasks x 4 items",
                      smoke="a tiny random model, 2 steps (tests)", seeds=True)
    add_jobs_threads(ap, jobs=2)
    add_out(ap, "output folder (default runs/bench_dricl[_quick|_smoke])", type=Path)
    a = ap.parse_args()
    preset = preset_of(a)
    p = dict(PRESETS[preset])
    if a.seeds:
        p["seeds"] = a.seeds
    out = (a.out or ROOT / "runs" / ("bench_dricl" + ("" if preset == "full" else f"_{preset}"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = bench_recipe(p)
    t0 = time.time()
    for seed in p["seeds"]:  # the episodes, once per seed
        run_dir = out / f"s{seed}"
        if not (run_dir / "data" / "manifest.json").is_file():
            train(only_stages(recipe, "data"), [f"output_dir={run_dir}", f"seed={seed}"], out / f"data_s{seed}.log",
                  a.threads)

    def run_arm(job):
        arm, seed = job
        run_dir = out / f"s{seed}"
        if not done(run_dir, arm):
            train(only_stages(recipe, "data", arm), [f"output_dir={run_dir}", f"seed={seed}"],
                  out / f"{arm}_s{seed}.log", a.threads)
        return str(run_dir / arm / "final")

    jobs = [(arm, seed) for seed in p["seeds"] for arm in ARMS]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        finals = dict(zip(jobs, pool.map(run_arm, jobs)))
    train_s = time.time() - t0

    t1 = time.time()
    base = recipe["model"]["name"]
    results: dict[str, list[dict]] = {"base": [], **{arm: [] for arm in ARMS}}
    for seed in p["seeds"]:
        if base == "tiny":  # smoke: the random tiny model the arms started from (same seed)
            from rlkit.methods import save_model
            from rlkit.models import build_char_tokenizer, build_tiny_model
            from rlkit.recipe import TinyModelSpec

            tok = build_char_tokenizer()
            path = out / f"s{seed}" / "base_model"
            if not (path / "model.safetensors").is_file():
                save_model(build_tiny_model(TinyModelSpec(**recipe["model"]["tiny"]), tok, seed=seed), tok, path)
            base_name = str(path)
        else:
            base_name = base
        results["base"].append(evaluate(base_name, p, seed, a.threads * a.jobs))
        for arm in ARMS:
            results[arm].append(evaluate(finals[(arm, seed)], p, seed, a.threads * a.jobs))
    eval_s = time.time() - t1

    acc = {name: {k: _mean([r["accuracy"].get(k, float("nan")) for r in runs]) for k in SHOTS}
           for name, runs in results.items()}
    print(f"\nmany-shot accuracy on held-out tasks ({p['tasks'] if isinstance(p['tasks'], str) else len(p['tasks'])} "
          f"tasks x {p['items']} items, greedy exact match); seeds {p['seeds']}")
    print(f"{'shots':>6} " + " ".join(f"{name:>7}" for name in results) + f" {'dricl-nll':>10}")
    for k in p["shots"]:
        print(f"{k:>6} " + " ".join(f"{acc[name][k]:7.3f}" for name in results)
              + f" {acc['dricl'][k] - acc['nll'][k]:+10.3f}")
    skipped = {name: sorted({k for r in runs for ks in r["skipped"].values() for k in ks}) for name, runs in
               results.items()}
    if any(skipped.values()):
        print(f"skipped (prompt beyond the context): {skipped}")
    gains = {name: _mean([acc[name][k] for k in p["shots"] if k > 0]) - acc[name][0] for name in results}
    diff = _mean([acc["dricl"][k] - acc["nll"][k] for k in p["shots"]])
    print("mean accuracy over k >= 1 minus 0-shot: " + ", ".join(f"{n} {g:+.3f}" for n, g in gains.items()))
    print(f"training {train_s:.0f} s, evaluation {eval_s:.0f} s")
    logs = {arm: [h for h in json.loads((out / f"s{s}" / arm / "log_history.json").read_text()) if "loss" in h]
            for arm in ARMS for s in p["seeds"][:1]}
    (out / "results.json").write_text(json.dumps(
        {"preset": preset, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in p.items()},
         "accuracy": acc, "gains": gains, "skipped": skipped, "train_logs": logs,
         "per_task": {name: [r["per_task"] for r in runs] for name, runs in results.items()}}, indent=2) + "\n")
    from rlkit.eval.manyshot import plot_manyshot

    labels = {"base": "base model", "nll": "many-shot NLL", "dricl": "DR-ICL (all)"}
    png = plot_manyshot([{"label": labels.get(name, name), "accuracy": {k: v for k, v in acc[name].items()
                                                                         if v == v}}  # nan: k not evaluated
                         for name in acc], out / "manyshot.png",
                        title=f"held-out tasks, {len(p['seeds'])} seed(s), {preset}")
    print(f"plot: {png}")
    figures = {f"acc_{name}_{k}": acc[name][k] for name in ("base", *ARMS) for k in SHOTS}
    print_result(**figures, gain_base=gains["base"], gain_nll=gains["nll"], gain_dricl=gains["dricl"],
                 dricl_minus_nll=diff, seeds=len(p["seeds"]), train_s=round(train_s), eval_s=round(eval_s))


if __name__ == "__main__":
    main()
