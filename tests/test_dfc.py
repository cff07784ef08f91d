"""Parameter fusion (``rlkit.methods.fuse``) and the Divide-Fuse-Conquer schedule (``rlkit.methods.dfc``): fusion
equals the element-wise average with dtypes kept, bad inputs fail clearly, and the DFC stage runs its sub-runs in
the documented order, fuses the right models, and resumes mid-group (GRPO sub-runs and the game evaluation are
replaced by fakes here; the end-to-end run is the lead's test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlkit.config import ConfigError, build
from rlkit.methods.base import DONE_MARKER
from rlkit.methods.dfc import DFCConfig, run_dfc
from rlkit.methods.fuse import fuse_models, fuse_state_dicts
from rlkit.recipe import TinyModelSpec, load_recipe, recipe_from_dict, resolve_runs

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64}


def _tiny(seed: int = 0):
    from rlkit.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    return build_tiny_model(TinyModelSpec(**TINY), tok, seed=seed), tok


def _save(model, tok, path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / DONE_MARKER).write_text("done\n")
    return str(path)


# --------------------------------------------------------------------------------------------------
# fusion


def test_fuse_state_dicts_is_the_average_and_keeps_dtypes():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
         "steps": torch.tensor([7, 8])}
    b = {"w": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
         "steps": torch.tensor([7, 8])}
    out = fuse_state_dicts([a, b], [0.5, 0.5])
    assert list(out) == ["w", "b", "steps"]
    assert out["w"].dtype == torch.bfloat16 and out["b"].dtype == torch.float32 and out["steps"].dtype == torch.int64
    assert torch.equal(out["w"], ((a["w"].float() + b["w"].float()) / 2).to(torch.bfloat16))
    assert torch.allclose(out["b"], (a["b"] + b["b"]) / 2)
    assert torch.equal(out["steps"], a["steps"])
    # weighted, three models
    out = fuse_state_dicts([a, b, a], [0.25, 0.25, 0.5])
    assert torch.allclose(out["b"], 0.75 * a["b"] + 0.25 * b["b"], atol=1e-6)


def test_fuse_state_dicts_refuses_bad_inputs():
    a = {"x": torch.zeros(2), "y": torch.ones(3)}
    with pytest.raises(ValueError, match="sum to 1"):
        fuse_state_dicts([a, a], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per model"):
        fuse_state_dicts([a, a], [1.0])
    with pytest.raises(ValueError, match="has no 'y'"):
        fuse_state_dicts([a, {"x": torch.zeros(2), "z": torch.ones(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="has 'z', which state dict 0 lacks"):
        fuse_state_dicts([a, {**a, "z": torch.ones(1)}], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"'y' has shape \(4,\)"):
        fuse_state_dicts([a, {"x": torch.zeros(2), "y": torch.ones(4)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-float tensor 'n'"):
        fuse_state_dicts([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}], [0.5, 0.5])


def test_fuse_models_writes_the_average_model(tmp_path):
    from transformers import AutoModelForCausalLM

    m1, tok = _tiny(1)
    m2, _ = _tiny(2)
    p1, p2 = _save(m1, tok, tmp_path / "a"), _save(m2, tok, tmp_path / "b")
    out = fuse_models([p1, p2], [0.5, 0.5], tmp_path / "fused")
    assert (Path(out) / DONE_MARKER).is_file() and (Path(out) / "model.safetensors").is_file()
    assert (Path(out) / "tokenizer.json").is_file()
    fused = AutoModelForCausalLM.from_pretrained(out).state_dict()
    s1, s2 = m1.state_dict(), m2.state_dict()
    for key, value in fused.items():
        assert torch.allclose(value, (s1[key] + s2[key]) / 2, atol=1e-6), key


def test_fuse_models_merges_a_lora_adapter_first(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, tok = _tiny(1)
    base_path = _save(base, tok, tmp_path / "base")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    merged = peft.merge_and_unload().state_dict()
    out = fuse_models([base_path, str(adapter)], [0.5, 0.5], tmp_path / "fused")
    fused = AutoModelForCausalLM.from_pretrained(out).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[key], base.state_dict()[key])
    assert torch.allclose(fused[key], (merged[key] + base.state_dict()[key]) / 2, atol=1e-6)


def test_fuse_stage_list_references_and_bad_models():
    """``models: [{from: a}, {from: b}]`` is filled with the earlier stages' model paths; a self-reference, one model
    or weights that do not sum to 1 are refused."""
    import dataclasses

    from rlkit.recipe import fill_model_references, model_references, resolve_runs

    raw = {"stages": [{"name": "a", "method": "fuse", "args": {"models": ["x", {"from": "a"}]}}]}
    with pytest.raises(ConfigError, match="not an earlier stage"):
        recipe_from_dict(raw)
    run = resolve_runs(recipe_from_dict({"method": "fuse", "args": {"models": ["x", "y"]}}, validate=False))[0]
    run = dataclasses.replace(run, args={"models": [{"from": "a"}, "y", {"from": "b"}], "weights": [0.2, 0.3, 0.5]})
    assert model_references(run) == [("args", "models[0]", "a"), ("args", "models[2]", "b")]
    filled = fill_model_references(run, lambda stage: f"/runs/{stage}/final")
    assert filled.args["models"] == ["/runs/a/final", "y", "/runs/b/final"]
    assert run.args["models"][0] == {"from": "a"}  # the run itself is unchanged
    with pytest.raises(ConfigError, match="at least two models"):
        recipe_from_dict({"method": "fuse", "args": {"models": ["x"]}})
    with pytest.raises(ConfigError, match="sum to 1"):
        recipe_from_dict({"method": "fuse", "args": {"models": ["x", "y"], "weights": [0.7, 0.7]}})


# --------------------------------------------------------------------------------------------------
# DFC config and recipes


@pytest.mark.parametrize("args, message", [
    ({"groups": [["TicTacToe-v0"], ["TicTacToe-v0"]], "divide_steps": 1, "conquer_steps": 1}, "group 1 and group 2"),
    ({"groups": [["TicTacToe-v0"], []], "divide_steps": 1, "conquer_steps": 1}, "non-empty"),
    ({"groups": [["Nim-v0"]], "fuse_weight": 1.0, "divide_steps": 1, "conquer_steps": 1}, "fuse_weight"),
    ({"groups": [["Nim-v0"]]}, "divide_steps"),
    ({"groups": [["Nim-v0"]], "divide_steps": 2}, "conquer_steps"),
    ({"groups": "auto", "eval_episodes": 0, "divide_steps": 1, "conquer_steps": 1}, "eval_episodes"),
    ({"groups": [["Nim-v0"]], "auto_by": ["wins", "colour"], "divide_steps": 1, "conquer_steps": 1}, "auto_by"),
    ({"groups": [["Nim-v0"]], "grpo": {"max_steps": 2, "seed": 3}}, "grpo.seed"),
    ({"groups": [["Nim-v0"]], "divide_steps": 1, "conquer_steps": 1, "eval_opponent": "human"}, "opponent"),
    ({"groups": "some", "divide_steps": 1, "conquer_steps": 1}, "groups"),
])
def test_dfc_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        build(DFCConfig, args, "args")


def test_dfc_config_steps():
    cfg = build(DFCConfig, {"groups": [["Nim-v0"], ["KuhnPoker-v0"], ["Sudoku-v0"]], "grpo": {"max_steps": 5},
                            "conquer_steps": 3})
    assert cfg.steps == (5, 3) and cfg.total_steps(3) == 3 * 5 + 2 * 3
    assert build(DFCConfig, {"groups": [["Nim-v0"]], "divide_steps": 2, "mode": "specialists"}).steps[0] == 2


@pytest.mark.parametrize("name", ["tiny.yaml", "smollm2_games_cpu.yaml", "qwen2.5_gpu.yaml"])
def test_dfc_recipes_validate(name):
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "dfc" / name)
    assert recipe.method == "dfc"


def test_dfc_recipe_groups_must_match_env_games():
    raw = {"method": "dfc", "env": {"games": ["TicTacToe-v0", "Nim-v0"]},
           "args": {"groups": [["TicTacToe-v0"]], "divide_steps": 1, "conquer_steps": 1}}
    with pytest.raises(ConfigError, match="'Nim-v0' is in env.games but in no group"):
        recipe_from_dict(raw)
    raw = {"method": "dfc", "args": {"groups": "auto", "divide_steps": 1, "conquer_steps": 1}}
    with pytest.raises(ConfigError, match="env.games"):
        recipe_from_dict(raw)


# --------------------------------------------------------------------------------------------------
# the schedule, with fake GRPO sub-runs and a fake game evaluation

GROUPS = [["TicTacToe-v0", "Nim-v0"], ["KuhnPoker-v0"], ["GuessTheNumber-v0", "TowerOfHanoi-v0"]]
ALL = [g for group in GROUPS for g in group]


def _run(tmp_path, **args):
    raw = {"method": "dfc", "seed": 0, "output_dir": str(tmp_path / "dfc"), "model": {"name": "tiny", "tiny": TINY},
           "env": {"games": list(args.pop("games", ALL))},
           "args": {"groups": GROUPS, "divide_steps": 3, "conquer_steps": 2, "eval_episodes": 2, **args}}
    run = resolve_runs(recipe_from_dict(raw, validate=False))[0]
    return run, build(DFCConfig, raw["args"], "args")


class FakeGRPO:
    """Stands in for ``rlkit.pipeline.run_one``: records each sub-run and saves a tiny model whose float parameters
    all equal the call's number (1, 2, ...), with a manifest."""

    def __init__(self, fail_at: str | None = None):
        self.calls: list[dict] = []
        self.fail_at = fail_at
        self.value = 0.0

    def __call__(self, sub, resume=None, fingerprint=None):
        path = str(Path(sub.output_dir).relative_to(Path(sub.output_dir).parents[1]))
        if path == "dfc/joint" or sub.output_dir.endswith("/joint"):
            path = "joint"
        if path == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.value += 1
        self.calls.append({"path": path, "start": sub.model.name, "games": list(sub.env.games),
                           "weights": dict(sub.env.game_weights), "steps": sub.trainer["max_steps"],
                           "method": sub.method, "resume": resume, "value": self.value})
        model, tok = _tiny(0)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(self.value)
        final = _save(model, tok, Path(sub.output_dir) / "final")
        manifest = {"model": final, "datasets": {}}
        (Path(sub.output_dir) / "manifest.json").write_text(json.dumps(manifest))
        return {"manifest": manifest}


