"""The TextArena game catalogue: which games run offline, how many players they take, whether their initial state
is random, and how a raw observation becomes text.

TextArena (``pip install 'rlkit-reasoning[games]'``, version 0.7.4) is imported only when a game is made. Games are
named by their TextArena id without a wrapper suffix (``TicTacToe-v0``, ``Nim-v0-medium``); rlkit always makes the
``-raw`` variant (no observation wrappers), renders the messages itself, and adds only what a player has not seen
yet to each turn, so a whole episode is one growing conversation.

Refused games: the word games import NLTK corpora that ``nltk.download`` fetches from the network when their
module loads, and Debate / ScenarioPlanning judge with an OpenRouter jury (an API key and the network). They fail
offline in the middle of a run, so :func:`check_games` refuses them up front with the reason.
"""

from __future__ import annotations

import random
import re
from typing import Any

NLTK_GAMES = {"Wordle", "Hangman", "WordLadder", "WordChains", "WordSearch", "LetterAuction", "SpellingBee",
              "Codenames", "DontSayIt", "Crosswords", "Taboo", "TwentyQuestions"}
"""Families that call ``nltk.download`` (or read NLTK corpora) when made: they need the network or a provisioned
``NLTK_DATA``."""
JURY_GAMES = {"Debate", "ScenarioPlanning", "GuessWho"}
"""Families that call OpenRouter (a remote API with a key): a jury, or an LLM playing a character."""

SINGLE_PLAYER = {"2048", "Game2048", "BabyAiText", "Bandit", "Blackjack", "Countdown", "Cryptarithm", "FifteenPuzzle",
                 "FrozenLake", "GuessTheNumber", "GuessWho", "Klondike", "LightsOut", "LogicPuzzle", "Mastermind",
                 "Minesweeper", "PegJump", "RushHour", "Secretary", "Slitherlink", "Sokoban", "Sudoku",
                 "TowerOfHanoi", "ThreeCardMonte", "Set"}
"""Families played by one player (the rest here take two; three-player families are refused for now)."""
MANY_PLAYER = {"ThreePlayerGOPS", "ThreePlayerIPD", "ThreePlayerTicTacToe", "CharacterConclave", "SecretMafia",
               "SettlersOfCatan"}
"""Families for three or more players."""

FIXED_START = {"TicTacToe", "ReverseTicTacToe", "WildTicTacToe", "QuantumTicTacToe", "UltimateTicTacToe", "Nim",
               "ConnectFour", "Chess", "Checkers", "Othello", "Breakthrough", "Alquerque", "LinesOfAction", "Tak",
               "SimpleTak", "TowerOfHanoi", "Chopsticks", "IteratedRockPaperScissors", "IteratedMatchingPennies",
               "IteratedPrisonersDilemma", "IteratedStagHunt", "IteratedTwoThirdsAverage", "Surround", "Snake",
               "ColonelBlotto", "GameOfPureStrategy"}
"""Families whose initial state does not depend on the seed (DFC groups games by random vs fixed start). The
others deal cards, roll dice or draw a puzzle from the seed."""


class GameError(ValueError):
    """A game rlkit cannot play (unknown, needs the network, or textarena missing); the message says what to do."""


def family(game_id: str) -> str:
    """``Nim-v0-medium`` -> ``Nim``."""
    return re.split(r"-v\d", game_id, maxsplit=1)[0]


def _textarena():
    try:
        import textarena
    except ImportError:
        raise GameError("game environments need textarena: pip install 'rlkit-reasoning[games]' "
                        "(or pip install textarena==0.7.4)") from None
    return textarena


def check_games(games: list[str]) -> None:
    """Raise :class:`GameError` for the first game that is unknown, needs the network, has more than two players, or
    does not load here (some TextArena 0.7.4 modules use f-string syntax that needs Python 3.12; a few need data
    files the wheel lacks): each game is made and reset once."""
    if not games:
        raise GameError("env.games is empty: list TextArena game ids, e.g. [TicTacToe-v0, Nim-v0]")
    ta = _textarena()
    from textarena.envs.registration import ENV_REGISTRY

    for game in games:
        if game.endswith("-raw") or game.endswith("-train"):
            raise GameError(f"game {game!r}: give the id without its wrapper suffix "
                            f"({game.rsplit('-', 1)[0]!r}); rlkit renders observations itself")
        if game not in ENV_REGISTRY:
            from ..config import nearest

            raise GameError(f"game {game!r} is not in TextArena {ta.__version__}'s registry"
                            f"{nearest(game, [g for g in ENV_REGISTRY if not g.endswith(('-raw', '-train'))])}")
        fam = family(game)
        if fam in NLTK_GAMES:
            raise GameError(f"game {game!r} needs the network: its module downloads NLTK corpora (words, tagger) "
                            "when it loads; provision NLTK_DATA with them offline, or choose another game")
        if fam in JURY_GAMES:
            raise GameError(f"game {game!r} needs the network: it is judged by TextArena's OpenRouter jury "
                            "(a remote API with a key); choose another game")
        if fam in MANY_PLAYER:
            raise GameError(f"game {game!r} has more than two players; rlkit's environments seat one policy against "
                            "one opponent (two-player games) or none (puzzles)")
        saved = random.getstate()  # TextArena's reset seeds the global random: leave the caller's as it was
        try:
            make_env(game, seed=0)
        except SyntaxError as e:
            raise GameError(f"game {game!r}: TextArena's module does not load on this Python ({e.msg}; TextArena "
                            "0.7.4 writes some games with Python 3.12 f-strings); choose another game or Python "
                            ">= 3.12") from None
        except Exception as e:  # noqa: BLE001 -- any failure to make the game is the user's to know about
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise GameError(f"game {game!r} cannot be made here: {type(e).__name__}: {first}") from None
        finally:
            random.setstate(saved)


def num_players(game_id: str) -> int:
    return 1 if family(game_id) in SINGLE_PLAYER else 2


def random_start(game_id: str) -> bool:
    """Whether the initial state depends on the seed (cards, dice, drawn puzzles)."""
    return family(game_id) not in FIXED_START


def make_env(game_id: str, seed: int, error_allowance: int = 1) -> Any:
    """The ``-raw`` TextArena env of ``game_id``, reset with ``seed`` (TextArena seeds the global ``random``)."""
    ta = _textarena()
    env = ta.make(f"{game_id}-raw")
    env.reset(num_players=num_players(game_id), seed=seed)
    state = getattr(env, "state", None)
    if state is not None and hasattr(state, "error_allowance"):
        state.error_allowance = error_allowance
    return env


def render(messages: list) -> str:
    """A raw observation (a list of ``(sender, text, type)``) as text: game messages as they are, players' moves
    prefixed with who made them."""
    parts = []
    for sender, text, _kind in messages:
        text = str(text).strip()
        if not text:
            continue
        parts.append(text if sender == -1 else f"[Player {sender}] {text}")
    return "\n".join(parts)


def outcome(reward: float, players: int) -> str:
    """``win`` / ``draw`` / ``loss`` of a final game reward: the sign for two players; a single-player score in
    [0, 1] is a win only at 1 (a solved puzzle)."""
    if players == 1:
        return "win" if reward >= 1.0 - 1e-9 else "loss"
    return "win" if reward > 0 else "loss" if reward < 0 else "draw"
