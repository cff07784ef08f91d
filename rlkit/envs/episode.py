"""Episodes: the policy plays its seat of a TextArena game turn by turn, as one growing conversation.

The first observation is the prompt. Each turn the policy's action tokens are appended as generated (never
re-tokenised), then the environment's text: the end of the assistant turn, the next observation (only what the
player has not seen yet) and the start of the next assistant turn, rendered with the tokenizer's chat template
(or, for a tokenizer without one, ``"\\n" + observation + "\\nYour action: "``). ``env_mask`` is 1 on action tokens
and 0 on environment tokens, so a trainer learns from the policy's own tokens only. The opponent lives inside the
episode: a scripted player (:mod:`rlkit.envs.opponents`), a frozen model (``model:PATH``) or a frozen copy of the
policy (``self``).

All live episodes of a batch are played in lockstep: every round, one batched ``generate`` gives every episode
waiting for the policy its next action (:func:`rlkit.rollout.generation.generate_from_ids`). Each episode keeps
its own copy of Python's global ``random`` state, which TextArena games draw from, so an episode's game does not
depend on which other episodes were played beside it.

The reward of an episode (:func:`shaped_reward`): two-player games map the outcome to ``win_reward`` /
``draw_reward`` / ``loss_reward``; single-player puzzles keep the game's own score; then each invalid move, each
action without a bracketed move and each hasty action (fewer than ``hasty_min_chars`` characters before its
bracketed move) subtracts its penalty. An episode cut at ``max_turns`` or ``max_episode_tokens`` is a draw
(two-player) or scores 0 (single-player) and is marked ``truncated``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .config import EnvConfig
from .games import make_env, num_players, outcome, render

MOVE = re.compile(r"\[[^\[\]]+\]")
PLAIN_CUE = "\nYour action: "
_SENTINEL = "\u2063RLKIT_ACTION\u2063"


@dataclass
class Turn:
    observation: str
    action: str
    invalid: bool = False
    formatted: bool = True
    hasty: bool = False
    tokens: int = 0


@dataclass
class Episode:
    """One played episode: the policy's turns, the tokens a trainer needs and the outcome."""

    game: str
    seed: int
    seat: int
    players: int
    turns: list[Turn] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    """The sampling log-probability of each completion token where the generator reports it (vLLM), None for
    environment tokens and for generators that do not."""
    game_reward: float = 0.0
    outcome: str = "draw"
    reward: float = 0.0
    invalid_moves: int = 0
    truncated: bool = False
    reason: str = ""
    opponent_moves: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """A JSON-able row (no token ids) for episode logs."""
        row = asdict(self)
        for key in ("prompt_ids", "completion_ids", "env_mask", "logprobs"):
            row.pop(key)
        return row


# --------------------------------------------------------------------------------------------------
# Text <-> tokens


class Conversation:
    """Turns observations into prompt / environment token ids for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token
        self.eos_text = eos if isinstance(eos, str) else ""

    def _messages(self, observation: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": observation}]

    def _template(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def prompt_text(self, observation: str) -> str:
        if self.chat:
            return self._template(self._messages(observation), True)
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return head + observation + PLAIN_CUE

    def prompt_ids(self, observation: str) -> list[int]:
        text = self.prompt_text(observation)
        # a chat template writes its own BOS; plain text gets the tokenizer's special tokens
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def between_text(self, observation: str, ended: bool) -> str:
        """The environment's text after an action (``ended``: the action's tokens end with EOS) up to the start of
        the next action."""
        if not self.chat:
            return ("" if ended or not self.eos_text else self.eos_text) + "\n" + observation + PLAIN_CUE
        first = self._messages("OBS") + [{"role": "assistant", "content": _SENTINEL}]
        closed = self._template(first, False)
        nxt = self._template(first + [{"role": "user", "content": observation}], True)
        if not nxt.startswith(closed) or _SENTINEL not in closed:
            raise ValueError("the tokenizer's chat template rewrites earlier turns when a turn is added, so an "
                             "episode cannot grow as one conversation; use a tokenizer whose template appends turns")
        closing = closed[closed.rindex(_SENTINEL) + len(_SENTINEL):]
        if ended and self.eos_text and closing.startswith(self.eos_text):
            closing = closing[len(self.eos_text):]
        return closing + nxt[len(closed):]

    def between_ids(self, observation: str, ended: bool) -> list[int]:
        return self.tokenizer(self.between_text(observation, ended), add_special_tokens=False)["input_ids"]

    def contexts(self, episode: Episode) -> list[str]:
        """The text the policy saw before each of its actions (every action taken as ending with EOS): the
        prompt, then each earlier action, its EOS and the environment's text."""
        if not episode.turns:
            return []
        text = self.prompt_text(episode.turns[0].observation)
        out = [text]
        for prev, turn in zip(episode.turns, episode.turns[1:]):
            text += prev.action + (self.eos_text or "") + self.between_text(turn.observation, ended=True)
            out.append(text)
        return out