@pytest.fixture
def fakes(monkeypatch):
    import rlkit.eval.games as eval_games
    import rlkit.pipeline as pipeline

    grpo = FakeGRPO()
    evals: list[tuple[str, list[str]]] = []
    wins = {"TicTacToe-v0": 0.5, "Nim-v0": 0.0, "KuhnPoker-v0": 0.25, "GuessTheNumber-v0": 0.0,
            "TowerOfHanoi-v0": 0.0}

    def fake_evaluate(model, tokenizer, env, episodes, seed=0, temperature=0.0, out=None, progress=True, **kw):
        evals.append((str(Path(out).parent.name), list(env.games)))
        assert env.seed_offset == 100_000 and episodes == 2
        return {"games": {g: {"n": episodes, "win": wins[g], "draw": 0.0, "loss": 1 - wins[g]} for g in env.games},
                "mean_win": sum(wins[g] for g in env.games) / len(env.games)}

    monkeypatch.setattr(pipeline, "run_one", grpo)
    monkeypatch.setattr(eval_games, "evaluate_games", fake_evaluate)
    return grpo, evals


def _first_param(path: str) -> float:
    from safetensors.torch import load_file

    sd = load_file(str(Path(path) / "model.safetensors"))
    return float(sd["model.layers.0.self_attn.q_proj.weight"].flatten()[0])


