"""Auto-CEI vs SFT, plain expert iteration and R-Tuning from the same SFT model: precision, IDK rate, accuracy and
f = 0.8 precision + 0.2 (1 - IDK rate) on held-out problems.

Task: ``recipes/autocei/tiny.yaml``. Synthetic arithmetic chains of 1 to 8 operations on operands up to 12, one
line per operation: a tiny char-level Llama SFT'd on the reference solutions gets the short chains mostly right
and the long ones mostly wrong, so part of the problems lie beyond it and the depth d (lines) tracks difficulty.
Per seed, from that one SFT model (stages read it with ``model: {from: sft}``):

- ``sft``: the SFT model as it is;
- ``ei``: plain expert iteration (``method: autocei``, ``mode: ei``): sample, keep the correct answers, SFT; the
  same number of rounds and the same convergence test as Auto-CEI, the best round by validation f;
- ``rtuning``: the R-Tuning round (wrong samples get an IDK ending, SFT one epoch): the Auto-CEI stage's own first
  round (the same sub-runs ``mode: rtuning`` runs);
- ``autocei``: the whole method (R-Tuning round, curriculum from the R-Tuned model's samples, hill-climb on c1 with
  expert-iteration rounds, each judged on the validation split); its best model.

Every model is evaluated greedily on the synthetic test split (seed 0; the validation split the methods select on
is drawn with seed 1) with the released evaluator's IDK phrases. The paper's claim (Llama-3.1-8B on MATH,
BoardgameQA, Blocksworld): Auto-CEI has the best f, with precision above plain EI and far fewer refusals than
R-Tuning.

    python bench/autocei.py            # 3 seeds, the recipe as shipped (256 prompts x 8 samples, 2 rounds, 3 curricula)
    python bench/autocei.py --quick    # 1 seed, 256 prompts x 8 samples, 1 round per curriculum, 2 curricula
    python bench/autocei.py --smoke    # seconds (tests): the plumbing only

Measured on 2 busy CPU cores: --smoke 36 s; --quick 545 s with the SFT stage already there (about 15 min from
scratch); the full preset about 30 min per seed.

Ends with ``RESULT f_autocei=... f_ei=... f_rtuning=... f_sft=... precision_autocei=... precision_ei=...
idk_rate_autocei=... idk_rate_rtuning=... accuracy_autocei=...`` (means over seeds).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, preset_of, print_result, train  # noqa: E402

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "autocei" / "tiny.yaml"
METHODS = ("sft", "ei", "rtuning", "autocei")
PRESETS = {
    # smoke: an easy task and a short SFT so that some answers are right; digits count as "IDK" phrases for the
    # reward so every round has rows to keep whatever the model writes (plumbing only, not a result)
    "smoke": dict(seeds=[0], sft_steps=60, problems=6, samples=2, rounds=1, curricula=2, val=8, test=8,
                  max_new_tokens=24, synthetic={"min_ops": 1, "max_ops": 2, "max_operand": 5},
                  tiny={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
                  extra={"reward_idk_phrases": list("0123456789"), "c1": 2.0, "c2": 1.0, "step": 0.5, "tau": 0.5}),
    "quick": dict(seeds=[0], sft_steps=600, problems=256, samples=8, rounds=1, curricula=2, val=200, test=500),
    "full": dict(seeds=[0, 1, 2], sft_steps=600, problems=256, samples=8, rounds=2, curricula=3, val=200, test=500),
}


def seed_recipe(p: dict) -> dict:
    """The recipe of one seed: ``sft -> ei, autocei`` (both from the SFT model), sized by the preset."""
    from rlkit.recipe import load_raw

    r = load_raw(RECIPE)
    if "synthetic" in p:
        for part in ("train", "eval"):
            r["data"][part]["synthetic"].update(p["synthetic"])
    r["data"]["eval"]["limit"] = p["val"]
    r["eval"] = dict(r.get("eval", {}), limit=p["val"], enabled=False)
    if "tiny" in p:
        r["model"]["tiny"].update(p["tiny"])
    stages = {s["name"]: s for s in r["stages"]}
    stages["sft"]["trainer"]["max_steps"] = p["sft_steps"]
    ac = stages["autocei"]
    ac["model"] = {"from": "sft"}
    ac["data"] = {"train": {"limit": p["problems"]}}
    ac["args"].update(n_samples=p["samples"], max_rounds=p["rounds"], max_curricula=p["curricula"],
                      **p.get("extra", {}))
    if "max_new_tokens" in p:
        ac["args"]["max_new_tokens"] = p["max_new_tokens"]
    ei = copy.deepcopy(ac)
    ei["name"] = "ei"
    ei["args"]["mode"] = "ei"
    for key in ("c1", "c2", "step", "tau", "rtuning_ending", "max_curricula", "reward_idk_phrases"):
        ei["args"].pop(key, None)
    r["stages"] = [stages["sft"], ei, ac]
    return r


def models_of(run_dir: Path) -> dict[str, str]:
    """The model each method hands on (the R-Tuned model from the Auto-CEI stage's state)."""
    state = json.loads((run_dir / "autocei" / "state.json").read_text())
    return {"sft": str(run_dir / "sft" / "final"),
            "ei": json.loads((run_dir / "ei" / "state.json").read_text())["best"]["model"],
            "rtuning": state["rtuning"][-1]["model"], "autocei": state["best"]["model"]}


def evaluate(models: dict[str, str], p: dict, threads: int, recipe: dict) -> dict[str, dict]:
    """Greedy precision / IDK rate / accuracy / f of each model on the held-out test split (seed 0)."""
    import torch

    from rlkit.data import build_dataset
    from rlkit.eval.idk import EVAL_IDK_PHRASES, evaluate_idk
    from rlkit.models import load_model
    from rlkit.recipe import DatasetSpec, ModelSpec
    from rlkit.rollout import GenerationSettings

    torch.set_num_threads(threads)
    synth = dict(recipe["data"]["eval"]["synthetic"], num_test=p["test"])
    out = {}
    for name, path in models.items():
        model, tok = load_model(ModelSpec(name=path))
        rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", seed=0, synthetic=synth),
                             tok).to_list()
        max_new = recipe["stages"][-1]["args"]["max_new_tokens"]
        settings = GenerationSettings(max_new_tokens=max_new, batch_size=250, temperature=0.0)
        s, _ = evaluate_idk(model.eval(), tok, rows, settings, EVAL_IDK_PHRASES, 0.2, progress=False)
        out[name] = {k: s[k] for k in ("precision", "idk_rate", "accuracy", "f", "n")}
    return out


