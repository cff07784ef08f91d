"""Scripted opponents for TextArena 0.7.4 games.

Used as the opponent inside game environments (RL and evaluation), as scripted policies in tests, and to
make demonstration trajectories. Everything reads the *raw* textarena env (``textarena.make(id + "-raw")``
after ``reset``); wrappers are looked through by following ``.env`` attributes. All randomness comes from
the episode's ``random.Random`` passed to ``act`` (textarena seeds the global ``random`` itself).

``legal_actions(game_id, env, player_id)`` lists the bracketed action strings the game accepts right now
(exactly as its ``env.py`` parses them), or ``None`` for games it does not know. Variants map to their
family ("Nim-v0-medium" -> "Nim-v0"). Per game:

- TicTacToe-v0: ``[c]`` for each empty cell c (0-8). Player 1 is X, player 0 is O.
- WildTicTacToe-v0: ``[X c]`` and ``[O c]`` for each empty cell.
- ConnectFour-v0: ``[col c]`` for each column that is not full.
- Nim-v0: ``[pile k]`` for every pile and 1 <= k <= pile size.
- KuhnPoker-v0: the keys of ``current_legal_action_tree`` (``[check]``/``[bet]`` or ``[call]``/``[fold]``).
- GuessTheNumber-v0: ``[n]`` for every number in range that was not guessed yet (repeats are invalid).
- Blackjack-v0: ``[Hit]``, ``[Stand]``.
- PigDice-v0: ``[roll]``, ``[hold]``.
- FrozenLake-v0: ``[up]``/``[down]``/``[left]``/``[right]`` that stay on the grid (a wall bump is invalid).
- TowerOfHanoi-v0: ``[X Y]`` for every legal disk move.
- IteratedRockPaperScissors-v0: ``[rock]``, ``[paper]``, ``[scissors]``.
- IteratedMatchingPennies-v0: ``[heads]``, ``[tails]``.
- Chopsticks-v0: ``[attack m o]`` with both hands alive, and ``[split L R]`` with L + R = own total,
  0 <= L, R <= 4, that neither repeats nor mirrors the current hands (the game accepts larger or
  mirrored splits, but they are pointless).
- LightsOut-v0: ``[r c]`` for every cell (the game requires exactly this text).
- Mastermind-v0: ``[d1 d2 ...]`` for every code not guessed yet; ``None`` when there are more than
  ``_MAX_ENUMERATE`` codes (e.g. the "-extreme" variant): ``RandomOpponent`` then samples a fresh code.
- Bandit-v0: ``[button]`` for each of the env's buttons.

An opponent finds the game from ``env.env_id`` (set by ``textarena.make``), else from the env's class, unless
it was built with an explicit ``game_id`` (``make_scripted(kind, game_id)``).

``RandomOpponent`` plays a uniformly random legal action. For any other game it picks a random action
from the latest "Available Moves:"/"available actions"/"Valid moves:" list in the observation text and
raises ``ValueError`` when there is none.

``RuleOpponent`` plays a simple rule where one is obvious (``RULE_GAMES``) and falls back to
``RandomOpponent`` elsewhere:

- TicTacToe-v0: win, else block, else centre, else a corner, else any cell (ties broken at random).
- ConnectFour-v0: win, else block, else the centre-most column that does not hand the opponent an
  immediate win on top of it (if every column does, the centre-most one).
- Nim-v0: optimal play (make the xor of the piles zero); a random legal move when the position is lost.
- KuhnPoker-v0: K bets (or calls a bet); J checks (or folds to a bet); Q checks and calls a bet with
  probability 1/3. Simple and never dominated; not the Nash equilibrium.
- GuessTheNumber-v0: binary search on the interval left by the game's higher/lower history.
- Blackjack-v0: hit below 17, else stand.
- PigDice-v0: hold when the turn total reaches 20 or when holding reaches the winning score, else roll.
- FrozenLake-v0: first step of a shortest path to the goal avoiding holes (BFS over the state's grid).
- TowerOfHanoi-v0: the optimal next move from any legal position (recursive largest-disk rule).
- IteratedRockPaperScissors, IteratedMatchingPennies, WildTicTacToe, Chopsticks, LightsOut,
  Mastermind, Bandit: no rule player; ``RuleOpponent`` plays randomly there.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import deque
from typing import Any, Callable

__all__ = [
    "Opponent",
    "RandomOpponent",
    "RuleOpponent",
    "RULE_GAMES",
    "RANDOM_GAMES",
    "legal_actions",
    "game_family",
    "make_scripted",
]

_MAX_ENUMERATE = 100_000


# --------------------------------------------------------------------------- helpers


def game_family(game_id: str) -> str:
    """Map a TextArena id (variant or ``-raw`` suffix allowed) to its family, e.g. "Nim-v0-medium" -> "Nim-v0"."""
    m = re.match(r"^(.+?-v\d+)", game_id)
    return m.group(1) if m else game_id


def _base_env(env: Any) -> Any:
    """The innermost textarena env: follow wrappers' ``.env`` attributes (read from ``__dict__`` so a
    wrapper's attribute delegation cannot loop)."""
    for _ in range(32):
        inner = getattr(env, "__dict__", {}).get("env")
        if inner is None:
            return env
        env = inner
    return env


