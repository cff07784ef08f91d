"""ER-PRM vs hard-label and soft-label PRMs, an ORM and majority voting: best-of-N accuracy at N = 4, 8, 16, 32.

Task: ``recipes/prm/tiny.yaml``. A tiny char-level Llama generator is SFT'd on synthetic arithmetic whose
demonstrations end one too high on 90% of final subtractions (so it often answers one off); the ``sample`` stage
draws a few solutions per training problem; the ``prm_label`` stage labels every step prefix of each from N
rollouts of the same generator and writes the three labels of the same rollouts: entropy-regularised
(eta = 1, the released code's default), hard (max, Math-Shepherd) and soft (mean). Four reward models start
from the generator and train on those rows with the same settings: ``prm`` (ER labels), ``prm_hard``,
``prm_soft``, and ``orm`` (one tag after the whole solution, labelled with its correctness).

Evaluation: one set of 32 solutions per held-out problem sampled from the generator at temperature 1. For each
N, the 32 are cut into 32/N disjoint groups of N and every group picks one solution: the highest min-over-steps
score of each reward model (ties: the earlier sample), the majority answer (ties: the answer seen first), or the
first sample; the accuracy is the mean over problems and groups. The paper's claim (GSM8K / MATH500 with a 7B
generator): ER-PRM at least as good as the best baseline at every N, by +1 to +3 points.

    python bench/prm.py            # 512 training problems x 4 samples x 16 rollouts, 3 PRM seeds, 500 test problems
    python bench/prm.py --quick    # 256 x 4 x 16 (the recipe as shipped), one seed, 200 test problems
    python bench/prm.py --smoke    # seconds (tests)

Ends with ``RESULT bon_er_16=... bon_hard_16=... bon_soft_16=... bon_orm_16=... bon_majority_16=... ...``
(every N; means over PRM seeds).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, done, preset_of, print_result, summary, train  # noqa: E402

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "prm" / "tiny.yaml"
MODELS = {"er": "prm", "hard": "prm_hard", "soft": "prm_soft", "orm": "orm"}
PRESETS = {
    "smoke": dict(sft_steps=30, problems=6, samples=2, rollouts=2, epochs=1, test=8, n_max=4, ns=[2, 4], seeds=[0]),
    "quick": dict(sft_steps=500, problems=256, samples=4, rollouts=16, epochs=3, test=200, n_max=32,
                  ns=[4, 8, 16, 32], seeds=[0]),
    "full": dict(sft_steps=500, problems=512, samples=4, rollouts=16, epochs=3, test=500, n_max=32,
                 ns=[4, 8, 16, 32], seeds=[0, 1, 2]),
}


def bench_recipe(p: dict, prm_seeds: list[int]) -> dict:
    """``recipes/prm/tiny.yaml`` sized by the preset, with the three baselines (and extra PRM seeds) added."""
    from rlkit.recipe import load_raw

    r = load_raw(RECIPE)
    stages = {s["name"]: s for s in r["stages"]}
    stages["policy"]["trainer"]["max_steps"] = p["sft_steps"]
    stages["sample"]["data"] = {"train": {"limit": p["problems"]}}
    stages["sample"]["args"]["num_samples"] = p["samples"]
    stages["label"]["args"]["num_rollouts"] = p["rollouts"]
    stages["prm"]["trainer"]["num_train_epochs"] = p["epochs"]
    r["eval"] = dict(r.get("eval", {}), limit=p["test"])
    out = [stages["policy"], stages["sample"], stages["label"]]
    for seed in prm_seeds:
        for kind, name in MODELS.items():
            st = copy.deepcopy(stages["prm"])
            st["name"] = name if seed == prm_seeds[0] else f"{name}_s{seed}"
            st["seed"] = seed
            if kind == "orm":
                st["trainer"]["kind"] = "orm"
            elif kind != "er":
                st["trainer"]["label_kind"] = kind
            out.append(st)
    r["stages"] = out
    return r


def bon_curves(correct: list[list[bool]], answers: list[list[str | None]], scores: dict[str, list[list[float]]],
               ns: list[int]) -> dict[str, dict[int, float]]:
    """Best-of-N accuracy per selector and N: the candidates of each problem cut into disjoint groups of N, each
    group picks one with ``rlkit.eval.select.select_index`` (the rule of ``rlkit eval --select``: highest score,
    ties to the earlier; the majority answer; the first), mean over problems and groups; ``oracle`` is pass@N."""
    from rlkit.eval.select import select_index

    rules = {**{name: "score" for name in scores}, "majority": "majority", "first": "first"}
    out: dict[str, dict[int, float]] = {k: {} for k in (*rules, "oracle")}
    for n in ns:
        acc: dict[str, list[bool]] = {k: [] for k in out}
        for i, flags in enumerate(correct):
            for g in range(len(flags) // n):
                idx = range(g * n, (g + 1) * n)
                for name, rule in rules.items():
                    cands = [{"correct": flags[j], "extracted": answers[i][j],
                              "score": scores[name][i][j] if name in scores else None} for j in idx]
                    acc[name].append(cands[select_index(cands, rule)]["correct"])
                acc["oracle"].append(any(flags[j] for j in idx))
        for k, v in acc.items():
            out[k][n] = sum(v) / len(v)
    return out


def evaluate(run_dir: Path, p: dict, name_sets: list[dict[str, str]], threads: int) -> list[dict]:
    """Sample ``n_max`` solutions per test problem from the generator once, score them with every reward model
    of each set in ``name_sets`` (one set per PRM seed: kind -> stage), and compute each set's best-of-N curves
    (plus each model's ranking AUC on the candidates)."""
    import torch

    from rlkit.data import build_dataset
    from rlkit.eval import GenerationSettings, evaluate_rows
    from rlkit.models import load_model
    from rlkit.process_reward import ProcessRewardModel
    from rlkit.recipe import DatasetSpec, ModelSpec, load_raw

    from oreo import auc  # the same ranking AUC the OREO bench reports for its critic

    torch.set_num_threads(threads)
    model, tok = load_model(ModelSpec(name=str(run_dir / "policy" / "final")))
    spec = load_raw(RECIPE)["data"]["eval"]
    rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", limit=p["test"],
                                     synthetic=dict(spec["synthetic"], num_test=max(p["test"], 200))), tok).to_list()
    gen = GenerationSettings(max_new_tokens=48, batch_size=256, temperature=1.0, seed=1234)
    t0 = time.time()
    s, recs = evaluate_rows(model.eval(), tok, rows, gen, samples=p["n_max"], progress=False)
    sample_s = time.time() - t0
    correct = [[x["correct"] for x in r["samples"]] for r in recs]
    answers = [[x["extracted"] for x in r["samples"]] for r in recs]
    prompts = [r["prompt"] for r in rows for _ in range(p["n_max"])]
    texts = [x["completion"] for r in recs for x in r["samples"]]
    runs = []
    for names in name_sets:
        scores, aucs = {}, {}
        t0 = time.time()
        for kind, stage in names.items():
            rm = ProcessRewardModel.from_pretrained(run_dir / stage / "final")
            rm.batch_size = 256
            flat = rm.score_texts(prompts, texts)
            scores[kind] = [flat[i * p["n_max"]:(i + 1) * p["n_max"]] for i in range(len(rows))]
            aucs[kind] = auc(flat, [c for r in correct for c in r])
        runs.append({"greedy": s["pass@1"], "sampled": s["pass@1(sampled)"],
                     "curves": bon_curves(correct, answers, scores, p["ns"]), "auc": aucs,
                     "score_seconds": round(time.time() - t0, 1)})
    runs[0]["sample_seconds"] = round(sample_s, 1)  # the candidates are sampled once, for every set
    return runs


