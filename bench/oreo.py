"""OREO vs SFT, rejection sampling and DPO from the same SFT model and the same offline samples; then greedy vs
majority voting vs value-guided search on the OREO model; and iterative OREO.

Task: ``recipes/oreo/tiny_baselines.yaml`` (``recipes/oreo/tiny.yaml`` plus the baseline stages). A tiny char-level Llama is SFT'd on synthetic arithmetic whose demonstrations
end one too high on 90% of final subtractions (so it often answers one off); the ``sample`` stage draws 10
completions per training problem from it at temperature 1 and scores them with the verifier. Per seed, one SFT
model and one sample set are shared by every method (stages read them with ``model: {from: sft}`` and
``data: {from: sample}``):

- ``rs``: rejection sampling, SFT on the correct samples (``where: {status: ok}``);
- ``dpo``: TRL's DPO on up to 6 correct/incorrect pairs per problem;
- ``oreo``: OREO, token level (alpha 0.01); ``oreo_step``: OREO, step level (one line per step, alpha 0.1).

Held-out greedy accuracy on 200 test problems comes from each stage's evaluation. Then, on the token-level
OREO model with its critic: greedy, majority vote over B^2 sampled solutions, value-guided step-level beam
search with B beams (B samples per beam, so B^2 candidate steps per round), and the same search with a constant
scorer (a control: the same search without the value model). Search and voting sample at temperature 1.
The full preset adds B = 7 and the iterative run: ``recipes/oreo/tiny_iterative.yaml`` (SFT, then 3 rounds of
sample -> OREO, each round sampling from the latest policy) on seed 0, its held-out accuracy per round.

    python bench/oreo.py                 # 3 seeds, B = 3 and 7, iterative OREO (about an hour on 2 cores)
    python bench/oreo.py --quick         # 1 seed, 256 training problems, B = 3, iterative OREO
    python bench/oreo.py --smoke         # seconds (tests)

Ends with ``RESULT acc_sft=... acc_rs=... acc_dpo=... acc_oreo=... acc_oreo_step=... acc_greedy=...
acc_majority=... acc_value_search=... ...`` (means over seeds).
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
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, done, load_recipe_dict, preset_of,  # noqa: E402
                   print_result, summary, train)

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "oreo" / "tiny.yaml"
BASELINES = ROOT / "recipes" / "oreo" / "tiny_baselines.yaml"
ITERATIVE = ROOT / "recipes" / "oreo" / "tiny_iterative.yaml"
METHODS = ("sft", "rs", "dpo", "oreo", "oreo_step")
PRESETS = {  # seeds, sft steps, training problems, samples per problem, beams, eval problems, iterative
    "smoke": dict(seeds=[0], sft_steps=120, problems=8, samples=2, beams=[2], eval_limit=8, iterative=False,
                  max_steps=2, noisy_smoke=True),
    "quick": dict(seeds=[0], sft_steps=500, problems=256, samples=10, beams=[3], eval_limit=200, iterative=True,
                  max_steps=None),
    "full": dict(seeds=[0, 1, 2], sft_steps=500, problems=512, samples=10, beams=[3, 7], eval_limit=200,
                 iterative=True, max_steps=None),
}


def seed_recipe(base: dict, p: dict) -> dict:
    """The recipe of one seed: ``sft -> sample -> rs, dpo, oreo, oreo_step`` (each method from the SFT model)."""
    r = copy.deepcopy(base)
    r["eval"] = dict(r.get("eval", {}), limit=p["eval_limit"])
    stages = {s["name"]: s for s in r["stages"]}
    stages["sft"]["trainer"]["max_steps"] = p["sft_steps"]
    stages["sample"]["data"] = {"train": {"limit": p["problems"]}}
    stages["sample"]["args"]["num_samples"] = p["samples"]
    if p.get("noisy_smoke"):
        # a short SFT makes few right answers: flip half the rewards so every stage has data to run on
        stages["sample"]["rewards"] = [{"name": "noisy", "options": {"p": 0.5}}]
        stages["rs"]["data"]["train"]["where"] = {"status": ["ok", "wrong", "unparseable"]}
    for name in ("rs", "dpo", "oreo", "oreo_step"):
        stages[name]["model"] = {"from": "sft"}
        if p["max_steps"]:
            stages[name]["trainer"]["max_steps"] = p["max_steps"]
    return r


TUNE_GRID = {  # method -> trainer overrides tried (learning rate, epochs; OREO also the critic's learning rate)
    "rs": [{"learning_rate": 5e-5}, {"learning_rate": 2e-4}, {"learning_rate": 5e-4},
           {"learning_rate": 2e-4, "num_train_epochs": 3}],
    "dpo": [{"learning_rate": 2e-6}, {"learning_rate": 5e-6}, {"learning_rate": 1e-5}, {"learning_rate": 5e-5},
            {"learning_rate": 5e-6, "num_train_epochs": 3}, {"learning_rate": 5e-7}, {"learning_rate": 1e-6}],
    "oreo": [{"learning_rate": 3e-5, "critic_learning_rate": 3e-5}, {"learning_rate": 1e-4, "critic_learning_rate": 1e-4},
             {"learning_rate": 3e-4, "critic_learning_rate": 3e-4},
             {"learning_rate": 1e-4, "critic_learning_rate": 1e-3, "num_train_epochs": 3},
             {"learning_rate": 3e-5, "critic_learning_rate": 1e-3, "num_train_epochs": 3}],
}


def tune(base: dict, p: dict, out: Path, threads: int, search_limit: int = 100) -> list[tuple[str, dict, dict]]:
    """Each method with each of its ``TUNE_GRID`` settings on seed 0's SFT model and samples, judged on a
    validation set: the synthetic test split drawn with another seed (disjoint from the reported test problems).
    OREO settings are also judged by value-guided search (B = 3) on ``search_limit`` validation problems."""
    import shutil

    d = out / "tune"
    src = out / "seed0"
    d.mkdir(parents=True, exist_ok=True)
    for stage in ("sft", "sample"):  # reuse seed 0's SFT model and samples (finished stages are skipped)
        if (src / stage / "manifest.json").is_file() and not (d / stage).exists():
            shutil.copytree(src / stage, d / stage)
    r = seed_recipe(base, p)
    stages = {s["name"]: s for s in r["stages"]}
    tuned, settings = [stages["sft"], stages["sample"]], []
    for method, grid in TUNE_GRID.items():
        for i, over in enumerate(grid):
            st = copy.deepcopy(stages[method])
            st["name"] = f"{method}_{i}"
            st["trainer"].update(over)
            st["data"] = dict(st.get("data", {}), eval={"seed": 1})
            tuned.append(st)
            settings.append((st["name"], over))
    r["stages"] = tuned
    if not all(done(d, name) for name, _ in settings):
        train(r, [f"output_dir={d}", "seed=0"], d / "train.log", threads)
    rows = []
    for name, over in settings:
        fig = {"greedy": summary(d, name)["after"]["pass@1"]}
        if name.startswith("oreo"):
            fig.update(search_figures(d / name / "final", 0, 3, search_limit, threads, eval_seed=1))
        rows.append((name, over, fig))
    return rows


def search_figures(final: Path, seed: int, beams: int, limit: int, threads: int, eval_seed: int = 0) -> dict:
    """Value-guided and constant-scorer search accuracy (B beams) of an OREO model and its critic."""
    import torch

    from rlkit.data import build_dataset
    from rlkit.eval.math_eval import evaluate_search
    from rlkit.models import load_model
    from rlkit.recipe import DatasetSpec, ModelSpec
    from rlkit.rollout.search import ConstantScorer, SearchSettings
    from rlkit.value import ValueModel

    torch.set_num_threads(threads)
    model, tok = load_model(ModelSpec(name=str(final)))
    critic = ValueModel.from_pretrained(final / "critic").eval().attach_tokenizer(tok)
    spec = load_recipe_dict(RECIPE)["data"]["eval"]
    rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", limit=limit, seed=eval_seed,
                                     synthetic=spec["synthetic"]), tok).to_list()
    out = {}
    for name, scorer in (("value_search", critic), ("const_search", ConstantScorer())):
        settings = SearchSettings(beams=beams, stop=["\n"], max_total_tokens=48, max_step_tokens=24, seed=seed,
                                  batch_size=len(rows))
        s, _ = evaluate_search(model.eval(), tok, rows, scorer, settings, progress=False)
        out[name] = s["pass@1"]
    return out


def run_seed(base: dict, p: dict, seed: int, out: Path, threads: int) -> dict:
    d = out / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    if not all(done(d, m) for m in METHODS):
        train(seed_recipe(base, p), [f"output_dir={d}", f"seed={seed}"], d / "train.log", threads)
    return {m: summary(d, m)["after"]["pass@1"] for m in METHODS}


def evaluate_decoders(run_dir: Path, seed: int, beams: list[int], limit: int, threads: int) -> dict:
    """Greedy, majority of B^2 samples, value search (critic) and constant-scorer search on the OREO model."""
    import torch

    from rlkit.data import build_dataset
    from rlkit.eval import GenerationSettings, evaluate_rows
    from rlkit.eval.math_eval import evaluate_search
    from rlkit.models import load_model
    from rlkit.recipe import DatasetSpec, ModelSpec
    from rlkit.rollout.search import ConstantScorer, FunctionScorer, SearchSettings
    from rlkit.value import ValueModel

    torch.set_num_threads(threads)
    final = run_dir / "oreo" / "final"
    model, tok = load_model(ModelSpec(name=str(final)))
    model.eval()
    critic = ValueModel.from_pretrained(final / "critic").eval()
    critic.attach_tokenizer(tok)
    spec = load_recipe_dict(RECIPE)["data"]["eval"]
    rows = build_dataset(DatasetSpec(name="synthetic", split="test", template="plain", limit=limit,
                                     synthetic=spec["synthetic"]), tok).to_list()
    gen = GenerationSettings(max_new_tokens=48, batch_size=len(rows), temperature=1.0, seed=seed)
    out = {}
    s, _ = evaluate_rows(model, tok, rows, gen, samples=0, progress=False)
    out["greedy"] = {"acc": s["pass@1"], "tokens": None}
    for b in beams:
        s, recs = evaluate_rows(model, tok, rows, gen, samples=b * b, progress=False)
        out[f"majority_b{b}"] = {"acc": s[f"maj@{b * b}"], "pass_at_k": s[f"pass@{b * b}"], "solutions": b * b}
        if b == beams[0]:  # how well the critic ranks whole sampled solutions: AUC of V(last token) vs correct
            texts = [(r["prompt"], x["completion"], x["correct"]) for r, rec in zip(rows, recs) for x in rec["samples"]]
            with torch.no_grad():
                values = critic.score_texts([t[0] for t in texts], [t[1] for t in texts])
            out["critic"] = {"acc": auc(values, [t[2] for t in texts]), "solutions": len(texts)}
        scorers = [("value_search", critic), ("const_search", ConstantScorer())]
        if b == beams[0]:
            scorers.append(("oracle_search", FunctionScorer(oracle_value)))
        for name, scorer in scorers:
            settings = SearchSettings(beams=b, stop=["\n"], max_total_tokens=48, max_step_tokens=24, seed=seed,
                                      batch_size=len(rows))
            t0 = time.time()
            s, _ = evaluate_search(model, tok, rows, scorer, settings, progress=False)
            out[f"{name}_b{b}"] = {"acc": s["pass@1"], "sampled_steps": round(s["mean_sampled_steps"], 2),
                                   "tokens": round(s["mean_generated_tokens"], 1), "rounds": round(s["mean_rounds"], 2),
                                   "seconds": round(time.time() - t0, 1)}
    return out


def oracle_value(prompt: str, partial: str) -> float:
    """An exact step verifier of the synthetic task (a control for the search, not a learned model): 1 when
    every complete line of ``partial`` is the next line of the correct solution of the prompt's chain (and a
    ``#### x`` line gives its result), else 0."""
    import re

    question = prompt.split("Question:", 1)[1].split("\n", 1)[0].strip()
    parts = re.findall(r"\d+|[+*-]", question)
    value, expected = int(parts[0]), []
    for op, num in zip(parts[1::2], parts[2::2]):
        new = value + int(num) if op == "+" else value - int(num) if op == "-" else value * int(num)
        expected.append(f"{value}{op}{num}={new}")
        value = new
    lines = partial.split("\n")
    complete, last = lines[:-1], lines[-1]
    for i, line in enumerate(complete):
        if i >= len(expected) or line.strip() != expected[i]:
            return 0.0
    if last.startswith("####"):  # a finished answer line (no newline after it)
        return float(len(complete) == len(expected) and last[4:].strip() == str(value))
    return 1.0


