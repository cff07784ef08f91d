"""Scripted opponents (rlkit/envs/opponents.py) against real TextArena 0.7.4 games."""

from __future__ import annotations

import random
import types

import pytest

ta = pytest.importorskip("textarena")

from rlkit.envs.opponents import (  # noqa: E402
    RULE_GAMES,
    Opponent,
    RandomOpponent,
    RuleOpponent,
    actions_from_observation,
    game_family,
    legal_actions,
    make_scripted,
)

SINGLE = {
    "GuessTheNumber-v0", "Blackjack-v0", "FrozenLake-v0", "TowerOfHanoi-v0",
    "LightsOut-v0", "Mastermind-v0", "Bandit-v0",
}
SUPPORTED = [
    "TicTacToe-v0", "Nim-v0", "KuhnPoker-v0", "GuessTheNumber-v0", "Blackjack-v0", "FrozenLake-v0",
    "TowerOfHanoi-v0", "ConnectFour-v0", "PigDice-v0", "IteratedRockPaperScissors-v0",
    "IteratedMatchingPennies-v0", "WildTicTacToe-v0", "Chopsticks-v0", "LightsOut-v0", "Mastermind-v0",
    "Bandit-v0",
]
VARIANTS = ["Nim-v0-medium", "KuhnPoker-v0-short", "Mastermind-v0-extreme", "FrozenLake-v0-hardcore",
            "TowerOfHanoi-v0-medium", "PigDice-v0-short", "ConnectFour-v0-large"]


def _make(game: str, seed: int, wrapped: bool = False):
    env = ta.make(game if wrapped else game + "-raw")
    env.reset(num_players=1 if game_family(game) in SINGLE else 2, seed=seed)
    return env


def play(game: str, players: list[Opponent], seed: int, rng_seed: int = 0, wrapped: bool = False):
    """Play one episode; returns (rewards, game_info, actions). Fails on any invalid move (even a forgiven one)."""
    env = _make(game, seed, wrapped)
    rng = random.Random(rng_seed)
    seen = {pid: "" for pid in range(len(players))}
    actions: list[str] = []
    done = False
    while not done:
        pid, obs = env.get_observation()
        seen[pid] += obs if isinstance(obs, str) else "\n".join(msg for _, msg, _ in obs) + "\n"
        action = players[pid].act(env, pid, seen[pid], rng)
        actions.append(action)
        done, _ = env.step(action)
        assert env.state.error_count == 0, f"{game}: invalid move {action!r}"
        assert len(actions) < 1000
    rewards, info = env.close()
    assert not any(v["invalid_move"] for v in info.values())
    return rewards, info, actions


def _seats(game: str, first: Opponent, second: Opponent | None = None) -> list[Opponent]:
    return [first] if game_family(game) in SINGLE else [first, second or RandomOpponent()]


@pytest.mark.parametrize("game", SUPPORTED + VARIANTS)
def test_random_and_rule_play_legal_games(game):
    for seed in range(3):
        play(game, _seats(game, RandomOpponent()), seed, rng_seed=seed)
        play(game, _seats(game, RuleOpponent()), seed, rng_seed=seed + 10)
        start = legal_actions(game, _make(game, seed), 0)
        assert start is None if game == "Mastermind-v0-extreme" else start  # too many codes to list


def test_wrapped_env_is_seen_through():
    rewards, _, _ = play("TicTacToe-v0", [RuleOpponent(), RuleOpponent()], 0, wrapped=True)
    assert rewards == {0: 0, 1: 0}  # two sound rule players draw


def test_tictactoe_rule_beats_random():
    not_lost = 0
    for i in range(30):
        seat = i % 2
        players = [RandomOpponent(), RandomOpponent()]
        players[seat] = RuleOpponent()
        rewards, _, _ = play("TicTacToe-v0", players, i, rng_seed=i)
        not_lost += rewards[seat] >= 0
    assert not_lost >= 24


def test_connectfour_rule_beats_random():
    wins = 0
    for i in range(10):
        seat = i % 2
        players = [RandomOpponent(), RandomOpponent()]
        players[seat] = RuleOpponent()
        rewards, _, _ = play("ConnectFour-v0", players, i, rng_seed=i)
        wins += rewards[seat] > 0
    assert wins >= 9


@pytest.mark.parametrize("game", ["Nim-v0", "Nim-v0-medium", "Nim-v0-large"])
def test_nim_rule_always_wins_first_seat(game):
    for i in range(15):
        rewards, _, _ = play(game, [RuleOpponent(), RandomOpponent()], i, rng_seed=i)
        assert rewards[0] == 1


def test_pigdice_rule_beats_random():
    wins = sum(play("PigDice-v0", [RuleOpponent(), RandomOpponent()], i, rng_seed=i)[0][0] > 0 for i in range(6))
    assert wins >= 5


@pytest.mark.parametrize("game,limit", [("TowerOfHanoi-v0", 7), ("TowerOfHanoi-v0-medium", 15)])
def test_hanoi_rule_solves_optimally(game, limit):
    rewards, _, actions = play(game, [RuleOpponent()], 0)
    assert rewards[0] == 1 and len(actions) == limit


