"""The recipe's ``env:`` section: which games an RL run plays and how episodes are scored."""

from __future__ import annotations

from dataclasses import dataclass, field

OPPONENT_KINDS = ("random", "rule", "model", "self")


@dataclass
class EnvConfig:
    """Multi-turn game environments for GRPO rollouts (``rlkit.envs``); an empty ``games`` list means none.

    Every setting where the Divide-Fuse-Conquer paper is silent or unconfirmed is named so in its docstring and in
    ``docs/methods/dfc.md``."""

    games: list[str] = field(default_factory=list)
    """TextArena ids (e.g. ``TicTacToe-v0``); games that need the network or NLTK downloads are refused."""
    opponent: str = "random"
    """Who plays the other seats: ``random`` (a uniformly random legal move), ``rule`` (a rule-based player where
    the game has an obvious one, otherwise random), ``model:PATH`` (a frozen model, greedy) or ``self`` (a frozen
    copy of the policy the stage starts from)."""
    seat: int | None = None
    """The policy's seat in two-player games (None: drawn per episode from the episode's seed)."""
    episodes_per_game: int = 64
    """Rows of the training set per game: each row is one initial state (a game seed); GRPO plays
    ``num_generations`` episodes from each."""
    game_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per game (default 1 each: balanced); a game of weight 2 gets twice the rows."""
    seed_offset: int = 0
    """Added to every game seed, so evaluation can use initial states training never saw."""
    max_turns: int = 30
    """Policy turns per episode at most; an episode cut there ends as a draw (two-player) or with the game's
    score so far (single-player) and is marked ``truncated``."""
    max_action_tokens: int = 32
    """New tokens per action at most."""
    max_episode_tokens: int = 4096
    """Prompt plus trajectory tokens at most; an episode that reaches it is cut as by ``max_turns``."""
    error_allowance: int = 1
    """Invalid moves a player may retry before the game ends against it (TextArena's default: 1)."""
    win_reward: float = 1.0
    draw_reward: float = 0.0
    loss_reward: float = -1.0
    """Two-player outcomes. Single-player puzzles use the game's own score in [0, 1]."""
    invalid_penalty: float = 0.0
    """Subtracted per invalid move of the policy (rule-based shaping; the paper's values are unconfirmed)."""
    format_penalty: float = 0.0
    """Subtracted per action with no bracketed move ``[...]``."""
    hasty_penalty: float = 0.0
    """Subtracted per action with fewer than ``hasty_min_chars`` characters before its bracketed move: the
    hasty-action penalty (the paper names it, its form is unconfirmed; this reading: acting without reasoning)."""
    hasty_min_chars: int = 0
    opponent_temperature: float = 0.0
    """Sampling temperature of a model opponent (0: greedy)."""
    system_prompt: str | None = None
    """A system message before the first observation (chat-template tokenizers only)."""

    def __post_init__(self):
        kind = self.opponent.split(":", 1)[0]
        if kind not in OPPONENT_KINDS:
            raise ValueError(f"opponent must be random, rule, self or model:PATH, got {self.opponent!r}")
        if kind == "model" and not self.opponent.partition(":")[2].strip():
            raise ValueError("opponent model:PATH needs a model path or hub id after 'model:'")
        for name in ("episodes_per_game", "max_turns", "max_action_tokens", "max_episode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.error_allowance < 0:
            raise ValueError(f"error_allowance must be >= 0, got {self.error_allowance}")
        for name in ("invalid_penalty", "format_penalty", "hasty_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is subtracted from the reward: give it as a positive number, got "
                                 f"{getattr(self, name)}")
        for game, w in self.game_weights.items():
            if game not in self.games:
                raise ValueError(f"game_weights names {game!r}, which is not in games")
            if not w > 0:
                raise ValueError(f"game_weights[{game!r}] must be > 0, got {w}")
        if self.seat is not None and self.seat < 0:
            raise ValueError(f"seat must be >= 0 or null, got {self.seat}")

    @property
    def enabled(self) -> bool:
        return bool(self.games)