def _gs(env: Any) -> dict:
    return _base_env(env).state.game_state


# --------------------------------------------------------------------------- legal actions


def _ttt_legal(env: Any, pid: int) -> list[str]:
    board = _gs(env)["board"]
    return [f"[{r * 3 + c}]" for r in range(3) for c in range(3) if board[r][c] == ""]


def _wild_ttt_legal(env: Any, pid: int) -> list[str]:
    board = _gs(env)["board"]
    return [f"[{m} {r * 3 + c}]" for r in range(3) for c in range(3) if board[r][c] == "" for m in ("X", "O")]


def _c4_legal(env: Any, pid: int) -> list[str]:
    board = _gs(env)["board"]
    return [f"[col {c}]" for c in range(len(board[0])) if board[0][c] == "."]


def _nim_legal(env: Any, pid: int) -> list[str]:
    piles = _gs(env)["piles"]
    return [f"[{i} {k}]" for i, p in enumerate(piles) for k in range(1, p + 1)]


def _kuhn_legal(env: Any, pid: int) -> list[str]:
    tree = _gs(env)["current_legal_action_tree"]
    return [f"[{k}]" for k in tree] if isinstance(tree, dict) else []


def _guess_candidates(env: Any) -> list[int]:
    base = _base_env(env)
    guessed = set(getattr(base, "guessed_numbers", set()))
    guessed |= {g for g, _ in base.state.game_state.get("guess_history", [])}
    return [n for n in range(base.min_number, base.max_number + 1) if n not in guessed]


def _guess_legal(env: Any, pid: int) -> list[str]:
    return [f"[{n}]" for n in _guess_candidates(env)]


def _fixed(*actions: str) -> Callable[[Any, int], list[str]]:
    return lambda env, pid: list(actions)


_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _lake_legal(env: Any, pid: int) -> list[str]:
    gs = _gs(env)
    size = len(gs["grid"])
    r, c = gs["player_pos"]
    return [f"[{name}]" for name, (dr, dc) in _MOVES.items() if 0 <= r + dr < size and 0 <= c + dc < size]


def _hanoi_legal(env: Any, pid: int) -> list[str]:
    towers = _gs(env)["towers"]
    out = []
    for src, dst in itertools.permutations(sorted(towers), 2):
        if towers[src] and (not towers[dst] or towers[dst][-1] > towers[src][-1]):
            out.append(f"[{src} {dst}]")
    return out


def _chopsticks_legal(env: Any, pid: int) -> list[str]:
    hands = _gs(env)["hands"]
    mine, theirs = hands[pid], hands[1 - pid]
    out = [f"[attack {m} {o}]" for m in (0, 1) for o in (0, 1) if mine[m] > 0 and theirs[o] > 0]
    total = mine[0] + mine[1]
    for left in range(0, min(total, 4) + 1):
        right = total - left
        if right > 4 or (left, right) in {(mine[0], mine[1]), (mine[1], mine[0])}:
            continue
        out.append(f"[split {left} {right}]")
    return out


def _lights_legal(env: Any, pid: int) -> list[str]:
    size = len(_gs(env)["grid"])
    return [f"[{r} {c}]" for r in range(size) for c in range(size)]


def _mastermind_space(env: Any) -> tuple[int, int, bool]:
    gs = _gs(env)
    return gs["code_length"], gs["num_numbers"], bool(gs["duplicate_numbers"])


def _mastermind_count(length: int, n: int, dup: bool) -> int:
    if dup:
        return n**length
    count = 1
    for i in range(length):
        count *= n - i
    return count


def _mastermind_legal(env: Any, pid: int) -> list[str] | None:
    length, n, dup = _mastermind_space(env)
    if _mastermind_count(length, n, dup) > _MAX_ENUMERATE:
        return None
    digits = range(1, n + 1)
    codes = itertools.product(digits, repeat=length) if dup else itertools.permutations(digits, length)
    seen = {tuple(h["guess"]) for h in _gs(env)["history"]}
    return ["[" + " ".join(map(str, code)) + "]" for code in codes if code not in seen]