def test_hanoi_rule_solves_from_any_position():
    rng = random.Random(0)
    for i in range(5):
        env = _make("TowerOfHanoi-v0-medium", i)
        for _ in range(6):  # scramble with legal moves, then let the rule player finish
            done, _ = env.step(rng.choice(legal_actions("TowerOfHanoi-v0", env, 0)))
            if done:
                break
        moves = 0
        while not env.state.done:
            env.step(RuleOpponent().act(env, 0, "", rng))
            moves += 1
            assert env.state.error_count == 0
        assert env.close()[0][0] == 1 and moves <= 15


@pytest.mark.parametrize("game", ["FrozenLake-v0", "FrozenLake-v0-random", "FrozenLake-v0-hardcore"])
def test_frozenlake_rule_reaches_goal(game):
    for seed in range(8):
        rewards, _, _ = play(game, [RuleOpponent()], seed)
        assert rewards[0] == 1.0


def test_guess_the_number_binary_search():
    for seed in range(25):
        rewards, info, actions = play("GuessTheNumber-v0", [RuleOpponent()], seed)
        assert rewards[0] == 1 and len(actions) <= 5


def test_kuhn_rule_decisions():
    env = _make("KuhnPoker-v0", 0)
    gs = env.state.game_state
    pid = env.state.current_player_id
    rng = random.Random(0)
    rule = RuleOpponent()
    for card, opening in ((2, "[bet]"), (1, "[check]"), (0, "[check]")):
        gs["player_cards"][pid] = card
        assert rule.act(env, pid, "", rng) == opening
    gs["current_legal_action_tree"] = {"fold": "loser", "call": "showdown"}  # facing a bet
    gs["player_cards"][pid] = 2
    assert rule.act(env, pid, "", rng) == "[call]"
    gs["player_cards"][pid] = 0
    assert rule.act(env, pid, "", rng) == "[fold]"
    gs["player_cards"][pid] = 1
    calls = sum(rule.act(env, pid, "", rng) == "[call]" for _ in range(300))
    assert 70 <= calls <= 130  # about 1/3


def test_blackjack_rule_hits_below_17():
    env = _make("Blackjack-v0", 0)
    gs = env.state.game_state
    rng = random.Random(0)
    for hand, action in ((["10♠", "6♥"], "[Hit]"), (["10♠", "7♥"], "[Stand]"), (["A♠", "5♥"], "[Hit]"),
                         (["A♠", "6♥"], "[Stand]"), (["A♠", "A♥", "9♦", "5♣"], "[Hit]")):
        gs["player_hand"] = hand
        assert RuleOpponent().act(env, 0, "", rng) == action


def test_same_rng_seed_same_actions():
    for game in ("TicTacToe-v0", "KuhnPoker-v0", "Chopsticks-v0", "Mastermind-v0", "PigDice-v0"):
        players = _seats(game, RandomOpponent(), RuleOpponent())
        a = play(game, players, 3, rng_seed=7)[2]
        b = play(game, players, 3, rng_seed=7)[2]
        assert a == b
    runs = {tuple(play("TicTacToe-v0", [RandomOpponent(), RandomOpponent()], 0, rng_seed=s)[2]) for s in range(5)}
    assert len(runs) > 1


def test_game_family_and_rule_games():
    assert game_family("Nim-v0-medium") == "Nim-v0"
    assert game_family("KuhnPoker-v0-short") == "KuhnPoker-v0"
    assert game_family("TicTacToe-v0-raw") == "TicTacToe-v0"
    assert RULE_GAMES == {"TicTacToe-v0", "Nim-v0", "KuhnPoker-v0", "GuessTheNumber-v0", "Blackjack-v0",
                          "FrozenLake-v0", "TowerOfHanoi-v0", "ConnectFour-v0", "PigDice-v0"}


def test_make_scripted():
    assert isinstance(make_scripted("random"), RandomOpponent) and make_scripted("random").name == "random"
    assert isinstance(make_scripted("rule"), RuleOpponent) and make_scripted("rule").name == "rule"
    with pytest.raises(ValueError, match="bogus"):
        make_scripted("bogus")


def test_unknown_game_falls_back_to_observation():
    env = types.SimpleNamespace(env_id="SomeGame-v0-raw")
    assert legal_actions("SomeGame-v0", env, 0) is None
    obs = "Available Moves: '[1]', '[2]'\n\nPlayer 1 moved.\nValid moves: '[a b]', '[c d]'\nScore: 3\n"
    assert actions_from_observation(obs) == ["[a b]", "[c d]"]
    rng = random.Random(0)
    assert {RandomOpponent().act(env, 0, obs, rng) for _ in range(20)} == {"[a b]", "[c d]"}
    with pytest.raises(ValueError, match="no random player exists for SomeGame-v0"):
        RandomOpponent().act(env, 0, "no list here", rng)
    with pytest.raises(ValueError, match="SomeGame-v0"):
        RuleOpponent().act(env, 0, "", rng)


def test_observation_fallback_plays_simple_tak():
    # SimpleTak has no legal-action function but lists "Available Moves" in its observations.
    play("SimpleTak-v0", [RandomOpponent(), RuleOpponent()], 0)