def run_seed(p: dict, seed: int, out: Path, threads: int) -> tuple[dict, dict, dict]:
    d = out / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    recipe = seed_recipe(p)
    if not (d / "autocei" / "manifest.json").is_file() or not (d / "ei" / "manifest.json").is_file():
        train(recipe, [f"output_dir={d}", f"seed={seed}"], d / "train.log", threads)
    figures = evaluate(models_of(d), p, threads, recipe)
    state = json.loads((d / "autocei" / "state.json").read_text())
    return figures, state, recipe


def main() -> None:
    p = bench_parser(__doc__, quick="1 seed, 256 prompts, 1 round per curriculum, 2 curricula",
                     smoke="a tiny run of every stage (tests)", seeds=True)
    add_jobs_threads(p, jobs=None)
    add_out(p, "output folder (default runs/bench_autocei[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = dict(PRESETS[preset])
    seeds = a.seeds or cfg["seeds"]
    out = a.out or ROOT / "runs" / ("bench_autocei" + ("" if preset == "full" else f"_{preset}"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per_seed, curricula = {}, {}
    for s in seeds:
        figures, state, _ = run_seed(cfg, s, out, a.threads)
        per_seed[s] = figures
        curricula[s] = {"curriculum": state.get("curriculum"),
                        "tried": [{"c1": round(c["c1"], 4), "rounds": len(c["rounds"]), "best_f": round(c["best_f"], 4)}
                                  for c in state.get("curricula", [])]}
    wall = time.time() - t0
    mean = {m: {k: statistics.mean(per_seed[s][m][k] for s in seeds) for k in ("precision", "idk_rate", "accuracy", "f")}
            for m in METHODS}
    n = per_seed[seeds[0]]["sft"]["n"]
    print(f"\nheld-out greedy figures ({n} test problems; means over seeds {seeds}):")
    print(f"{'method':>8} {'precision':>9} {'idk_rate':>9} {'accuracy':>9} {'f':>7}")
    for m in METHODS:
        v = mean[m]
        print(f"{m:>8} {v['precision']:9.3f} {v['idk_rate']:9.3f} {v['accuracy']:9.3f} {v['f']:7.4f}")
    for s in seeds:
        print(f"seed {s}: " + "  ".join(f"{m} f {per_seed[s][m]['f']:.4f} (p {per_seed[s][m]['precision']:.3f}, idk "
                                        f"{per_seed[s][m]['idk_rate']:.3f})" for m in METHODS))
        print(f"  curriculum {json.dumps(curricula[s]['curriculum'])}; tried {json.dumps(curricula[s]['tried'])}")
    ac = mean["autocei"]

    def ratio(x: float, y: float) -> float:
        return x / y if y else float("inf")

    print(f"\nAuto-CEI vs plain EI: f ratio {ratio(ac['f'], mean['ei']['f']):.3f}, precision "
          f"{ac['precision'] - mean['ei']['precision']:+.3f}; vs R-Tuning: IDK rate ratio "
          f"{ratio(ac['idk_rate'], mean['rtuning']['idk_rate']):.3f}, f ratio {ratio(ac['f'], mean['rtuning']['f']):.3f}; "
          f"vs SFT: f ratio {ratio(ac['f'], mean['sft']['f']):.3f}")
    print(f"wall {wall:.0f} s")
    (out / "results.json").write_text(json.dumps({"preset": preset, "seeds": seeds, "per_seed": per_seed,
                                                  "mean": mean, "curricula": curricula, "wall_s": round(wall)},
                                                 indent=2) + "\n")
    print_result(f_autocei=ac["f"], f_ei=mean["ei"]["f"], f_rtuning=mean["rtuning"]["f"], f_sft=mean["sft"]["f"],
                 precision_autocei=ac["precision"], precision_ei=mean["ei"]["precision"],
                 precision_rtuning=mean["rtuning"]["precision"], precision_sft=mean["sft"]["precision"],
                 idk_rate_autocei=ac["idk_rate"], idk_rate_rtuning=mean["rtuning"]["idk_rate"],
                 idk_rate_ei=mean["ei"]["idk_rate"], accuracy_autocei=ac["accuracy"], accuracy_ei=mean["ei"]["accuracy"],
                 accuracy_rtuning=mean["rtuning"]["accuracy"], accuracy_sft=mean["sft"]["accuracy"], seeds=len(seeds))


if __name__ == "__main__":
    main()
