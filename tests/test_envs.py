"""Multi-turn game environments (rlkit.envs): episodes as growing conversations, action-token masks, outcome and
shaped rewards, refused games, the GRPO rollout hook and game evaluation."""

from __future__ import annotations

import random
import re

import pytest
import torch

pytest.importorskip("textarena")

from rlkit.config import RecipeError  # noqa: E402
from rlkit.envs.config import EnvConfig  # noqa: E402
from rlkit.envs.episode import Conversation, EpisodeJob, play_episodes, shaped_reward  # noqa: E402
from rlkit.envs.games import GameError, check_games, make_env, num_players, outcome, random_start  # noqa: E402
from rlkit.envs.opponents import make_scripted  # noqa: E402
from rlkit.models import build_char_tokenizer  # noqa: E402


class ScriptedModel(torch.nn.Module):
    """A stand-in policy for ``generate``: reads the decoded context and answers with ``choose(context, turn)``,
    followed by EOS."""

    def __init__(self, tokenizer, choose):
        super().__init__()
        self.tokenizer, self.choose = tokenizer, choose
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            context = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            action = self.choose(context, self.calls)
            new = self.tokenizer(action, add_special_tokens=False)["input_ids"][: max_new_tokens - 1]
            rows.append(ids.tolist() + new + [self.tokenizer.eos_token_id])
        self.calls += 1
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def first_available(context: str, turn: int) -> str:
    """The first move of the last 'Available Moves' list in the context (TicTacToe)."""
    lists = re.findall(r"Available Moves: (.*)", context)
    return re.findall(r"\[\d+\]", lists[-1])[0]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _replay(game: str, seed: int, seat: int, policy_actions: list[str], opponent_actions: list[str]):
    """Play ``game`` directly in TextArena with the recorded actions: the game's own rewards."""
    env = make_env(game, seed)
    pol, opp = iter(policy_actions), iter(opponent_actions)
    done = False
    while not done:
        pid, _ = env.get_observation()
        done, _ = env.step(action=next(pol) if pid == seat else next(opp))
    return env.close()[0]


def test_episode_reproduces_the_games_outcome_and_reward(tok):
    config = EnvConfig(games=["TicTacToe-v0"], max_action_tokens=6)
    jobs = [EpisodeJob("TicTacToe-v0", seed, seat, rng_seed=seed) for seed in range(3) for seat in (0, 1)]
    eps = play_episodes(ScriptedModel(tok, first_available), tok, jobs, config, make_scripted("random"))
    assert len({e.outcome for e in eps}) >= 2  # the check below is not about one outcome only
    for ep in eps:
        rewards = _replay(ep.game, ep.seed, ep.seat, [t.action for t in ep.turns], ep.opponent_moves)
        assert ep.game_reward == rewards[ep.seat]
        assert ep.outcome == outcome(rewards[ep.seat], 2)
        assert ep.reward == {"win": 1.0, "draw": 0.0, "loss": -1.0}[ep.outcome]
        assert ep.invalid_moves == 0 and not ep.truncated


def test_single_player_reward_is_the_games_score(tok):
    """GuessTheNumber with a binary-search script: solved (score 1, a win)."""
    def bisect(context: str, turn: int) -> str:
        lo, hi = 1, 20
        for guess, hint in re.findall(r"\[(\d+)\]\D*?(higher|lower)", context):
            lo, hi = (max(lo, int(guess) + 1), hi) if hint == "higher" else (lo, min(hi, int(guess) - 1))
        return f"[{(lo + hi) // 2}]"

    config = EnvConfig(games=["GuessTheNumber-v0"], max_action_tokens=6)
    eps = play_episodes(ScriptedModel(tok, bisect), tok, [EpisodeJob("GuessTheNumber-v0", s, None, s) for s in range(4)],
                        config, make_scripted("random"))
    for ep in eps:
        assert ep.players == 1 and ep.seat == 0
        assert ep.outcome == "win" and ep.game_reward == 1.0 == ep.reward, ep.record()
        assert len(ep.turns) <= 5


