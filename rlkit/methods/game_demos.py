"""``method: game_demos``: demonstration data for games, played by a scripted player in the policy's seat.

A cold start for multi-turn game RL (Divide-Fuse-Conquer names "trajectory data" among its training techniques;
how it used them is not public): a model that cannot yet write a legal move wins no episode, so GRPO gets no
signal. This stage plays ``episodes_per_game`` episodes of each of ``env.games`` with a scripted player
(``player``: ``random`` legal moves or the ``rule`` player, :mod:`rlkit.envs.opponents`) against ``env.opponent``,
keeps the episodes ``keep`` asks for, and writes one row per action to ``demos.jsonl``: ``question`` = the text
the policy sees before that action (exactly as :mod:`rlkit.envs.episode` renders it for the stage's tokenizer),
``solution`` = the action, plus the game, seed, seat, turn, outcome and reward. An ``sft`` stage on
``{from: <this stage>, dataset: demos, template: raw}`` then teaches the format and the player's moves. Initial
states are ``demo_seed_offset + i``, away from the ones training and evaluation use by default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import RecipeError
from . import register_method
from .base import Method, StageOutput

DATASET = "demos"


@dataclass
class GameDemosConfig:
    """Settings of the ``game_demos`` stage (recipe section ``args:``; the games come from ``env:``)."""

    player: Literal["random", "rule"] = "random"
    """The scripted player in the policy's seat."""
    episodes_per_game: int = 32
    """Episodes played per game."""
    keep: Literal["all", "wins", "non_losses"] = "all"
    """Which episodes become rows (wins / non_losses: rejection sampling on the outcome)."""
    demo_seed_offset: int = 50_000
    """Initial states ``demo_seed_offset + i``."""
    max_context_tokens: int | None = None
    """Drop rows whose context is longer than this many tokens (an SFT with a shorter ``max_length`` would cut
    their action off); None: ``env.max_episode_tokens``."""

    def __post_init__(self):
        if self.episodes_per_game < 1:
            raise ValueError(f"episodes_per_game must be at least 1, got {self.episodes_per_game}")


@register_method
class GameDemosMethod(Method):
    name = "game_demos"
    section = "args"
    loads_model = False
    outputs = (DATASET,)
    config = GameDemosConfig

    def loads(self, run) -> str:
        return "tokenizer"

    def check(self, run, config: GameDemosConfig, where: str) -> None:
        from ..envs.games import GameError, check_games

        try:
            check_games(run.env.games)
        except GameError as e:
            raise RecipeError(f"env.games: {e}") from None

    def run(self, run, ctx) -> StageOutput:
        from ..envs.episode import Conversation, EpisodeJob, make_opponent, play_episodes
        from ..envs.opponents import make_scripted

        config: GameDemosConfig = self.make_config(run)
        env = run.env
        jobs = [EpisodeJob(game, config.demo_seed_offset + i, env.seat, rng_seed=f"demo|{run.seed}|{i}")
                for game in env.games for i in range(config.episodes_per_game)]
        episodes = play_episodes(None, ctx.tokenizer, jobs, env, make_opponent(env), player=make_scripted(config.player))
        wanted = {"all": {"win", "draw", "loss"}, "wins": {"win"}, "non_losses": {"win", "draw"}}[config.keep]
        conversation = Conversation(ctx.tokenizer, env.system_prompt)
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{DATASET}.jsonl"
        limit = config.max_context_tokens or env.max_episode_tokens
        rows = kept = too_long = 0
        with open(path, "w") as fh:
            for ep in episodes:
                if ep.outcome not in wanted or not ep.turns:
                    continue
                kept += 1
                for k, (context, turn) in enumerate(zip(conversation.contexts(ep), ep.turns)):
                    if len(ctx.tokenizer(context, add_special_tokens=not conversation.chat)["input_ids"]) > limit:
                        too_long += 1
                        continue
                    fh.write(json.dumps({"question": context, "solution": turn.action, "answer": "", "game": ep.game,
                                         "seed": ep.seed, "seat": ep.seat, "turn": k, "outcome": ep.outcome,
                                         "reward": ep.reward}) + "\n")
                    rows += 1
        per_game = {}
        for game in env.games:
            eps = [e for e in episodes if e.game == game]
            per_game[game] = {"episodes": len(eps), "win": sum(e.outcome == "win" for e in eps) / len(eps),
                              "kept": sum(e.outcome in wanted for e in eps)}
        print(f"[rlkit] game_demos: {rows} rows from {kept} of {len(episodes)} episodes ({config.player} player) in "
              f"{path}" + (f"; {too_long} rows over {limit} tokens dropped" if too_long else ""), flush=True)
        return StageOutput(model=ctx.model_path, datasets={DATASET: str(path)},
                           summary={"rows": rows, "episodes": len(episodes), "kept": kept, "too_long": too_long, "games": per_game,
                                    "config": dataclasses.asdict(config)})