def _bandit_legal(env: Any, pid: int) -> list[str]:
    return [f"[{b}]" for b in _base_env(env).buttons]


_LEGAL: dict[str, Callable[[Any, int], list[str] | None]] = {
    "TicTacToe-v0": _ttt_legal,
    "WildTicTacToe-v0": _wild_ttt_legal,
    "ConnectFour-v0": _c4_legal,
    "Nim-v0": _nim_legal,
    "KuhnPoker-v0": _kuhn_legal,
    "GuessTheNumber-v0": _guess_legal,
    "Blackjack-v0": _fixed("[Hit]", "[Stand]"),
    "PigDice-v0": _fixed("[roll]", "[hold]"),
    "FrozenLake-v0": _lake_legal,
    "TowerOfHanoi-v0": _hanoi_legal,
    "IteratedRockPaperScissors-v0": _fixed("[rock]", "[paper]", "[scissors]"),
    "IteratedMatchingPennies-v0": _fixed("[heads]", "[tails]"),
    "Chopsticks-v0": _chopsticks_legal,
    "LightsOut-v0": _lights_legal,
    "Mastermind-v0": _mastermind_legal,
    "Bandit-v0": _bandit_legal,
}


def legal_actions(game_id: str, env: Any, player_id: int) -> list[str] | None:
    """Bracketed action strings the game accepts now for ``player_id``; ``None`` for unknown games (and for
    Mastermind spaces too large to list)."""
    fn = _LEGAL.get(game_family(game_id))
    return None if fn is None else fn(env, player_id)


# --------------------------------------------------------------------------- observation fallback

_LIST_HEADER = re.compile(r"(?:available|valid|legal)\s+(?:moves|actions)", re.IGNORECASE)
_BRACKETED = re.compile(r"\[[^\[\]\n]+\]")


def actions_from_observation(observation: str) -> list[str]:
    """Bracketed actions from the latest "Available Moves"-style list in ``observation`` (possibly empty)."""
    headers = list(_LIST_HEADER.finditer(observation or ""))
    if not headers:
        return []
    tail = observation[headers[-1].end():]
    block = tail.split("\n\n", 1)[0]
    return list(dict.fromkeys(_BRACKETED.findall(block)))


# --------------------------------------------------------------------------- random sampling


def _random_mastermind(env: Any, rng: random.Random) -> str:
    length, n, dup = _mastermind_space(env)
    seen = {tuple(h["guess"]) for h in _gs(env)["history"]}
    digits = list(range(1, n + 1))
    while True:
        code = tuple(rng.choice(digits) for _ in range(length)) if dup else tuple(rng.sample(digits, length))
        if code not in seen:
            return "[" + " ".join(map(str, code)) + "]"


def random_action(game_id: str, env: Any, player_id: int, observation: str, rng: random.Random) -> str:
    """A uniformly random legal action (see the module docstring for the per-game fallbacks)."""
    family = game_family(game_id)
    name = game_id[: -len("-raw")] if game_id.endswith("-raw") else game_id
    actions = legal_actions(game_id, env, player_id)
    if actions is None and family == "Mastermind-v0":
        return _random_mastermind(env, rng)
    if actions is None:
        actions = actions_from_observation(observation)
        if not actions:
            raise ValueError(
                f"no random player exists for {name}: no legal-action function and no "
                f"'Available Moves'-style list of [actions] in the observation"
            )
    if not actions:
        raise ValueError(f"{name}: no legal action for player {player_id} (is the game over?)")
    return rng.choice(actions)


# --------------------------------------------------------------------------- rule players


def _ttt_lines() -> list[tuple[int, int, int]]:
    rows = [(3 * r, 3 * r + 1, 3 * r + 2) for r in range(3)]
    cols = [(c, c + 3, c + 6) for c in range(3)]
    return rows + cols + [(0, 4, 8), (2, 4, 6)]


def _ttt_completing(cells: list[str], mark: str) -> list[int]:
    """Empty cells that complete a line of ``mark``."""
    out = set()
    for line in _ttt_lines():
        vals = [cells[i] for i in line]
        if vals.count(mark) == 2 and vals.count("") == 1:
            out.add(line[vals.index("")])
    return sorted(out)