def auc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random correct solution scores above a random wrong one (ties count half)."""
    import numpy as np

    x, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = x[y], x[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable") + 1.0
    # average ranks for ties
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):
        idx = allv == v
        if idx.sum() > 1:
            ranks[idx] = ranks[idx].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def iterative_run(p: dict, out: Path, threads: int) -> list[float]:
    """Held-out accuracy of the SFT model and after each OREO round of the iterative recipe (seed 0)."""
    d = out / "iterative"
    d.mkdir(parents=True, exist_ok=True)
    r = load_recipe_dict(ITERATIVE)
    r["eval"] = dict(r.get("eval", {}), limit=p["eval_limit"])
    if not done(d, "oreo-3"):
        train(r, [f"output_dir={d}"], d / "train.log", threads)
    accs = [summary(d, "sft")["after"]["pass@1"]]
    for i in (1, 2, 3):
        accs.append(summary(d, f"oreo-{i}")["after"]["pass@1"])
    return accs


def main() -> None:
    p = bench_parser(__doc__, quick="1 seed, 256 training problems, B = 3, iterative OREO",
                     smoke="a few steps on a few problems (tests)", seeds=True)
    p.add_argument("--no-iterative", action="store_true", help="skip the iterative OREO run")
    p.add_argument("--tune", action="store_true",
                   help="only sweep each method's learning rate on seed 0 against a validation split and print it")
    add_jobs_threads(p, jobs=2, jobs_help="seeds trained at a time")
    add_out(p, "output folder (default runs/bench_oreo[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = dict(PRESETS[preset])
    seeds = a.seeds or cfg["seeds"]
    out = a.out or ROOT / "runs" / ("bench_oreo" + ("" if preset == "full" else f"_{preset}"))
    out.mkdir(parents=True, exist_ok=True)
    from rlkit.recipe import load_raw

    base = load_raw(BASELINES)  # tiny.yaml with the baseline stages merged in
    if a.tune:
        print("validation accuracy (synthetic test split drawn with seed 1) of each setting, from seed 0's SFT model "
              "and samples:")
        for name, over, fig in tune(base, cfg, out, a.threads):
            print(f"  {name:>7} {json.dumps(over):<80} " + " ".join(f"{k} {v:.3f}" for k, v in fig.items()))
        return
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = {s: pool.submit(run_seed, base, cfg, s, out, a.threads) for s in seeds}
        iter_future = pool.submit(iterative_run, cfg, out, a.threads) \
            if cfg["iterative"] and not a.no_iterative else None
        accs = {s: f.result() for s, f in futures.items()}
        train_wall = time.time() - t0
        t1 = time.time()
        decoders = {s: evaluate_decoders(out / f"seed{s}", s, cfg["beams"], cfg["eval_limit"],
                                         max(a.threads, a.jobs)) for s in seeds}
        decode_wall = time.time() - t1
        iterative = iter_future.result() if iter_future is not None else None

    print(f"\nheld-out greedy accuracy ({cfg['eval_limit']} test problems), per seed:")
    print(f"{'seed':>4} " + " ".join(f"{m:>9}" for m in METHODS))
    for s in seeds:
        print(f"{s:>4} " + " ".join(f"{accs[s][m]:9.3f}" for m in METHODS))
    print("\ndecoders on the OREO (token-level) model, per seed:")
    for s in seeds:
        for k, v in decoders[s].items():
            print(f"  seed {s} {k:>16}: {json.dumps(v)}")
    mean = {m: statistics.mean(accs[s][m] for s in seeds) for m in METHODS}
    dec_mean = {k: statistics.mean(decoders[s][k]["acc"] for s in seeds) for k in decoders[seeds[0]]}
    b = cfg["beams"][0]
    if iterative is not None:
        print("\niterative OREO (seed 0): SFT " + " -> ".join(f"{x:.3f}" for x in iterative))
    (out / "results.json").write_text(json.dumps({"preset": preset, "seeds": seeds, "accuracy": accs,
                                                  "decoders": decoders, "iterative": iterative,
                                                  "train_wall_s": round(train_wall), "decode_wall_s": round(decode_wall)},
                                                 indent=2) + "\n")
    print(f"\ntraining {train_wall:.0f} s, decoding {decode_wall:.0f} s")
    figures = dict(acc_sft=mean["sft"], acc_rs=mean["rs"], acc_dpo=mean["dpo"], acc_oreo=mean["oreo"],
                   acc_oreo_step=mean["oreo_step"], acc_greedy=dec_mean["greedy"],
                   acc_majority=dec_mean[f"majority_b{b}"], acc_value_search=dec_mean[f"value_search_b{b}"],
                   acc_const_search=dec_mean[f"const_search_b{b}"], critic_auc=dec_mean["critic"],
                   acc_oracle_search=dec_mean[f"oracle_search_b{b}"], beams=b)
    for extra in cfg["beams"][1:]:
        figures[f"acc_majority_b{extra}"] = dec_mean[f"majority_b{extra}"]
        figures[f"acc_value_search_b{extra}"] = dec_mean[f"value_search_b{extra}"]
    if iterative is not None:
        figures.update({f"acc_iter{i}": iterative[i] for i in (1, 2, 3)})
    figures["seeds"] = len(seeds)
    print_result(**figures)


if __name__ == "__main__":
    main()
