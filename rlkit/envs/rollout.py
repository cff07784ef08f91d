"""Games in GRPO: the training rows, TRL's ``rollout_func`` and the episode reward.

``method: grpo`` (and its subclasses) with a non-empty ``env.games`` trains on games through TRL 1.16's
``rollout_func`` hook (no copy of TRL's loop):

- the train set (:func:`game_rows`) has one row per initial state: ``{prompt, game, seed, seat}``, where
  ``prompt`` is a one-line description (TRL needs the column; the real prompt is the game's first observation);
  games get rows in proportion to ``env.game_weights`` (balanced by default);
- TRL's sampler repeats each row ``num_generations`` times, so a GRPO group is ``num_generations`` episodes from
  the same initial state and seat; :class:`GameRollout` plays them (:func:`rlkit.envs.episode.play_episodes`) with
  the trainer's sampling settings and returns prompt ids, trajectory ids (actions and environment text) and
  ``env_mask`` (TRL's name for the mask of tokens the policy wrote: only they enter the loss), plus the episode's
  figures as extra columns;
- :func:`episode_reward` is the reward function (named ``game``): the shaped episode reward the rollout computed.

The rollout reads the batch's rows from ``trainer.rlkit_inputs`` (set by ``RLKitGRPOTrainer`` before generation:
TRL hands ``rollout_func`` the prompts only). Rollouts generate with HF ``generate`` on the (unwrapped) policy, or,
with ``use_vllm: true``, with the trainer's own vLLM (TRL syncs its weights before each rollout): colocated with
``vllm_tensor_parallel_size: 1``, or a server from a single training process. Episodes end at different turns, so
ranks would call vLLM a different number of times; the setups where TRL's vLLM call is collective (a server shared
by several processes, tensor parallelism) are refused.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from .config import EnvConfig
from .games import num_players


def game_rows(config: EnvConfig, seed: int = 0) -> list[dict]:
    """The training rows of ``config`` (module docstring); deterministic in ``seed``."""
    rows = []
    for game in config.games:
        n = max(1, round(config.episodes_per_game * config.game_weights.get(game, 1.0)))
        players = num_players(game)
        for i in range(n):
            s = config.seed_offset + i
            seat = config.seat if config.seat is not None else random.Random(f"{game}|{s}|seat").randrange(players)
            rows.append({"prompt": f"Play {game} (initial state {s}) as player {seat}.", "game": game, "seed": s,
                         "seat": seat})
    random.Random(seed).shuffle(rows)
    return rows


def episode_reward(prompts, completions, episode_reward=None, **kwargs) -> list[float]:
    """The shaped reward of each played episode (the ``episode_reward`` column the rollout wrote)."""
    if episode_reward is None:
        raise ValueError("the game reward needs the game rollout's episode_reward column (env.games is empty?)")
    return [float(r) for r in episode_reward]


episode_reward.__name__ = "game"


def check_vllm_game_setup(trainer) -> None:
    """Refuse the vLLM setups in which TRL's generate is a collective call (module docstring)."""
    args = trainer.args
    if args.vllm_mode == "server" and trainer.accelerator.num_processes > 1:
        raise RuntimeError("game rollouts with a vLLM server need a single training process (episodes end at "
                           "different turns on each rank); use vllm_mode: colocate, or one process")
    if args.vllm_mode == "colocate" and getattr(args, "vllm_tensor_parallel_size", 1) > 1:
        raise RuntimeError("game rollouts with colocated vLLM need vllm_tensor_parallel_size: 1 (episodes end at "
                           "different turns on each rank)")


class GameRollout:
    """TRL ``rollout_func(prompts, trainer)`` playing the batch's rows (module docstring)."""

    def __init__(self, config: EnvConfig, opponent: Any, batch_size: int = 64):
        self.config, self.opponent, self.batch_size = config, opponent, batch_size
        self.calls = 0

    def sampling(self, trainer) -> dict:
        args = trainer.args
        return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                "repetition_penalty": args.repetition_penalty}

    def __call__(self, prompts: list, trainer) -> dict:
        from trl.models import unwrap_model_for_generation

        from .episode import EpisodeJob, play_episodes

        inputs = trainer.rlkit_inputs
        if inputs is None or len(inputs) != len(prompts):
            raise RuntimeError("the game rollout needs the batch's rows (RLKitGRPOTrainer.rlkit_inputs)")
        self.calls += 1
        step = trainer.state.global_step
        index: Counter = Counter()
        jobs = []
        for x in inputs:
            key = (x["game"], x["seed"], x["seat"])
            jobs.append(EpisodeJob(x["game"], int(x["seed"]), int(x["seat"]),
                                   rng_seed=f"{trainer.args.seed}|{step}|{self.calls}|{index[key]}|"
                                            f"{trainer.accelerator.process_index}"))
            index[key] += 1
        training = trainer.model.training
        if trainer.use_vllm:
            from functools import partial

            from ..rollout.vllm import trainer_generate_ids

            check_vllm_game_setup(trainer)
            generate = partial(trainer_generate_ids, trainer.vllm_generation, trainer.processing_class)
            episodes = play_episodes(None, trainer.processing_class, jobs, self.config, self.opponent, generate=generate)
        else:
            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                             gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model:
                episodes = play_episodes(model, trainer.processing_class, jobs, self.config, self.opponent,
                                         do_sample=True, sampling=self.sampling(trainer), batch_size=self.batch_size)
        if training:
            trainer.model.train()
        n = len(episodes)
        mode = "train" if training else "eval"
        for name, value in (("env/win_rate", sum(e.outcome == "win" for e in episodes) / n),
                            ("env/draw_rate", sum(e.outcome == "draw" for e in episodes) / n),
                            ("env/invalid_moves", sum(e.invalid_moves for e in episodes) / n),
                            ("env/turns", sum(len(e.turns) for e in episodes) / n),
                            ("env/truncated", sum(e.truncated for e in episodes) / n)):
            trainer._metrics[mode][name].append(value)
        return {
            "prompt_ids": [e.prompt_ids for e in episodes],
            "completion_ids": [e.completion_ids for e in episodes],
            # vLLM rollouts: the sampled tokens' log-probabilities for TRL's importance-sampling correction (None for
            # environment tokens: TRL turns them into NaN and leaves them uncorrected; they are out of the loss anyway)
            "logprobs": [e.logprobs for e in episodes] if trainer.use_vllm else None,
            "env_mask": [e.env_mask for e in episodes],
            "episode_reward": [e.reward for e in episodes],
            "outcome": [e.outcome for e in episodes],
            "invalid_moves": [e.invalid_moves for e in episodes],
        }