def test_dfc_schedule(tmp_path, fakes):
    grpo, evals = fakes
    run, cfg = _run(tmp_path, conquer_sampling="priority", priority_weight=3.0)
    out = run_dfc(run, cfg)
    root = Path(run.output_dir)
    paths = [c["path"] for c in grpo.calls]
    assert paths == ["divide/group_1", "divide/group_2", "divide/group_3", "conquer/group_2", "conquer/group_3"]
    assert all(c["method"] == "grpo" and c["resume"] is True for c in grpo.calls)
    d1, d2, d3, c2, c3 = grpo.calls
    assert [d["start"] for d in (d1, d2, d3)] == ["tiny"] * 3
    assert [d["games"] for d in (d1, d2, d3)] == GROUPS and [d["steps"] for d in (d1, d2, d3)] == [3, 3, 3]
    assert c2["start"] == str(root / "fuse/group_2") and c2["games"] == GROUPS[0] + GROUPS[1]
    assert c2["weights"] == {"KuhnPoker-v0": 3.0} and c2["steps"] == 2
    assert c3["start"] == str(root / "fuse/group_3") and c3["games"] == ALL
    assert c3["weights"] == {"GuessTheNumber-v0": 3.0, "TowerOfHanoi-v0": 3.0}
    # fuse_2 = 1/2 (pi_1 + pi_2) = 1/2 (1 + 2); fuse_3 = 1/2 (theta_2 + pi_3) = 1/2 (4 + 3)
    assert _first_param(str(root / "fuse/group_2")) == pytest.approx(1.5)
    assert _first_param(str(root / "fuse/group_3")) == pytest.approx(3.5)
    assert out.model == str(root / "conquer/group_3/final")
    state = json.loads((root / "state.json").read_text())
    assert state["groups"] == GROUPS and state["final"]["phase"] == "conquer/group_3"
    assert state["phases"]["fuse/group_3"]["inputs"] == [str(root / "conquer/group_2/final"),
                                                        str(root / "divide/group_3/final")]
    assert [e[0] for e in evals] == ["base", "group_1", "group_2", "group_3", "group_2", "group_3"]
    summary = json.loads((root / "dfc_summary.json").read_text())
    assert summary["win_base"]["TicTacToe-v0"] == 0.5 and set(summary["win"]) == set(ALL)
    assert set(summary["win_specialists"]) == set(ALL) and summary["steps"]["total"] == 3 * 3 + 2 * 2