def test_only_action_tokens_are_masked_in(tok):
    config = EnvConfig(games=["TicTacToe-v0"], max_action_tokens=6)
    [ep] = play_episodes(ScriptedModel(tok, first_available), tok, [EpisodeJob("TicTacToe-v0", 0, 0, 0)], config,
                         make_scripted("random"))
    assert len(ep.completion_ids) == len(ep.env_mask) and len(ep.turns) >= 3
    policy = [t for t, m in zip(ep.completion_ids, ep.env_mask) if m]
    expected = []
    for turn in ep.turns:
        expected += tok(turn.action, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert policy == expected
    env_text = tok.decode([t for t, m in zip(ep.completion_ids, ep.env_mask) if not m])
    assert "Current Board" in env_text and "Your action: " in env_text  # observations are environment tokens
    # the trajectory continues the prompt exactly: the text the policy saw at turn 2 is prompt + completion so far
    assert tok.decode(ep.prompt_ids, skip_special_tokens=True).startswith("You are Player 0 in Tic Tac Toe")


def test_invalid_and_format_penalties(tok):
    """First action off the board (invalid), second without brackets (invalid, unformatted): with
    error_allowance 2 the game goes on; each penalty is subtracted as configured."""
    def script(context: str, turn: int) -> str:
        return "[9]" if turn == 0 else "4" if turn == 1 else first_available(context, turn)

    config = EnvConfig(games=["TicTacToe-v0"], max_action_tokens=6, error_allowance=2, invalid_penalty=0.25,
                       format_penalty=0.5, seat=0)
    [ep] = play_episodes(ScriptedModel(tok, script), tok, [EpisodeJob("TicTacToe-v0", 1, 0, 0)], config,
                         make_scripted("random"))
    assert [t.invalid for t in ep.turns[:3]] == [True, True, False]
    assert [t.formatted for t in ep.turns[:3]] == [True, False, True]
    assert ep.invalid_moves == 2
    base = {"win": 1.0, "draw": 0.0, "loss": -1.0}[ep.outcome]
    assert ep.reward == pytest.approx(base - 2 * 0.25 - 0.5)
    # with the default allowance (1) the second invalid move ends the game against the policy
    [ep] = play_episodes(ScriptedModel(tok, script), tok, [EpisodeJob("TicTacToe-v0", 1, 0, 0)],
                         EnvConfig(games=["TicTacToe-v0"], max_action_tokens=6, invalid_penalty=0.25, seat=0),
                         make_scripted("random"))
    assert ep.outcome == "loss" and ep.invalid_moves == 2 and ep.reward == pytest.approx(-1.5)


def test_hasty_penalty_and_truncation(tok):
    config = EnvConfig(games=["TicTacToe-v0"], hasty_penalty=0.1, hasty_min_chars=5, max_turns=2)
    from rlkit.envs.episode import Episode, Turn, action_checks

    assert action_checks("centre is best: [4]", config) == (True, False)
    assert action_checks("[4]", config) == (True, True)
    assert action_checks("four", config) == (False, False)
    ep = Episode("TicTacToe-v0", 0, 0, 2, turns=[Turn("o", "[4]", hasty=True), Turn("o", "x [1]")], outcome="draw")
    assert shaped_reward(ep, config) == pytest.approx(-0.1)
    [ep] = play_episodes(ScriptedModel(tok, first_available), tok, [EpisodeJob("TicTacToe-v0", 0, 0, 0)], config,
                         make_scripted("random"))
    assert ep.truncated and len(ep.turns) == 2 and ep.outcome == "draw" and ep.reason == "truncated"


def test_chat_template_conversation_grows_by_appending():
    """With a chat template, prompt + action + environment text equals the template of the whole conversation."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    conv = Conversation(tok, system_prompt="Play well.")
    first = conv.prompt_text("board 1")
    between = conv.between_text("board 2", ended=True)
    whole = tok.apply_chat_template([{"role": "system", "content": "Play well."}, {"role": "user", "content": "board 1"},
                                     {"role": "assistant", "content": "[4]"}, {"role": "user", "content": "board 2"}],
                                    tokenize=False, add_generation_prompt=True)
    assert first + "[4]</s>" + between == whole  # the action's EOS is the policy's, not repeated by the environment
    assert first + "[4]" + conv.between_text("board 2", ended=False) == whole


def test_refused_games_give_one_clear_error():
    with pytest.raises(GameError, match=r"needs the network: its module downloads NLTK corpora") as e:
        check_games(["TicTacToe-v0", "Wordle-v0"])
    assert "\n" not in str(e.value)
    with pytest.raises(GameError, match="OpenRouter"):
        check_games(["Debate-v0"])
    with pytest.raises(GameError, match="not in TextArena"):
        check_games(["TicTacToo-v0"])
    with pytest.raises(GameError, match="without its wrapper suffix"):
        check_games(["TicTacToe-v0-raw"])
    check_games(["TicTacToe-v0", "Nim-v0", "KuhnPoker-v0", "GuessTheNumber-v0"])
    assert num_players("Nim-v0-medium") == 2 and num_players("FrozenLake-v0") == 1
    assert random_start("KuhnPoker-v0") and not random_start("TicTacToe-v0")


def test_recipe_refuses_a_network_game(tmp_path):
    from rlkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: grpo\nmodel: {name: tiny}\neval: {enabled: false}\n"
                    "env: {games: [Hangman-v0]}\ntrainer: {max_steps: 1}\n")
    with pytest.raises(RecipeError, match=r"env.games: game 'Hangman-v0' needs the network"):
        load_recipe(str(path))
    path.write_text("method: grpo\nmodel: {name: tiny}\neval: {enabled: false}\nenv: {games: [Nim-v0], opponent: "
                    "champion}\ntrainer: {max_steps: 1}\n")
    with pytest.raises(RecipeError, match="opponent must be random, rule, self or model:PATH"):
        load_recipe(str(path))


def test_game_rows_balance_and_weights():
    from rlkit.envs.rollout import game_rows

    rows = game_rows(EnvConfig(games=["TicTacToe-v0", "GuessTheNumber-v0"], episodes_per_game=6,
                               game_weights={"TicTacToe-v0": 2.0}), seed=0)
    assert sum(r["game"] == "TicTacToe-v0" for r in rows) == 12 and len(rows) == 18
    assert {r["seat"] for r in rows if r["game"] == "GuessTheNumber-v0"} == {0}
    assert {r["seat"] for r in rows if r["game"] == "TicTacToe-v0"} == {0, 1}
    assert rows == game_rows(EnvConfig(games=["TicTacToe-v0", "GuessTheNumber-v0"], episodes_per_game=6,
                                       game_weights={"TicTacToe-v0": 2.0}), seed=0)


def test_grpo_batch_masks_environment_tokens(tok, monkeypatch, tmp_path):
    """A hand-made trajectory through RLKitGRPOTrainer's rollout: the loss mask is 1 exactly on its action tokens
    and the group's advantages come from the episodes' rewards."""
    import rlkit.envs.episode as episode_mod
    from rlkit.envs.episode import Episode
    from rlkit.methods import get_method
    from rlkit.models import load_model
    from rlkit.methods.base import RunContext
    from rlkit.recipe import load_recipe, resolve_runs

    path = tmp_path / "r.yaml"
    path.write_text(f"method: grpo\nseed: 0\noutput_dir: {tmp_path / 'run'}\nplot: false\n"
                    "model: {name: tiny, tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 512}}\n"
                    "eval: {enabled: false}\nenv: {games: [TicTacToe-v0], episodes_per_game: 2}\n"
                    "trainer: {max_steps: 1, per_device_train_batch_size: 2, num_generations: 2, beta: 0.0}\n")
    run = resolve_runs(load_recipe(str(path)))[0]
    method = get_method("grpo")
    model, tokenizer = load_model(run.model, seed=0)
    ctx = RunContext(model=model, tokenizer=tokenizer)
    trainer = method.build_trainer(run, ctx, method.make_config(run))
    masks = [[1, 1, 0, 0, 0, 1, 1], [1, 0, 0, 1]]
    rewards = [1.0, -1.0]

    def fake_play(model, tokenizer, jobs, config, opponent=None, **kwargs):
        assert [j.game for j in jobs] == ["TicTacToe-v0"] * 2 and jobs[0].seed == jobs[1].seed
        return [Episode(j.game, j.seed, j.seat, 2, prompt_ids=[5, 6, 7], completion_ids=[20 + k for k in range(len(m))],
                        env_mask=m, reward=r) for j, m, r in zip(jobs, masks, rewards)]

    monkeypatch.setattr(episode_mod, "play_episodes", fake_play)
    inputs = [dict(x) for x in trainer.train_dataset.select([0, 0])]
    batch = trainer._generate_and_score_completions(inputs)
    loss_mask = (batch["completion_mask"] * batch["tool_mask"]).tolist()
    assert loss_mask == [m + [0] * (7 - len(m)) for m in masks]
    assert batch["advantages"].tolist()[0] > 0 > batch["advantages"].tolist()[1]
    assert trainer.rlkit_inputs is None


def test_evaluate_games_rates_and_log(tok, tmp_path):
    from rlkit.eval.games import evaluate_games

    config = EnvConfig(games=["TicTacToe-v0", "GuessTheNumber-v0"], max_action_tokens=6, opponent="rule")
    model = ScriptedModel(tok, lambda c, t: first_available(c, t) if "Tic Tac Toe" in c else f"[{t + 1}]")
    state = random.getstate()
    summary = evaluate_games(model, tok, config, episodes=6, seed=0, out=tmp_path / "episodes.jsonl", progress=False)
    assert random.getstate() == state  # TextArena draws from the global random: each episode keeps its own copy
    ttt = summary["games"]["TicTacToe-v0"]
    assert ttt["n"] == 6 and abs(ttt["win"] + ttt["draw"] + ttt["loss"] - 1) < 1e-9
    assert ttt["loss"] > 0.5  # first-free-cell play against the rule player mostly loses
    assert ttt["win_se"] == pytest.approx((ttt["win"] * (1 - ttt["win"]) / 6) ** 0.5)
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 12 and '"turns"' in lines[0]
    assert summary["opponent"].startswith("rule")


def test_a_game_without_a_scripted_player_is_refused_up_front():
    from rlkit.envs.episode import check_scripted_opponent

    check_scripted_opponent(EnvConfig(games=["TicTacToe-v0", "KuhnPoker-v0", "GuessTheNumber-v0"]))
    with pytest.raises(ValueError, match="LiarsDice-v0 has no scripted player .*use opponent model:PATH or self"):
        check_scripted_opponent(EnvConfig(games=["LiarsDice-v0"], opponent="rule"))
    check_scripted_opponent(EnvConfig(games=["LiarsDice-v0"], opponent="self"))  # a model needs no move list