def _ttt_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    cells = [v for row in _gs(env)["board"] for v in row]
    me, them = ("X", "O") if pid == 1 else ("O", "X")
    empty = [i for i, v in enumerate(cells) if v == ""]
    for choice in (
        _ttt_completing(cells, me),
        _ttt_completing(cells, them),
        [4] if 4 in empty else [],
        [i for i in (0, 2, 6, 8) if i in empty],
        empty,
    ):
        if choice:
            return f"[{rng.choice(choice)}]"
    raise ValueError("TicTacToe-v0: board is full")


def _c4_drop_row(board: list[list[str]], col: int) -> int | None:
    for r in range(len(board) - 1, -1, -1):
        if board[r][col] == ".":
            return r
    return None


def _c4_wins_at(board: list[list[str]], r: int, c: int, disc: str) -> bool:
    rows, cols = len(board), len(board[0])
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        count = 1
        for sign in (1, -1):
            rr, cc = r + sign * dr, c + sign * dc
            while 0 <= rr < rows and 0 <= cc < cols and board[rr][cc] == disc:
                count += 1
                rr, cc = rr + sign * dr, cc + sign * dc
        if count >= 4:
            return True
    return False


def _c4_winning_cols(board: list[list[str]], disc: str) -> list[int]:
    out = []
    for c in range(len(board[0])):
        r = _c4_drop_row(board, c)
        if r is not None and _c4_wins_at(board, r, c, disc):
            out.append(c)
    return out


def _c4_gives_win(board: list[list[str]], col: int, me: str, them: str) -> bool:
    """Whether dropping in ``col`` lets the opponent win by dropping on top of it."""
    r = _c4_drop_row(board, col)
    if r is None or r == 0:
        return False
    board[r][col] = me
    try:
        return _c4_wins_at(board, r - 1, col, them)
    finally:
        board[r][col] = "."


def _c4_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    board = [list(row) for row in _gs(env)["board"]]
    me, them = ("X", "O") if pid == 0 else ("O", "X")
    open_cols = [c for c in range(len(board[0])) if board[0][c] == "."]
    for group in (_c4_winning_cols(board, me), _c4_winning_cols(board, them)):
        if group:
            return f"[col {rng.choice(group)}]"
    centre = (len(board[0]) - 1) / 2
    safe = [c for c in open_cols if not _c4_gives_win(board, c, me, them)] or open_cols
    best = min(abs(c - centre) for c in safe)
    return f"[col {rng.choice([c for c in safe if abs(c - centre) == best])}]"


def _nim_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    piles = _gs(env)["piles"]
    x = 0
    for p in piles:
        x ^= p
    if x:
        for i, p in enumerate(piles):
            if p ^ x < p:
                return f"[{i} {p - (p ^ x)}]"
    return rng.choice(_nim_legal(env, pid))


_KUHN_CALL_Q = 1 / 3


def _kuhn_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    gs = _gs(env)
    legal = [a[1:-1] for a in _kuhn_legal(env, pid)]
    card = gs["player_cards"][pid]  # 0=J, 1=Q, 2=K
    if "call" in legal:  # facing a bet
        call = card == 2 or (card == 1 and rng.random() < _KUHN_CALL_Q)
        return "[call]" if call else "[fold]"
    return "[bet]" if card == 2 and "bet" in legal else "[check]"


def _guess_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    base = _base_env(env)
    lo, hi = base.min_number, base.max_number
    for guess, hint in base.state.game_state.get("guess_history", []):
        if hint == "higher":
            lo = max(lo, guess + 1)
        elif hint == "lower":
            hi = min(hi, guess - 1)
    candidates = [n for n in _guess_candidates(env) if lo <= n <= hi] or _guess_candidates(env)
    return f"[{candidates[(len(candidates) - 1) // 2]}]"


def _blackjack_score(hand: list[str]) -> int:
    total, aces = 0, 0
    for card in hand:
        rank = card[:-1]
        if rank == "A":
            total, aces = total + 11, aces + 1
        else:
            total += 10 if rank in ("J", "Q", "K") else int(rank)
    while total > 21 and aces:
        total, aces = total - 10, aces - 1
    return total


def _blackjack_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    return "[Hit]" if _blackjack_score(_gs(env)["player_hand"]) < 17 else "[Stand]"


_PIG_HOLD_AT = 20


def _pig_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    gs = _gs(env)
    total = gs["turn_total"]
    target = getattr(_base_env(env), "winning_score", 100)
    return "[hold]" if total >= _PIG_HOLD_AT or (total > 0 and gs["scores"][pid] + total >= target) else "[roll]"


