"""Game evaluation: win, draw, loss and invalid-move rates per TextArena game against a fixed opponent.

``rlkit eval --games TicTacToe-v0,Nim-v0 --episodes 64 --opponent random|rule|model:PATH`` plays ``episodes``
episodes of each game with the model (greedy unless ``--temperature``), seats drawn per episode from the
episode's seed (``env.seat`` to fix it), initial states ``seed_offset + i`` (training uses ``0..episodes_per_game
- 1``: evaluate with ``--seed-offset 100000`` for unseen states in games with a random start). Every episode's
turns go to ``episodes.jsonl``. The standard error of a rate p over n episodes is sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


def _rate(k: int, n: int) -> float:
    return k / n if n else 0.0


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize(episodes: list) -> dict:
    """Per-game and mean figures of played :class:`rlkit.envs.episode.Episode` objects."""
    games: dict[str, list] = {}
    for ep in episodes:
        games.setdefault(ep.game, []).append(ep)
    out = {}
    for game, eps in games.items():
        n = len(eps)
        turns = sum(len(e.turns) for e in eps)
        win = _rate(sum(e.outcome == "win" for e in eps), n)
        out[game] = {
            "n": n, "win": win, "win_se": _se(win, n),
            "draw": _rate(sum(e.outcome == "draw" for e in eps), n),
            "loss": _rate(sum(e.outcome == "loss" for e in eps), n),
            "invalid": _rate(sum(e.invalid_moves for e in eps), turns),
            "episodes_with_invalid": _rate(sum(e.invalid_moves > 0 for e in eps), n),
            "truncated": _rate(sum(e.truncated for e in eps), n),
            "mean_reward": sum(e.reward for e in eps) / n,
            "mean_game_reward": sum(e.game_reward for e in eps) / n,
            "mean_turns": turns / n,
        }
    wins = [g["win"] for g in out.values()]
    return {"games": out, "mean_win": sum(wins) / len(wins) if wins else 0.0,
            "mean_win_se": math.sqrt(sum(g["win_se"] ** 2 for g in out.values())) / len(out) if out else 0.0}


def evaluate_games(model, tokenizer, env: Any, episodes: int, seed: int = 0, temperature: float = 0.0,
                   out: Path | None = None, progress: bool = True, opponent: Any = None,
                   batch_size: int = 64) -> dict:
    """Play ``episodes`` episodes of each of ``env.games`` (an :class:`rlkit.envs.config.EnvConfig`) with ``model``
    against ``env.opponent`` (or ``opponent``, an already built one) and summarise them (:func:`summarize`);
    ``out``: a jsonl file that gets one row per episode (its turns, outcome and reward)."""
    import torch
    from tqdm.auto import tqdm

    from ..envs.episode import EpisodeJob, make_opponent, play_episodes
    from ..envs.games import check_games

    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    check_games(env.games)
    if opponent is None:
        from ..envs.episode import check_scripted_opponent

        check_scripted_opponent(env)
        opponent = make_opponent(env, policy=(model, tokenizer))
    jobs = [EpisodeJob(game, env.seed_offset + i, env.seat, rng_seed=f"eval|{seed}|{i}")
            for game in env.games for i in range(episodes)]
    bar = tqdm(total=len(jobs), desc="games", disable=not progress, leave=False)

    def tick(finished: int) -> None:
        bar.update(finished - bar.n)

    sampling = {"temperature": temperature} if temperature > 0 else None
    from ..rollout.generation import seeded

    with seeded(seed), torch.no_grad():
        played = play_episodes(model, tokenizer, jobs, env, opponent, do_sample=temperature > 0,
                               sampling=sampling, batch_size=batch_size, progress=tick)
    bar.close()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            for ep in played:
                fh.write(json.dumps(ep.record()) + "\n")
    summary = summarize(played)
    summary.update({"episodes": episodes, "opponent": getattr(opponent, "name", env.opponent),
                    "temperature": temperature, "seed_offset": env.seed_offset})
    return summary


def run_game_eval(model: str, games: str, episodes: int, opponent: str = "random", seed: int = 0,
                  temperature: float = 0.0, output_dir: str | None = None, dtype: str | None = None,
                  env_options: dict | None = None) -> dict:
    """``rlkit eval --games``: load ``model``, evaluate, write ``games_eval.json`` (and ``episodes.jsonl``) in
    ``output_dir`` (default ``<model>/games_eval`` for a local folder, else ``runs/games_eval``)."""
    from ..config import build
    from ..envs.config import EnvConfig
    from ..models import load_model
    from ..recipe import ModelSpec

    games_list = [g.strip() for g in games.split(",") if g.strip()] if isinstance(games, str) else list(games)
    env = build(EnvConfig, {**(env_options or {}), "games": games_list, "opponent": opponent}, "rlkit eval")
    spec = ModelSpec(name=model, **({"dtype": dtype} if dtype else {}))
    lm, tokenizer = load_model(spec, seed=seed)
    if _cuda():
        lm = lm.to("cuda")
    lm.eval()
    if output_dir is None:
        output_dir = str(Path(model) / "games_eval") if Path(model).is_dir() else "runs/games_eval"
    out = Path(output_dir)
    summary = evaluate_games(lm, tokenizer, env, episodes, seed=seed, temperature=temperature,
                             out=out / "episodes.jsonl")
    summary = {"model": model, **summary, "env": dataclasses.asdict(env)}
    (out / "games_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