def test_dfc_resumes_mid_group(tmp_path, fakes):
    grpo, _ = fakes
    run, cfg = _run(tmp_path)
    grpo.fail_at = "conquer/group_3"  # killed in the last conquer run
    with pytest.raises(KeyboardInterrupt):
        run_dfc(run, cfg)
    assert [c["path"] for c in grpo.calls][-1] == "conquer/group_2"
    root = Path(run.output_dir)
    fused_at = (root / "fuse/group_3" / DONE_MARKER).stat().st_mtime_ns
    grpo.fail_at, grpo.calls = None, []
    run_dfc(run, cfg)  # restart: finished groups are skipped
    assert [c["path"] for c in grpo.calls] == ["conquer/group_3"]
    assert (root / "fuse/group_3" / DONE_MARKER).stat().st_mtime_ns == fused_at
    # a finished middle run whose folder is gone runs again, and so does what was built on it
    shutil.rmtree(root / "conquer/group_2")
    grpo.calls = []
    run_dfc(run, cfg)
    assert [c["path"] for c in grpo.calls] == ["conquer/group_2", "conquer/group_3"]
    assert _first_param(str(root / "fuse/group_3")) == pytest.approx((grpo.calls[0]["value"] + 3) / 2)
    grpo.calls = []
    run_dfc(run, cfg)  # everything finished: nothing runs
    assert grpo.calls == []


def test_dfc_joint_and_specialists_modes(tmp_path, fakes):
    grpo, _ = fakes
    run, cfg = _run(tmp_path, mode="joint")
    out = run_dfc(run, cfg)
    assert [(c["path"], c["start"], c["games"], c["steps"]) for c in grpo.calls] == [("joint", "tiny", ALL, 3 * 3 + 2 * 2)]
    assert out.model.endswith("joint/final")
    grpo.calls = []
    run, cfg = _run(tmp_path / "s", mode="specialists")
    out = run_dfc(run, cfg)
    assert [c["path"] for c in grpo.calls] == ["divide/group_1", "divide/group_2", "divide/group_3"]
    assert out.model is None and set(out.summary["dfc"]["win"]) == set(ALL)
    with pytest.raises(ConfigError, match="mode specialists run"):
        run_dfc(run, build(DFCConfig, {**{"groups": GROUPS, "divide_steps": 3, "conquer_steps": 2,
                                          "eval_episodes": 2}}))


def test_dfc_fused_specialist_start(tmp_path, fakes):
    grpo, _ = fakes
    run, cfg = _run(tmp_path, specialist_start="fused")
    run_dfc(run, cfg)
    root = Path(run.output_dir)
    assert [(c["path"], c["start"]) for c in grpo.calls] == [
        ("divide/group_1", "tiny"), ("divide/group_2", str(root / "divide/group_1/final")),
        ("conquer/group_2", str(root / "fuse/group_2")), ("divide/group_3", str(root / "conquer/group_2/final")),
        ("conquer/group_3", str(root / "fuse/group_3"))]


def test_dfc_auto_groups_easy_first(tmp_path, fakes):
    grpo, evals = fakes
    run, cfg = _run(tmp_path, groups="auto", order="easy_first")
    run_dfc(run, cfg)
    state = json.loads((Path(run.output_dir) / "state.json").read_text())
    # base wins: TicTacToe 0.5, KuhnPoker 0.25, the rest 0; players and random/fixed start from rlkit.envs.games
    assert state["groups"] == [["TicTacToe-v0"], ["KuhnPoker-v0"], ["Nim-v0"], ["GuessTheNumber-v0"],
                               ["TowerOfHanoi-v0"]]
    assert state["labels"][:3] == ["wins+multi_player+fixed_start", "wins+multi_player+random_start",
                                   "no_wins+multi_player+fixed_start"]
    assert evals[0] == ("base", ALL)
    run2, cfg2 = _run(tmp_path, groups="auto", auto_by=["players"])
    with pytest.raises(ConfigError, match="holds a run with groups"):
        run_dfc(run2, cfg2)


def test_eval_opponent_needs_a_scripted_player_for_every_game():
    raw = {"method": "dfc", "model": {"name": "tiny"}, "env": {"games": ["TicTacToe-v0", "LiarsDice-v0"],
                                                               "opponent": "self"},
           "args": {"groups": [["TicTacToe-v0"], ["LiarsDice-v0"]], "divide_steps": 1, "conquer_steps": 1,
                    "eval_opponent": "rule"}}
    with pytest.raises(ConfigError, match=r"eval_opponent: .*LiarsDice-v0 has no scripted player"):
        recipe_from_dict(raw)
    raw["args"]["eval_opponent"] = None  # the training opponent (self) evaluates: no move list needed
    recipe_from_dict(raw)