def _lake_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    gs = _gs(env)
    grid, start, goal = gs["grid"], tuple(gs["player_pos"]), tuple(gs["goal_pos"])
    size = len(grid)
    first: dict[tuple[int, int], str | None] = {start: None}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            return f"[{first[(r, c)]}]"
        for name, (dr, dc) in _MOVES.items():
            nxt = (r + dr, c + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in first and grid[nxt[0]][nxt[1]] != "H":
                first[nxt] = first[(r, c)] or name
                queue.append(nxt)
    return rng.choice(_lake_legal(env, pid))  # no safe path (cannot happen in textarena's generator)


def _hanoi_next(towers: dict[str, list[int]], disk: int, target: str) -> tuple[str, str] | None:
    """The optimal next move that gets disks 1..``disk`` onto ``target``; ``None`` when already there."""
    if disk == 0:
        return None
    where = next(name for name, stack in towers.items() if disk in stack)
    if where == target:
        return _hanoi_next(towers, disk - 1, target)
    spare = next(name for name in sorted(towers) if name not in (where, target))
    step = _hanoi_next(towers, disk - 1, spare)
    return step if step is not None else (where, target)


def _hanoi_rule(env: Any, pid: int, obs: str, rng: random.Random) -> str:
    towers = _gs(env)["towers"]
    move = _hanoi_next(towers, sum(len(s) for s in towers.values()), "C")
    if move is None:
        return rng.choice(_hanoi_legal(env, pid))
    return f"[{move[0]} {move[1]}]"


_RULES: dict[str, Callable[[Any, int, str, random.Random], str]] = {
    "TicTacToe-v0": _ttt_rule,
    "ConnectFour-v0": _c4_rule,
    "Nim-v0": _nim_rule,
    "KuhnPoker-v0": _kuhn_rule,
    "GuessTheNumber-v0": _guess_rule,
    "Blackjack-v0": _blackjack_rule,
    "PigDice-v0": _pig_rule,
    "FrozenLake-v0": _lake_rule,
    "TowerOfHanoi-v0": _hanoi_rule,
}

RULE_GAMES: set[str] = set(_RULES)
RANDOM_GAMES: set[str] = set(_LEGAL)  # games with a legal-action function (all have a random player)


# --------------------------------------------------------------------------- opponents


def _game_id_of(env: Any) -> str | None:
    """The registered id of ``env`` if textarena recorded it, else None."""
    return getattr(_base_env(env), "env_id", None)


def _family_of_env(env: Any) -> str | None:
    """Recognise a supported game from the env's class (``textarena.envs.<Game>.env.<Game>Env``)."""
    module = type(_base_env(env)).__module__
    m = re.match(r"textarena\.envs\.([A-Za-z0-9]+)\.", module)
    if m and f"{m.group(1)}-v0" in _LEGAL:
        return f"{m.group(1)}-v0"
    return m.group(1) if m else None


class Opponent:
    """A scripted player. ``act`` returns the action text for ``player_id`` in ``env``'s current state."""

    name: str = "opponent"

    def __init__(self, game_id: str | None = None) -> None:
        self.game_id = game_id

    def act(self, env: Any, player_id: int, observation: str, rng: random.Random) -> str:
        raise NotImplementedError

    def _resolve_game(self, env: Any) -> str:
        game_id = self.game_id or _game_id_of(env) or _family_of_env(env)
        if game_id is None:
            raise ValueError(f"{self.name} opponent: cannot tell which game {type(_base_env(env)).__name__} is")
        return game_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class RandomOpponent(Opponent):
    """Uniformly random legal action; unknown games: a random action from the observation's move list."""

    name = "random"

    def act(self, env: Any, player_id: int, observation: str, rng: random.Random) -> str:
        return random_action(self._resolve_game(env), env, player_id, observation, rng)


class RuleOpponent(Opponent):
    """Rule-based player for ``RULE_GAMES``; plays like ``RandomOpponent`` in every other game."""

    name = "rule"

    def act(self, env: Any, player_id: int, observation: str, rng: random.Random) -> str:
        game_id = self._resolve_game(env)
        rule = _RULES.get(game_family(game_id))
        if rule is None:
            return random_action(game_id, env, player_id, observation, rng)
        return rule(env, player_id, observation, rng)


def make_scripted(kind: str, game_id: str | None = None) -> Opponent:
    """A scripted opponent: ``"random"`` or ``"rule"``."""
    kinds: dict[str, type[Opponent]] = {"random": RandomOpponent, "rule": RuleOpponent}
    if kind not in kinds:
        raise ValueError(f"unknown scripted opponent {kind!r}; expected one of: random, rule")
    return kinds[kind](game_id)