def label_stats(run_dir: Path) -> dict:
    """Mean label per kind over non-final steps, and how often hard and ER labels put a step at 1 / above 0.5."""
    rows = [json.loads(x) for x in (run_dir / "label" / "labels.jsonl").read_text().splitlines()]
    inner = {k: [v for r in rows for v in r[f"labels_{k}"][:-1]] for k in ("er", "hard", "soft")}
    return {"rows": len(rows), "steps": sum(len(r["steps"]) for r in rows),
            **{f"mean_{k}": round(statistics.mean(v), 4) if v else None for k, v in inner.items()}}


def main() -> None:
    p = bench_parser(__doc__, quick="256 training problems (the recipe as shipped), one PRM seed, 200 test problems",
                     smoke="a few problems and steps (tests)")
    add_jobs_threads(p, jobs=None)
    add_out(p, "output folder (default runs/bench_prm[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = PRESETS[preset]
    out = a.out or ROOT / "runs" / ("bench_prm" + ("" if preset == "full" else f"_{preset}"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = cfg["seeds"]
    recipe = bench_recipe(cfg, seeds)
    t0 = time.time()
    last = recipe["stages"][-1]["name"]
    if not done(out, last):
        train(recipe, [f"output_dir={out}"], out / "train.log", a.threads)
    train_s = time.time() - t0
    stages = {s["name"]: s for s in recipe["stages"]}
    wall = {k: summary(out, k).get("wall_seconds") for k in stages}
    name_sets = [{kind: (name if seed == seeds[0] else f"{name}_s{seed}") for kind, name in MODELS.items()}
                 for seed in seeds]
    runs = evaluate(out, cfg, name_sets, a.threads)
    labels = label_stats(out)
    ns = cfg["ns"]
    kinds = [*MODELS, "majority", "first", "oracle"]
    mean = {k: {n: statistics.mean(r["curves"][k][n] for r in runs) for n in ns} for k in kinds}
    print(f"\ngenerator: greedy {runs[0]['greedy']:.3f}, one sample {runs[0]['sampled']:.3f} "
          f"({cfg['test']} test problems)")
    print(f"labels: {json.dumps(labels)}")
    print(f"\nbest-of-N accuracy (mean over {len(seeds)} PRM seed(s)):")
    print(f"{'selector':>10} " + " ".join(f"{'N=' + str(n):>8}" for n in ns))
    for k in kinds:
        print(f"{k:>10} " + " ".join(f"{mean[k][n]:8.3f}" for n in ns))
    print("\nranking AUC of each reward model on the sampled solutions: " + ", ".join(
        f"{k} {statistics.mean(r['auc'][k] for r in runs):.3f}" for k in MODELS))
    print(f"\nwall: training pipeline {train_s:.0f} s (stages: {json.dumps(wall)}), evaluation "
          f"{runs[0]['sample_seconds'] + sum(r['score_seconds'] for r in runs):.0f} s")
    (out / "results.json").write_text(json.dumps({"preset": preset, "seeds": seeds, "runs": runs, "labels": labels,
                                                  "mean": mean, "wall": wall}, indent=2, default=str) + "\n")
    figures: dict = {}
    for n in ns:
        for k in ("er", "hard", "soft", "orm", "majority"):
            figures[f"bon_{k}_{n}"] = mean[k][n]
    best_base = {n: max(mean[k][n] for k in ("hard", "soft", "orm", "majority")) for n in ns}
    figures["er_minus_best_baseline_min"] = min(mean["er"][n] - best_base[n] for n in ns)
    figures.update(acc_greedy=runs[0]["greedy"], acc_sample=runs[0]["sampled"],
                   pass_at_max=mean["oracle"][ns[-1]], seeds=len(seeds))
    print_result(**figures)


if __name__ == "__main__":
    main()
