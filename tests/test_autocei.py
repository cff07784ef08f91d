"""Auto-CEI's stages: the round data (Boltzmann resampling, R-Tuning, plain EI), the IDK figures of evaluation, and
the ``autocei`` orchestrator end to end on the tiny model (restart skips what finished, resumes mid-way)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import TINY_SHAPE
from rlkit.config import RecipeError
from rlkit.eval.idk import EVAL_IDK_PHRASES, REWARD_IDK_PHRASES, idk_summary, parse_idk_phrases
from rlkit.methods.autocei.core import RTUNING_ENDING, autocei_reward
from rlkit.methods.autocei.data import AutoCEIDataConfig, build_rows

C1, C2 = 3.0, 1.0


def _row(p: int, s: int, completion: str, status: str) -> dict:
    return {"prompt_index": p, "sample_index": s, "question": f"q{p}", "answer": "5", "solution": "ref",
            "prompt": f"Question: q{p}\nAnswer: ", "completion": completion, "status": status}


SAMPLES = [
    _row(0, 0, "2+3=5\n#### 5", "ok"),
    _row(0, 1, "2+3=6\n#### 6", "wrong"),  # R = -1: never kept
    _row(0, 2, "2+3=5\nSorry, I don't know.\n#### No answer.", "wrong"),  # IDK at depth 3 = c1: R = 0
    _row(0, 3, "Sorry, too difficult.", "wrong"),  # early IDK (depth 1): R < 0 but > -1, kept
    _row(1, 0, "1+4=6\n#### 6", "unparseable"),
    _row(1, 1, "a\nb\nc\nd\ne\nI don't know", "wrong"),  # long IDK: R > 0
]


def test_resample_keeps_every_original_once_and_never_a_wrong_answer():
    cfg = AutoCEIDataConfig(mode="resample", c1=C1, c2=C2, tau=0.5)
    out = build_rows(SAMPLES, cfg, seed=0)
    originals = [(r["prompt_index"], r["sample_index"]) for r in out if r["kind"] == "original"]
    assert originals == [(0, 0), (0, 2), (0, 3), (1, 1)]  # each surviving original once, in order
    assert all(r["R"] > -1 for r in out) and not any(r["completion"].endswith("#### 6") for r in out)
    draws = [r for r in out if r["kind"] == "draw"]
    assert len(draws) <= 4 + 2 and all((r["prompt_index"], r["sample_index"]) in originals for r in draws)
    first = next(r for r in out if r["sample_index"] == 0 and r["prompt_index"] == 0)
    assert first["solution"] == first["completion"] and first["reference_solution"] == "ref" and first["R"] == 1.0
    idk = {r["sample_index"]: r for r in out if r["prompt_index"] == 0 and r["idk"]}
    assert idk[2]["depth"] == 3 and idk[2]["R"] == pytest.approx(0.0) and -1 < idk[3]["R"] < 0
    assert build_rows(SAMPLES, cfg, seed=0) == out  # seeded per prompt: a rerun writes the same rows
    # the draws follow p ∝ exp(R / tau): with a low tau nearly every draw of prompt 0 is the correct answer
    many = [_row(0, s, "2+3=5\n#### 5" if s == 0 else "Sorry.", "ok" if s == 0 else "wrong") for s in range(8)]
    cold = build_rows(many, AutoCEIDataConfig(mode="resample", c1=C1, c2=C2, tau=0.05), seed=1)
    assert sum(r["kind"] == "draw" and r["sample_index"] == 0 for r in cold) == 8


def test_rtuning_and_correct_modes():
    out = build_rows(SAMPLES, AutoCEIDataConfig(mode="rtuning"), seed=0)
    by = {(r["prompt_index"], r["sample_index"]): r for r in out}
    assert len(out) == len(SAMPLES)
    assert by[(0, 0)]["solution"] == "2+3=5\n#### 5" and by[(0, 0)]["kind"] == "original"
    assert by[(0, 1)]["solution"] == "2+3=6" + RTUNING_ENDING and by[(0, 1)]["kind"] == "rtuned"
    assert by[(0, 2)]["solution"] == SAMPLES[2]["completion"]  # already says sorry: kept as it is
    assert by[(1, 0)]["solution"] == "1+4=6" + RTUNING_ENDING  # unparseable counts as wrong
    assert by[(1, 1)]["solution"] == "a\nb\nc\nd\ne\nI don't know" + RTUNING_ENDING  # only "sorry" is checked
    short = build_rows(SAMPLES[:2], AutoCEIDataConfig(mode="rtuning", ending="\nNo idea."), seed=0)
    assert short[1]["solution"] == "2+3=6\nNo idea."
    ei = build_rows(SAMPLES, AutoCEIDataConfig(mode="correct"), seed=0)
    assert [(r["prompt_index"], r["sample_index"]) for r in ei] == [(0, 0)]


def test_reward_idk_first_is_the_released_order():
    assert autocei_reward(True, True, 5, C1, C2, idk_first=True) == pytest.approx(math.tanh(C2 * 2 / 2))
    assert autocei_reward(True, True, 5, C1, C2) == 1.0


def test_idk_figures_on_hand_made_outputs():
    records = [{"completion": "1+1=2\n#### 2", "extracted": "2", "correct": True},
               {"completion": "1+1=3\n#### 3", "extracted": "3", "correct": False},
               {"completion": "Sorry, I am not sure.\n#### 2", "extracted": "2", "correct": True},  # IDK: not correct
               {"completion": "1+1=\n#### No answer.", "extracted": "No answer.", "correct": False}]  # "no answer"
    s = idk_summary(records, EVAL_IDK_PHRASES, lam=0.2)
    assert [r["idk"] for r in records] == [False, False, True, True]
    assert s["precision"] == 0.5 and s["idk_rate"] == 0.5 and s["accuracy"] == 0.25
    assert s["f"] == pytest.approx(0.8 * 0.5 + 0.2 * 0.5)
    assert parse_idk_phrases("eval") == EVAL_IDK_PHRASES and parse_idk_phrases("reward") == REWARD_IDK_PHRASES
    assert parse_idk_phrases("no idea; pass ") == ("no idea", "pass")
    with pytest.raises(ValueError, match="IDK phrases"):
        parse_idk_phrases(" ; ")


# --------------------------------------------------------------------------------------------------
# The orchestrator

SYNTH = {"num_train": 32, "num_test": 8, "min_ops": 1, "max_ops": 3, "max_operand": 9}
TRAINER = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96, "learning_rate": 1e-3,
           "save_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0, "report_to": "none"}


def _recipe(out: Path, **args) -> dict:
    return {"method": "autocei", "seed": 0, "output_dir": str(out), "plot": False,
            "model": {"name": "tiny", "tiny": dict(TINY_SHAPE)},
            "data": {"train": {"name": "synthetic", "template": "plain", "limit": 4, "synthetic": SYNTH},
                     "eval": {"name": "synthetic", "split": "test", "template": "plain", "limit": 4,
                              "synthetic": SYNTH}},
            "rewards": [{"name": "math_accuracy"}],
            # a random model answers nothing right: any letter or digit makes its answer "IDK" for the reward, so
            # every round has answers above R = -1 to keep
            "args": {"reward_idk_phrases": list("abcdefghijklmnopqrstuvwxyz0123456789"), "n_samples": 2, "max_new_tokens": 8, "max_rounds": 2, "max_curricula": 2, "tau": 0.5,
                     "c1": 1.0, "c2": 1.0, "step": 0.5, "eval_batch_size": 8, "tol": 1e-9,
                     "sample": {"batch_size": 8, "chunk_size": 8}, "sft": dict(TRAINER), **args}}


@pytest.fixture(scope="module")
def autocei_run(tmp_path_factory):
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    out = tmp_path_factory.mktemp("autocei") / "run"
    (summary,) = run_recipe(recipe_from_dict(_recipe(out)))
    return out, summary


def test_autocei_runs_end_to_end(autocei_run):
    out, summary = autocei_run
    state = json.loads((out / "state.json").read_text())
    assert state["initial"]["n"] == 4 and len(state["rtuning"]) == 1
    curricula = state["curricula"]
    assert [c["c1"] for c in curricula][0] == 1.0 and len(curricula) == 2
    assert abs(curricula[1]["c1"] - 1.0) == pytest.approx(0.5)  # one step up or down from the first
    for c in curricula:
        assert 1 <= len(c["rounds"]) <= 2 and c["best_f"] == max(r["f"] for r in c["rounds"])
    best = state["best"]
    assert best["f"] == max(c["best_f"] for c in curricula)
    assert summary["final_model"] == best["model"] and (Path(best["model"]) / "model.safetensors").is_file()
    data = [json.loads(x) for x in (out / "c1_1" / "round_1" / "data" / "sft_data.jsonl").read_text().splitlines()]
    assert data and all(r["R"] > -1 for r in data)
    rt = [json.loads(x) for x in (out / "rtuning" / "round_1" / "data" / "sft_data.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "rtuned" and r["solution"].endswith(RTUNING_ENDING) for r in rt)
    report = json.loads((out / "autocei_summary.json").read_text())
    assert [c["c1"] for c in report["curricula"]] == [c["c1"] for c in curricula]
    assert {"precision", "idk_rate", "accuracy", "f"} <= set(report["evaluations"][0])


def test_autocei_restart_skips_and_resumes_midway(autocei_run, capsys):
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    out, _ = autocei_run
    recipe = recipe_from_dict(_recipe(out))
    run_recipe(recipe)  # finished: the whole stage is skipped
    assert "already finished" in capsys.readouterr().out
    # a run killed during the last curriculum's last SFT: that SFT (and its evaluation) runs again, nothing else
    state = json.loads((out / "state.json").read_text())
    last = Path(state["curricula"][-1]["rounds"][-1]["model"]).parent
    (out / "manifest.json").unlink()
    (last / "manifest.json").unlink()
    shutil.rmtree(last / "final")  # its eval.json stays: older than the new model, so it is measured again
    (summary,) = run_recipe(recipe)
    log = capsys.readouterr().out
    assert summary["sub_runs_ran"] == 1 and summary["sub_runs_skipped"] > 5, log[-2000:]
    assert f"running sft in {last}" in log and f"{last.parent.relative_to(out)}: precision" in log
    assert len(json.loads((out / "state.json").read_text())["curricula"]) == len(state["curricula"])


def test_rlkit_eval_reports_idk_figures(autocei_run, tmp_path):
    from rlkit.eval.run import run_eval

    out, _ = autocei_run
    model = json.loads((out / "state.json").read_text())["best"]["model"]
    s = run_eval(model=model, benchmark="synthetic", limit=4, max_new_tokens=8, template="plain",
                 output_dir=str(tmp_path), idk_phrases="sorry;no idea", synthetic=SYNTH)
    assert {"precision", "idk_rate", "accuracy", "f"} <= set(s) and s["idk_phrases"] == ["sorry", "no idea"]
    records = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert s["accuracy"] == sum(r["correct"] and not r["idk"] for r in records) / 4


@pytest.mark.parametrize("args,message", [
    ({"n_samples": 0}, "n_samples must be at least 1"),
    ({"lambda": 1.5}, "lambda must be in"),
    ({"sample": {"num_samples": 3}}, "sample.num_samples: set the stage's own"),
    ({"sample": {"bakcend": "hf"}}, "did you mean 'backend'"),
    ({"sft": {"learning_rat": 1e-3}}, "did you mean 'learning_rate'"),
    ({"mode": "ei", "tau": 0.5}, "mode ei has none"),
    ({"sft_from": "last", "base_model": "x"}, "only used with sft_from: base"),
    ({"depth_splitter": "comma"}, "depth_splitter must be one of"),
])
def test_recipe_time_errors_are_one_line(tmp_path, args, message):
    from rlkit.recipe import recipe_from_dict

    raw = _recipe(tmp_path / "r", **args)
    if args.get("mode") == "ei":
        for k in ("c1", "c2", "step"):
            raw["args"].pop(k)
    with pytest.raises(RecipeError, match=message) as e:
        recipe_from_dict(raw)
    assert "\n" not in str(e.value)


def test_recipe_needs_eval_data(tmp_path):
    from rlkit.recipe import recipe_from_dict

    raw = _recipe(tmp_path / "r")
    del raw["data"]["eval"]
    with pytest.raises(RecipeError, match="data.eval: autocei measures precision"):
        recipe_from_dict(raw)