def action_checks(action: str, config: EnvConfig) -> tuple[bool, bool]:
    """``(formatted, hasty)`` of an action: it holds a bracketed move; fewer than ``hasty_min_chars`` characters
    come before its first bracketed move."""
    m = MOVE.search(action)
    if m is None:
        return False, False
    return True, len(action[: m.start()].strip()) < config.hasty_min_chars


def shaped_reward(ep: Episode, config: EnvConfig) -> float:
    """The episode's training reward (module docstring)."""
    if ep.players == 1:
        base = 0.0 if ep.truncated else ep.game_reward
    else:
        base = {"win": config.win_reward, "draw": config.draw_reward, "loss": config.loss_reward}[ep.outcome]
    penalty = (config.invalid_penalty * ep.invalid_moves
               + config.format_penalty * sum(not t.formatted for t in ep.turns)
               + config.hasty_penalty * sum(t.hasty for t in ep.turns))
    return base - penalty


# --------------------------------------------------------------------------------------------------
# Opponents that are models


class ModelOpponent:
    """A frozen model playing the other seat: its whole history as one user message, greedy unless a temperature
    is given (``env.opponent_temperature``)."""

    def __init__(self, model, tokenizer, temperature: float = 0.0, max_new_tokens: int = 32, name: str = "model"):
        self.model, self.tokenizer = model, tokenizer
        self.conversation = Conversation(tokenizer)
        self.temperature, self.max_new_tokens, self.name = temperature, max_new_tokens, name

    def act(self, env, player_id: int, observation: str, rng: random.Random) -> str:
        from ..rollout.generation import generate_from_ids, seeded

        ids = self.conversation.prompt_ids(observation)
        sampling = {"temperature": self.temperature} if self.temperature > 0 else None
        with seeded(rng.randrange(2**31)):
            out = generate_from_ids(self.model, self.tokenizer, [ids], self.max_new_tokens,
                                    do_sample=self.temperature > 0, sampling=sampling)
        return out[0].text.strip()


def make_opponent(config: EnvConfig, policy: Any = None, load: Callable | None = None) -> Any:
    """The opponent of ``config.opponent``: ``random`` / ``rule`` (scripted), ``model:PATH`` (loaded with ``load(path)
    -> (model, tokenizer)``, default rlkit.models) or ``self`` (a frozen copy of ``policy``, a ``(model, tokenizer)``
    pair: the policy as the stage starts)."""
    kind, _, path = config.opponent.partition(":")
    if kind in ("random", "rule"):
        from .opponents import make_scripted

        return make_scripted(kind)
    if kind == "self":
        import copy

        if policy is None:
            raise ValueError("env.opponent: self needs the policy model to copy")
        model, tokenizer = policy
        load = lambda _p: (copy.deepcopy(model), tokenizer)  # noqa: E731
        path = "starting policy"
    if load is None:
        def load(p):
            from ..models import load_model
            from ..recipe import ModelSpec

            return load_model(ModelSpec(name=p))
    model, tokenizer = load(path)
    model.eval()
    model.requires_grad_(False)
    return ModelOpponent(model, tokenizer, config.opponent_temperature, config.max_action_tokens,
                         name=f"{kind}:{path}")


