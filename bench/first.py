"""FIRST vs plain SFT and full-logit distillation: accuracy and answer calibration (ECE) of a distilled student.

Models: ``recipes/first/tiny.yaml``. The **teacher** is a 4-layer char-level Llama (3.2M parameters) SFT'd on exact
step-by-step demonstrations of the synthetic arithmetic task; the ``distill_prepare`` stage stores its top-5 next
tokens per response token of the training rows' reference solutions and chooses the temperature tau on 10% held-out
rows (token-level ECE). The **student** is a 2-layer model (0.2M) and every arm starts from the same random
initialisation (the recipe seed) and trains the same steps on the same rows:

- ``sft``: plain fine-tuning on the reference solutions (TRL's SFT, the "standard fine-tuning" baseline);
- ``kd``: forward KL to the teacher's full next-token distribution, online (``method: kd``);
- ``first_uncal``: FIRST on the stored top-5 with tau 1 (no calibration);
- ``first``: FIRST with the chosen tau.

Each final model (and the teacher) answers the held-out test problems greedily; accuracy is exact match of the
final answer and ECE (10 equal-width bins) uses the model's confidence in its answer: the product of the
probabilities of the answer's tokens in its own greedy completion (``rlkit.eval`` with ``calibration="answer"``).
The paper's claim: +2.3 points of accuracy and 10% less ECE than standard fine-tuning, on average.

    python bench/first.py            # the recipe's sizes, 3 student seeds, 500 test problems
    python bench/first.py --quick    # shorter runs, 1 seed, 200 test problems
    python bench/first.py --smoke    # seconds (tests)

Ends with ``RESULT acc_sft=... ece_sft=... acc_kd=... ece_kd=... acc_first=... ece_first=... acc_first_uncal=...
ece_first_uncal=... topk_bytes_ratio=...`` (means over seeds; ``topk_bytes_ratio``: stored top-k bytes / fp32
logits of the same tokens).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, done, load_recipe_dict, only_stages,  # noqa: E402
                   preset_of, print_result, train)

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "first" / "tiny.yaml"
ARMS = ("sft", "kd", "first_uncal", "first")
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1}
PRESETS = {
    "smoke": dict(teacher_steps=4, rows=24, student_steps=3, test=8, seeds=[0], teacher_shape=_SMALL),
    "quick": dict(teacher_steps=500, rows=2000, student_steps=400, test=200, seeds=[0]),
    "full": dict(teacher_steps=600, rows=2000, student_steps=500, test=500, seeds=[0, 1, 2]),
}


def base_recipe(p: dict) -> dict:
    """The recipe's teacher and prepare stages at the preset's sizes."""
    r = only_stages(load_recipe_dict(RECIPE), "teacher", "prepare")
    r["stages"] = copy.deepcopy(r["stages"])
    stages = {s["name"]: s for s in r["stages"]}
    stages["teacher"]["trainer"]["max_steps"] = p["teacher_steps"]
    if p.get("teacher_shape"):  # smoke: a small teacher, fast (its numbers mean nothing)
        stages["teacher"]["model"]["tiny"].update(p["teacher_shape"])
    stages["prepare"]["data"]["train"]["limit"] = p["rows"]
    r["eval"] = {"enabled": False}
    return r


def arm_recipe(arm: str, p: dict, seed: int, teacher: str, topk: str) -> dict:
    """One student arm as a single-stage recipe (the student model and trainer of the recipe's ``first`` stage)."""
    raw = load_recipe_dict(RECIPE)
    first = next(s for s in raw["stages"] if s["name"] == "first")
    trainer = {**raw.get("trainer", {}), **{k: v for k, v in first["trainer"].items()
                                            if k not in ("tau", "use_other", "normalization")}}
    trainer["max_steps"] = p["student_steps"]
    if p.get("teacher_shape"):
        trainer["logging_steps"] = 1
    recipe = {"seed": seed, "plot": False, "model": first["model"], "eval": {"enabled": False}}
    if arm == "sft":
        # the rows FIRST trains on: the prepared index (its training rows) as prompt + completion
        recipe.update(method="sft", data={"train": {"name": f"jsonl:{topk}", "question_column": "prompt",
                                                    "answer_column": "completion", "solution_column": "completion",
                                                    "template": "raw", "where": {"heldout": False}}},
                      trainer={**trainer, "max_length": 128})
    elif arm == "kd":
        recipe.update(method="kd", data={"train": {"name": f"jsonl:{topk}"}},
                      trainer={**trainer, "teacher": teacher, "max_length": 128})
    else:
        recipe.update(method="first", data={"train": {"name": f"jsonl:{topk}"}},
                      trainer={**trainer, "tau": 1.0 if arm == "first_uncal" else "auto", "use_other": True,
                               "normalization": "linear"})
    return recipe


def evaluate(model_dir: Path, p: dict, seed: int) -> dict:
    """Greedy accuracy and answer ECE on the recipe's test split (``rlkit.eval``'s calibration)."""
    from rlkit.data import build_dataset
    from rlkit.eval.math_eval import evaluate_rows
    from rlkit.models import load_model
    from rlkit.recipe import DatasetSpec, ModelSpec
    from rlkit.rollout import GenerationSettings

    raw = load_recipe_dict(RECIPE)
    spec = DatasetSpec(**{**raw["data"]["eval"], "limit": p["test"]})
    model, tok = load_model(ModelSpec(name=str(model_dir)))
    rows = build_dataset(spec, tok).to_list()
    settings = GenerationSettings(max_new_tokens=raw["eval"]["max_new_tokens"], batch_size=100)
    summary, _ = evaluate_rows(model, tok, rows, settings, progress=False, calibration="answer", ece_bins=10)
    ece = summary.get("ece")  # None when no completion has a final answer to be confident in
    return {"acc": summary["pass@1"], "ece": float("nan") if ece is None else ece,
            "confidence": summary.get("mean_confidence"), "answered": summary.get("calibration_n")}


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def main() -> None:
    p = bench_parser(__doc__, quick="shorter runs, 1 seed, 200 test problems", smoke="a few steps (tests)",
                     seeds=True)
    add_jobs_threads(p, jobs=2)
    add_out(p, "output folder (default runs/bench_first[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = dict(PRESETS[preset])
    if a.seeds:
        cfg["seeds"] = a.seeds
    out = (a.out or ROOT / "runs" / ("bench_first" + ("" if preset == "full" else f"_{preset}"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (done(out, "teacher") and (out / "prepare" / "manifest.json").is_file()):
        train(base_recipe(cfg), [f"output_dir={out}"], out / "teacher.log", a.threads)
    teacher = out / "teacher" / "final"
    topk = out / "prepare" / "topk.jsonl"
    meta = json.loads((out / "prepare" / "topk_meta.json").read_text())
    teacher_s = time.time() - t0

    jobs = [(arm, seed) for seed in cfg["seeds"] for arm in ARMS]

    def run_arm(job):
        arm, seed = job
        run_dir = out / f"{arm}_s{seed}"
        if not done(run_dir.parent, run_dir.name):
            train(arm_recipe(arm, cfg, seed, str(teacher), str(topk)), [f"output_dir={run_dir}"],
                  out / f"{arm}_s{seed}.log", a.threads)
        return run_dir / "final"

    t1 = time.time()
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        finals = dict(zip(jobs, pool.map(run_arm, jobs)))
    students_s = time.time() - t1

    t2 = time.time()
    res = {"teacher": evaluate(teacher, cfg, 0)}
    per_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for (arm, seed), final in finals.items():
        per_arm[arm].append({"seed": seed, **evaluate(final, cfg, seed)})
    eval_s = time.time() - t2
    for arm, runs in per_arm.items():
        res[arm] = {"acc": statistics.mean(r["acc"] for r in runs), "ece": _mean([r["ece"] for r in runs]),
                    "runs": runs}

    tau = meta["tau"]["other"]
    print(f"\nteacher: top-5 holds {meta['topk_mass']:.3f} of the mass on average; tau chosen (ECE, with the other "
          f"bucket) {tau:g}; {meta['bytes_topk']} bytes stored vs {meta['bytes_full_fp32']} fp32 / "
          f"{meta['bytes_full_bf16']} bf16 logits ({meta['tokens']} tokens)")
    print(f"{cfg['test']} test problems, greedy; seeds {cfg['seeds']}")
    print(f"{'model':>12} {'acc':>6} {'ECE':>6} {'vs sft acc':>10} {'ECE/sft':>8}")
    sft = res["sft"]
    for name in ("teacher", *ARMS):
        r = res[name]
        print(f"{name:>12} {r['acc']:6.3f} {r['ece']:6.3f} {r['acc'] - sft['acc']:+10.3f} "
              f"{r['ece'] / sft['ece'] if sft['ece'] else float('nan'):8.3f}")
    print(f"\nteacher + prepare {teacher_s:.0f} s, students {students_s:.0f} s, evaluation {eval_s:.0f} s")
    (out / "results.json").write_text(json.dumps({"preset": preset, "config": cfg, "tau": meta["tau"],
                                                  "topk_meta": {k: v for k, v in meta.items() if k != "tau_search"},
                                                  **res}, indent=2) + "\n")
    figures = {f"{k}_{arm}": res[arm][k] for arm in ARMS for k in ("acc", "ece")}
    print_result(acc_sft=figures["acc_sft"], ece_sft=figures["ece_sft"], acc_kd=figures["acc_kd"],
                 ece_kd=figures["ece_kd"], acc_first=figures["acc_first"], ece_first=figures["ece_first"],
                 acc_first_uncal=figures["acc_first_uncal"], ece_first_uncal=figures["ece_first_uncal"],
                 topk_bytes_ratio=meta["bytes_ratio_fp32"], acc_teacher=res["teacher"]["acc"],
                 ece_teacher=res["teacher"]["ece"], tau=tau, seeds=len(cfg["seeds"]))


if __name__ == "__main__":
    main()
