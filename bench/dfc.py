"""Divide-Fuse-Conquer vs joint multi-game GRPO at toy scale: win rate per game of the base model, the joint GRPO
run, the group specialists and DFC, from the same start and the same number of RL steps, over several seeds.

Setting: ``recipes/dfc/tiny_warmstart.yaml`` sized by the preset. The base is built once (seed 0): a random legal
player's demonstrations on the six games, SFT of the tiny char-level model on them. From that base, for each seed:

- ``dfc``: the recipe's ``dfc`` stage (groups TicTacToe + Nim | KuhnPoker + PigDice-short | GuessTheNumber +
  TowerOfHanoi; one specialist of ``S`` GRPO steps per group, fuse 1/2, conquer ``S`` steps on the union, twice:
  5 S steps); its specialists are the ``specialists`` arm (each game played by its own group's specialist);
- ``joint``: the same stage with ``mode: joint``: one GRPO run of 5 S steps on all six games.

Every model is evaluated on the same unseen initial states (``eval_seed_offset``) against the same random legal
opponent, ``episodes`` per game, sampling at temperature 1 (the policy GRPO trains; the tiny model's greedy play
collapses onto one move). Per game: the win rate over all seeds with its binomial standard error
sqrt(p (1 - p) / (episodes x seeds)); the mean over games with sqrt(sum se^2) / games; the invalid-move rate
(per policy turn) and the mean shaped reward, which move before wins do; stability: the standard
deviation over seeds of each arm's mean win rate, the number of seeds where the arm ends below the base, and the
training reward per step (plot ``docs/dfc_bench.png``).

    python bench/dfc.py            # S = 6 (30 RL steps per arm), 32 episodes per game, seeds 0 1 (about an hour)
    python bench/dfc.py --quick    # S = 2, 12 episodes per game, seed 0 (about 15 minutes)
    python bench/dfc.py --smoke    # 3 games, 1 step per phase, a smaller model (tests; about a minute)

Ends with ``RESULT win_dfc=... win_joint=... win_base=... win_specialists=... games=...`` (mean win rates) and the
standard errors, stability figures and per-game rates.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, preset_of, print_result, train  # noqa: E402

sys.path.insert(0, str(ROOT))

PRESETS = {
    "smoke": dict(demos=2, sft_epochs=1, sft_steps=2, steps=1, episodes=2, batch=2, generations=2, seeds=[0],
                  games=[["TicTacToe-v0"], ["KuhnPoker-v0"], ["GuessTheNumber-v0"]], max_turns=3,
                  tiny={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "max_position_embeddings": 4096}),
    "quick": dict(demos=8, sft_epochs=4, steps=2, episodes=12, batch=8, generations=4, seeds=[0]),
    "full": dict(demos=16, sft_epochs=4, steps=6, episodes=32, batch=16, generations=8, seeds=[0, 1]),
}
ARMS = ("base", "joint", "specialists", "dfc")


def recipes(p: dict, out: Path) -> tuple[dict, dict]:
    """(the base recipe: demos + SFT, the dfc-stage recipe template) sized by the preset."""
    from rlkit.recipe import load_raw

    r = load_raw(ROOT / "recipes" / "dfc" / "tiny_warmstart.yaml")
    stages = {s["name"]: s for s in r.pop("stages")}
    if "games" in p:
        r["env"]["games"] = [g for group in p["games"] for g in group]
        stages["dfc"]["args"]["groups"] = p["games"]
    if "tiny" in p:
        r["model"]["tiny"] = p["tiny"]
    if "max_turns" in p:
        r["env"]["max_turns"] = p["max_turns"]
    stages["demos"]["args"]["episodes_per_game"] = p["demos"]
    stages["sft"]["trainer"]["num_train_epochs"] = p["sft_epochs"]
    if "sft_steps" in p:
        stages["sft"]["trainer"]["max_steps"] = p["sft_steps"]
    base = dict(copy.deepcopy(r), output_dir=str(out / "base"), stages=[stages["demos"], stages["sft"]])
    dfc = copy.deepcopy(r)
    dfc.pop("description", None)
    dfc["method"] = "dfc"
    dfc["args"] = copy.deepcopy(stages["dfc"]["args"])
    dfc["args"].update(divide_steps=p["steps"], conquer_steps=p["steps"], eval_episodes=p["episodes"])
    dfc["args"]["grpo"].update(per_device_train_batch_size=p["batch"], num_generations=p["generations"])
    return base, dfc


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def curve(run_dir: Path, phases: list[str]) -> list[float]:
    """Training reward per step over the given GRPO phases, in order."""
    out = []
    for ph in phases:
        f = run_dir / ph / "log_history.json"
        if f.is_file():
            out += [h["reward"] for h in json.loads(f.read_text()) if "reward" in h and "train_runtime" not in h]
    return out


def eval_files(run_dir: Path, arm: str, groups: list[list[str]]) -> list[Path]:
    """The ``games_eval.json`` files that hold an arm's figures in one seed's run folders."""
    dfc, joint = run_dir / "dfc", run_dir / "joint"
    if arm == "base":
        return [dfc / "base" / "games_eval.json"]
    if arm == "joint":
        return [joint / "joint" / "games_eval.json"]
    if arm == "specialists":
        return [dfc / "divide" / f"group_{k}" / "games_eval.json" for k in range(1, len(groups) + 1)]
    final = json.loads((dfc / "state.json").read_text())["final"]["phase"]
    return [dfc / final / "games_eval.json"]


def detail(run_dir: Path, arm: str, groups: list[list[str]]) -> dict[str, dict]:
    """Per game: invalid-move rate (per policy turn), mean shaped reward, mean game score of an arm in one seed."""
    out = {}
    for f in eval_files(run_dir, arm, groups):
        for game, g in json.loads(f.read_text())["games"].items():
            out[game] = {"invalid": g["invalid"], "reward": g["mean_reward"], "score": g["mean_game_reward"]}
    return out


def main() -> None:
    p_args = bench_parser(__doc__, quick="S = 2, 12 episodes per game, seed 0", smoke="3 games, 1 step per phase, "
                          "a smaller model (tests)", seeds=True)
    add_jobs_threads(p_args, jobs=None)
    add_out(p_args, "where runs and results go (default runs/bench_dfc_<preset>)", type=Path)
    args = p_args.parse_args()
    preset = preset_of(args)
    p = dict(PRESETS[preset])
    seeds = args.seeds or p["seeds"]
    out = args.out or ROOT / "runs" / f"bench_dfc_{preset}"
    out.mkdir(parents=True, exist_ok=True)
    base_recipe, dfc_recipe = recipes(p, out)
    t0 = time.time()
    print(f"[bench] base: demonstrations ({p['demos']} episodes per game) + SFT", flush=True)
    train(base_recipe, [], out / "base.log", threads=args.threads)
    base_model = str(out / "base" / "sft" / "final")
    games = [g for group in dfc_recipe["args"]["groups"] for g in group]
    per_seed: dict[int, dict] = {}
    curves: dict[str, dict[int, list[float]]] = {"dfc": {}, "joint": {}}
    for seed in seeds:
        figures = {}
        for mode in ("dfc", "joint"):
            r = copy.deepcopy(dfc_recipe)
            r.update(seed=seed, output_dir=str(out / f"seed{seed}" / mode), model={"name": base_model})
            r["args"]["mode"] = mode
            if mode == "joint":  # the same base evaluation (model, games, episodes, opponent, seed): reuse it
                cached = out / f"seed{seed}" / "dfc" / "base" / "games_eval.json"
                if cached.is_file():
                    (out / f"seed{seed}" / "joint" / "base").mkdir(parents=True, exist_ok=True)
                    shutil.copy(cached, out / f"seed{seed}" / "joint" / "base" / "games_eval.json")
            print(f"[bench] seed {seed}: {mode}", flush=True)
            train(r, [], out / f"seed{seed}_{mode}.log", threads=args.threads)
            summary = json.loads((out / f"seed{seed}" / mode / "dfc_summary.json").read_text())
            figures[mode] = summary["win"]
            if mode == "dfc":
                figures["specialists"] = summary["win_specialists"]
                figures["base"] = summary["win_base"]
                k = len(summary["groups"])
                phases = [f"divide/group_{i}" for i in range(1, k + 1)] + \
                    [f"conquer/group_{i}" for i in range(2, k + 1)]
            else:
                phases = ["joint"]
            curves[mode][seed] = curve(out / f"seed{seed}" / mode, phases)
        per_seed[seed] = figures
        print(f"[bench] seed {seed}: mean win " + ", ".join(
            f"{a} {sum(figures[a].values()) / len(games):.3f}" for a in ARMS), flush=True)

    n = p["episodes"] * len(seeds)
    table: dict[str, dict] = {}
    for arm in ARMS:
        rates = {g: statistics.mean(per_seed[s][arm][g] for s in seeds) for g in games}
        ses = {g: binomial_se(rates[g], n) for g in games}
        means = [sum(per_seed[s][arm].values()) / len(games) for s in seeds]
        table[arm] = {"per_game": rates, "se": ses, "mean": sum(rates.values()) / len(games),
                      "mean_se": math.sqrt(sum(v * v for v in ses.values())) / len(games), "per_seed_mean": means,
                      "seed_std": statistics.stdev(means) if len(means) > 1 else 0.0}
    groups = dfc_recipe["args"]["groups"]
    for arm in ARMS:
        details = [detail(out / f"seed{s}", arm, groups) for s in seeds]
        for key in ("invalid", "reward", "score"):
            per_game = {g: statistics.mean(d[g][key] for d in details) for g in games}
            table[arm][key] = per_game
            table[arm][f"mean_{key}"] = sum(per_game.values()) / len(games)
    base_means = table["base"]["per_seed_mean"]
    for arm in ("joint", "specialists", "dfc"):
        table[arm]["seeds_below_base"] = sum(m < b for m, b in zip(table[arm]["per_seed_mean"], base_means))
    wall = time.time() - t0

    print(f"\n{'game':24s}" + "".join(f"{a:>18s}" for a in ARMS))
    for g in games:
        print(f"{g:24s}" + "".join(f"{table[a]['per_game'][g]:>11.3f} ± {table[a]['se'][g]:.3f}" for a in ARMS))
    print(f"{'mean':24s}" + "".join(f"{table[a]['mean']:>11.3f} ± {table[a]['mean_se']:.3f}" for a in ARMS))
    print(f"{'seed std of mean':24s}" + "".join(f"{table[a]['seed_std']:>18.3f}" for a in ARMS))
    for key, label in (("invalid", "invalid moves / turn"), ("reward", "shaped reward")):
        print(f"\n{label:24s}" + "".join(f"{a:>18s}" for a in ARMS))
        for g in games:
            print(f"{g:24s}" + "".join(f"{table[a][key][g]:>18.3f}" for a in ARMS))
        print(f"{'mean':24s}" + "".join(f"{table[a]['mean_' + key]:>18.3f}" for a in ARMS))
    print(f"DFC - joint: {table['dfc']['mean'] - table['joint']['mean']:+.3f} "
          f"(se {math.hypot(table['dfc']['mean_se'], table['joint']['mean_se']):.3f}); wall {wall / 60:.1f} min")
    results = {"preset": preset, "seeds": seeds, "episodes_per_game": p["episodes"], "steps_per_phase": p["steps"],
               "games": games, "groups": dfc_recipe["args"]["groups"], "table": table, "per_seed": per_seed,
               "curves": curves, "wall_seconds": round(wall, 1), "base_model": base_model}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if preset != "smoke":
        plot(results, ROOT / "docs" / ("dfc_bench.png" if preset == "full" else f"dfc_bench_{preset}.png"))
    figures = {f"win_{a}": table[a]["mean"] for a in ("dfc", "joint", "base", "specialists")}
    figures.update({f"se_{a}": table[a]["mean_se"] for a in ("dfc", "joint", "base", "specialists")})
    figures.update({f"invalid_{a}": table[a]["mean_invalid"] for a in ARMS})
    figures.update({f"reward_{a}": table[a]["mean_reward"] for a in ARMS})
    figures.update(games=len(games), seeds=len(seeds), std_dfc=table["dfc"]["seed_std"],
                   std_joint=table["joint"]["seed_std"], dfc_minus_joint=table["dfc"]["mean"] - table["joint"]["mean"])
    for g in games:
        key = g.split("-v0")[0].lower()
        figures[f"dfc_{key}"] = table["dfc"]["per_game"][g]
        figures[f"joint_{key}"] = table["joint"]["per_game"][g]
    print_result(**figures)


def plot(results: dict, path: Path) -> None:
    """Per-game win rates of the four arms (with standard errors) and the training reward per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games, table = results["games"], results["table"]
    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(18, 4.2))
    width = 0.2
    for i, arm in enumerate(ARMS):
        xs = [k + (i - 1.5) * width for k in range(len(games))]
        ax.bar(xs, [table[arm]["per_game"][g] for g in games], width, yerr=[table[arm]["se"][g] for g in games],
               label=f"{arm} ({table[arm]['mean']:.2f})", capsize=2)
    ax.set_xticks(range(len(games)), [g.replace("-v0", "") for g in games], rotation=20, fontsize=8)
    ax.set_ylabel("win rate vs random legal player")
    ax.set_title(f"{len(results['seeds'])} seed(s) x {results['episodes_per_game']} episodes per game")
    ax.legend(fontsize=8)
    for i, arm in enumerate(ARMS):
        xs = [k + (i - 1.5) * width for k in range(len(games))]
        ax3.bar(xs, [table[arm]["invalid"][g] for g in games], width, label=f"{arm} ({table[arm]['mean_invalid']:.2f})")
    ax3.set_xticks(range(len(games)), [g.replace("-v0", "") for g in games], rotation=20, fontsize=8)
    ax3.set_ylabel("invalid moves per policy turn")
    ax3.legend(fontsize=8)
    for mode, style in (("joint", "--"), ("dfc", "-")):
        for seed, ys in results["curves"][mode].items():
            ax2.plot(range(1, len(ys) + 1), ys, style, alpha=0.8, label=f"{mode} seed {seed}")
    ax2.set_xlabel("RL step (DFC: divide groups 1-3, then conquer 2-3)")
    ax2.set_ylabel("training reward (mean over the batch's episodes)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"[bench] plot: {path}", flush=True)


if __name__ == "__main__":
    main()