def check_scripted_opponent(config: EnvConfig, max_steps: int = 300) -> None:
    """Raise ValueError when ``config.opponent`` is scripted and a two-player game has no scripted player: one game
    of random moves in both seats is played (a few milliseconds) and must not run out of moves to choose from."""
    if config.opponent.partition(":")[0] not in ("random", "rule"):
        return
    from .opponents import make_scripted

    player = make_scripted("random")
    for game in config.games:
        if num_players(game) == 1:
            continue
        saved = random.getstate()
        rng = random.Random(0)
        try:
            env = make_env(game, 0, config.error_allowance)
            for _ in range(max_steps):
                if env.state.done:
                    break
                pid, obs = env.get_observation()
                env.step(action=player.act(env, pid, render(obs) if isinstance(obs, list) else str(obs), rng))
        except ValueError as e:
            raise ValueError(f"env.opponent {config.opponent}: {game} has no scripted player ({e}); use opponent "
                             "model:PATH or self for it") from None
        finally:
            random.setstate(saved)


# --------------------------------------------------------------------------------------------------
# Playing


@dataclass
class EpisodeJob:
    game: str
    seed: int
    seat: int | None = None
    rng_seed: Any = 0
    """Seeds the episode's own random.Random (opponent choices) and its copy of the global random state."""


class _Live:
    """An episode in progress."""

    def __init__(self, job: EpisodeJob, config: EnvConfig, conversation: Conversation):
        self.rng = random.Random(f"{job.game}|{job.seed}|{job.rng_seed}")
        saved = random.getstate()
        try:
            self.env = make_env(job.game, job.seed, config.error_allowance)
            self.global_state = random.getstate()
        finally:
            random.setstate(saved)
        players = num_players(job.game)
        seat = job.seat if job.seat is not None else self.rng.randrange(players)
        if seat >= players:
            raise ValueError(f"seat {seat} does not exist in {job.game} ({players} player(s))")
        self.ep = Episode(job.game, job.seed, seat, players)
        self.history = {p: "" for p in range(players)}  # everything each player has been shown
        self.pending = ""  # the policy's observation not yet in the conversation
        self.done = False
        self.conversation = conversation

    def with_game_random(self, fn: Callable[[], Any]) -> Any:
        saved = random.getstate()
        random.setstate(self.global_state)
        try:
            return fn()
        finally:
            self.global_state = random.getstate()
            random.setstate(saved)

    def observe(self) -> tuple[int, str]:
        pid, obs = self.with_game_random(self.env.get_observation)
        if isinstance(obs, list):  # a player's own move comes back to it: it wrote it, so leave it out
            obs = [m for m in obs if m[0] != pid]
        text = render(obs) if isinstance(obs, list) else str(obs)
        self.history[pid] = (self.history[pid] + "\n" + text).strip()
        return pid, text

    def step(self, action: str) -> bool:
        state = self.env.state
        errors = getattr(state, "error_count", 0)
        done, _info = self.with_game_random(lambda: self.env.step(action=action))
        return getattr(state, "error_count", 0) > errors or bool(
            done and (getattr(state, "game_info", {}) or {}).get(self.ep.seat, {}).get("invalid_move"))

    def finish(self, config: EnvConfig, truncated: bool = False) -> None:
        ep = self.ep
        ep.truncated = truncated
        if truncated:
            ep.game_reward, ep.outcome, ep.reason = 0.0, "draw" if ep.players > 1 else "loss", "truncated"
        else:
            rewards, info = self.with_game_random(self.env.close)
            ep.game_reward = float((rewards or {}).get(ep.seat, 0.0))
            ep.outcome = outcome(ep.game_reward, ep.players)
            ep.reason = str((info or {}).get(ep.seat, {}).get("reason", ""))
        ep.reward = shaped_reward(ep, config)
        self.done = True


def _advance(live: _Live, opponent: Any, config: EnvConfig) -> None:
    """Play the other seats until it is the policy's turn (its observation in ``live.pending``) or the game ends."""
    while not live.done:
        if live.env.state.done:
            live.finish(config)
            return
        pid = live.env.state.current_player_id
        if pid == live.ep.seat:
            _, text = live.observe()
            live.pending = text
            return
        _, _ = live.observe()
        action = live.with_game_random(lambda: opponent.act(live.env, pid, live.history[pid], live.rng))
        live.ep.opponent_moves.append(action)
        live.step(action)


def _scripted_actions(player: Any, lives: list[_Live], tokenizer) -> list:
    """The actions of a scripted ``player`` (the opponents' interface) as completions ending with EOS."""
    from ..rollout.generation import Completion

    out = []
    for lv in lives:
        seat = lv.ep.seat
        text = lv.with_game_random(lambda lv=lv, seat=seat: player.act(lv.env, seat, lv.history[seat], lv.rng))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Completion(text, ids, "stop"))
    return out


def play_episodes(model, tokenizer, jobs: list[EpisodeJob], config: EnvConfig, opponent: Any = None,
                  do_sample: bool = True, sampling: dict | None = None, batch_size: int = 64,
                  generation_config: Any = None, progress: Any = None, player: Any = None,
                  generate: Callable | None = None) -> list[Episode]:
    """Play every job to its end with ``model`` in lockstep (module docstring); returns the episodes in job order.
    ``progress``: an optional callable ``progress(finished: int)`` called as episodes end. ``player``: a scripted
    player (the opponents' interface) that plays the policy's seat instead of ``model`` (demonstrations; its actions
    are tokenised and end with EOS). ``generate(sequences, max_new_tokens) -> list[Completion]`` replaces HF
    ``generate`` on ``model`` (a trainer's vLLM: :func:`rlkit.rollout.vllm.trainer_generate_ids`)."""
    from ..rollout.generation import generate_from_ids

    conversation = Conversation(tokenizer, config.system_prompt)
    opponent = opponent if opponent is not None else make_opponent(config)
    lives = [_Live(job, config, conversation) for job in jobs]
    for live in lives:
        _advance(live, opponent, config)
        if not live.done:
            live.ep.prompt_ids = conversation.prompt_ids(live.pending)
            live.ep.turns.append(Turn(observation=live.pending, action=""))
            live.pending = ""
    finished = sum(live.done for live in lives)
    while True:
        waiting = [lv for lv in lives if not lv.done]
        for lv in waiting:  # cut what would overflow
            length = len(lv.ep.prompt_ids) + len(lv.ep.completion_ids)
            if len(lv.ep.turns) > config.max_turns or length + config.max_action_tokens > config.max_episode_tokens:
                lv.ep.turns.pop()  # the turn that was about to be played
                lv.finish(config, truncated=True)
        waiting = [lv for lv in waiting if not lv.done]
        if progress is not None and sum(lv.done for lv in lives) != finished:
            finished = sum(lv.done for lv in lives)
            progress(finished)
        if not waiting:
            break
        if player is not None:
            outs = _scripted_actions(player, waiting, tokenizer)
        elif generate is not None:
            outs = generate([lv.ep.prompt_ids + lv.ep.completion_ids for lv in waiting], config.max_action_tokens)
        else:
            outs = generate_from_ids(model, tokenizer, [lv.ep.prompt_ids + lv.ep.completion_ids for lv in waiting],
                                     config.max_action_tokens, do_sample=do_sample, batch_size=batch_size,
                                     sampling=sampling, generation_config=generation_config)
        for lv, out in zip(waiting, outs):
            ep, turn = lv.ep, lv.ep.turns[-1]
            ep.completion_ids += out.token_ids
            ep.env_mask += [1] * len(out.token_ids)
            ep.logprobs += list(out.logprobs) if out.logprobs is not None else [None] * len(out.token_ids)
            turn.action, turn.tokens = out.text, len(out.token_ids)
            turn.formatted, turn.hasty = action_checks(out.text, config)
            turn.invalid = lv.step(out.text)
            ep.invalid_moves += turn.invalid
            _advance(lv, opponent, config)
            if lv.done:
                continue
            between = conversation.between_ids(lv.pending, ended=out.finish_reason == "stop")
            ep.completion_ids += between
            ep.env_mask += [0] * len(between)
            ep.logprobs += [None] * len(between)
            ep.turns.append(Turn(observation=lv.pending, action=""))
            lv.pending = ""
    for lv in lives:  # over before the policy's first action (an opponent's forfeit, a prompt over the limit)
        if not lv.ep.completion_ids:
            if not lv.ep.prompt_ids:
                lv.ep.prompt_ids = conversation.prompt_ids(lv.history[lv.ep.seat] or f"{lv.ep.game}: game over.")
            lv.ep.completion_ids = [tokenizer.eos_token_id]
            lv.ep.env_mask = [0]  # nothing the policy wrote: nothing to learn from
            lv.ep.logprobs = [None]
    if progress is not None:
        progress(len(lives))
    return [lv.ep for lv in lives]
