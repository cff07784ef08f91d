"""The benchmark scripts run and end with a parseable ``RESULT key=value ...`` line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import result_fields, subprocess_env


def _bench_helpers(repo_root):
    sys.path.insert(0, str(repo_root / "bench"))
    try:
        import _runs
    finally:
        sys.path.remove(str(repo_root / "bench"))
    return _runs


def test_result_line_format(repo_root):
    """``RESULT`` values: floats to ``digits`` decimals (per-key ``precision``), integers and strings as they are."""
    runs = _bench_helpers(repo_root)
    line = runs.result_line({"ratio": 1.23456, "loss": 0.5, "ratio_inf": float("inf"), "seeds": 3, "match": "active"},
                            precision={"ratio": 3})
    assert line == "RESULT ratio=1.235 loss=0.5000 ratio_inf=inf seeds=3 match=active"
    assert runs.result_line({"x": 0.12345, "steps": 4}, digits=None) == "RESULT x=0.12345 steps=4"
    assert dict(re.findall(r"(\w+)=(\S+)", line))["seeds"] == "3"
    for bad in ({"a b": 1.0}, {"k": "two words"}, {"k": ""}):
        with pytest.raises(ValueError):
            runs.result_line(bad)


def test_bench_parser_presets(repo_root):
    runs = _bench_helpers(repo_root)
    p = runs.bench_parser("Title.\n\nMore.", quick="q", smoke="s", seeds=True)
    runs.add_jobs_threads(p, jobs=3)
    runs.add_out(p, "folder")
    assert p.description == "Title."
    a = p.parse_args([])
    assert (runs.preset_of(a), a.seeds, a.jobs, a.threads, a.out) == ("full", None, 3, 1, None)
    assert runs.preset_of(p.parse_args(["--quick", "--seeds", "1", "2"])) == "quick"
    assert runs.preset_of(p.parse_args(["--smoke"])) == "smoke"
    with pytest.raises(SystemExit):
        p.parse_args(["--quick", "--smoke"])


def test_grpo_overhead_smoke(repo_root):
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "grpo_overhead.py"), "--smoke"],
                          cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result_fields(proc.stdout)
    for key in ("ratio", "rlkit_step_s", "trl_step_s"):
        assert key in res, res
        assert float(res[key]) > 0
    # one line per figure before the RESULT line
    assert "rlkit grpo step time" in proc.stdout and "trl GRPOTrainer step time" in proc.stdout


def test_grpo_overhead_cli(repo_root):
    script = str(repo_root / "bench" / "grpo_overhead.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0
    assert "--quick" in help_.stdout and "--smoke" in help_.stdout
    bad = subprocess.run([sys.executable, script, "--smoke", "--steps", "1", "--warmup", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "--steps must exceed --warmup" in bad.stderr


def test_rewards_smoke(repo_root, data_dir, tmp_path):
    """bench/rewards.py --smoke: the RESULT line carries parseable speedup / agreement / worst_batch_s (targets
    are not checked here), the per-figure lines come first, and --out writes the JSON report."""
    env = subprocess_env(RLKIT_DATA_DIR=str(data_dir))
    out = tmp_path / "rewards.json"
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "rewards.py"), "--smoke", "--out", str(out)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = result_fields(proc.stdout)
    for key in ("speedup", "agreement", "worst_batch_s"):
        assert key in res, res
        value = float(res[key])
        assert value == value and value >= 0  # a number, not NaN
    assert 0.0 <= float(res["agreement"]) <= 1.0
    assert int(res["n"]) == 64
    for figure in ("rlkit total wall", "trl total wall", "speedup trl/rlkit", "worst batch", "agreement on"):
        assert figure in proc.stdout, figure
    report = json.loads(out.read_text())
    assert abs(report["figures"]["agreement"] - float(res["agreement"])) < 1e-4
    assert isinstance(report["disagreements"], list) and report["adversarial"]
    assert report["figures"]["markers"] == []  # no code payload ran


def _run_bench(repo_root, script: str, *args: str, timeout: int = 600) -> tuple[str, dict[str, str]]:
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / script), *args], cwd=repo_root,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout, result_fields(proc.stdout)


def test_stephint_vs_grpo_smoke(repo_root, tmp_path):
    out, res = _run_bench(repo_root, "stephint_vs_grpo.py", "--smoke", "--jobs", "1", "--out", str(tmp_path))
    for key in ("steps_ratio", "acc_stephint", "acc_grpo", "acc_replay"):
        assert key in res and (res[key] == "inf" or float(res[key]) >= 0), res
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["finals"]) == {"grpo", "stephint", "replay"}
    assert (tmp_path / "stephint_vs_grpo.png").stat().st_size > 0
    hints = [json.loads(ln) for ln in (tmp_path / "seed0" / "stephint" / "rl" / "hints.jsonl").read_text().splitlines()]
    assert hints and all("".join(h["steps"]) == h["reference"] for h in hints)


def test_noisy_rewards_smoke(repo_root, tmp_path):
    out, res = _run_bench(repo_root, "noisy_rewards.py", "--smoke", "--conditions", "p0.4", "rpr",
                          "--out", str(tmp_path), "--json", str(tmp_path / "r.json"))
    for key in ("acc_sft", "acc_p04", "acc_rpr"):
        assert key in res and 0 <= float(res[key]) <= 1, res
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert set(runs) == {"p0.4/seed0", "rpr/seed0"}
    history = json.loads((tmp_path / "seed0" / "p0.4" / "grpo" / "log_history.json").read_text())
    assert any("rewards/noisy_reward/mean" in h for h in history), history[:3]


def test_aoe_vs_moe_smoke(repo_root, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_DATA_DIR", str(data_dir))
    out, res = _run_bench(repo_root, "aoe_vs_moe.py", "--smoke", "--jobs", "1", "--out", str(tmp_path))
    for key in ("throughput_ratio", "loss_aoe", "loss_moe", "loss_dense"):
        assert key in res and float(res[key]) > 0, res
    results = json.loads((tmp_path / "results.json").read_text())
    active = results["active_mlp_params"]
    # equal active parameters: AoE within 0.5% of the dense MLP, the MoE adds only its router
    assert abs(active["aoe"] / active["dense"] - 1) < 0.005 and active["moe"] - active["dense"] == 128 * 8
    history = json.loads((tmp_path / "seed0" / "aoe" / "log_history.json").read_text())
    assert any("aux_loss" in h for h in history)


def test_kv_cache_smoke(repo_root, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RLKIT_DATA_DIR", str(data_dir))
    out, res = _run_bench(repo_root, "kv_cache.py", "--smoke", "--jobs", "1", "--out", str(tmp_path))
    for key in ("polar_bytes_ratio", "think_bytes_ratio", "gsm8k_delta_polar", "gsm8k_delta_think"):
        assert key in res, res
    # the byte ratios are measured, not assumed: PolarQuant 4+4 bits is 4.25 bits + the fp residual at 260 tokens
    assert 0.26 < float(res["polar_bytes_ratio"]) < 0.3 and 0.6 < float(res["think_bytes_ratio"]) < 0.7
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["gsm8k"]) == {"none", "polarquant", "think"} and results["gsm8k"]["none"]["summary"]["n"] == 4
    assert set(results["retrieval"]) == {"none", "polarquant", "think", "both"}


def test_oreo_smoke(repo_root, tmp_path):
    """bench/oreo.py --smoke runs every stage (SFT, sample, RS, DPO, OREO token and step level) and every
    decoder (greedy, majority, value search, constant-scorer search) on the synthetic task."""
    out, res = _run_bench(repo_root, "oreo.py", "--smoke", "--jobs", "1", "--out", str(tmp_path))
    keys = ("acc_sft", "acc_rs", "acc_dpo", "acc_oreo", "acc_oreo_step", "acc_greedy", "acc_majority",
            "acc_value_search", "acc_const_search")
    for key in keys:
        assert key in res and 0 <= float(res[key]) <= 1, res
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]["0"]) == {"sft", "rs", "dpo", "oreo", "oreo_step"}
    assert (tmp_path / "seed0" / "oreo" / "final" / "critic" / "value_model.json").is_file()
    assert (tmp_path / "seed0" / "dpo" / "pairs.jsonl").stat().st_size > 0
    search = results["decoders"]["0"]["value_search_b2"]
    assert search["sampled_steps"] > 0 and search["rounds"] >= 1


def test_rsd_and_prm_smoke(repo_root, tmp_path):
    """bench/rsd.py --smoke trains the draft, the ER-PRM and the target and decodes draft-only, target-only,
    RSD and best-of-N; bench/prm.py --smoke in the same folder reuses the generator, samples, labels and ER-PRM
    (finished stages are skipped) and trains the hard, soft and outcome baselines for best-of-N."""
    out, res = _run_bench(repo_root, "rsd.py", "--smoke", "--out", str(tmp_path))
    for key in ("acc_target", "acc_draft", "acc_rsd", "acc_bon"):
        assert 0 <= float(res[key]) <= 1, res
    assert float(res["flops_ratio_rsd_target"]) > 0 and 0 <= float(res["acceptance_rate"]) <= 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rsd_0.7"]["models"]["prm"]["calls"] > 0
    out, res = _run_bench(repo_root, "prm.py", "--smoke", "--out", str(tmp_path))
    for n in (2, 4):
        for kind in ("er", "hard", "soft", "orm", "majority"):
            assert 0 <= float(res[f"bon_{kind}_{n}"]) <= 1, res
    train_log = (tmp_path / "train.log").read_text()
    assert "stage 'label' already finished" in train_log and "stage 'prm' already finished" in train_log
    for stage in ("prm", "prm_hard", "prm_soft", "orm"):
        assert (tmp_path / stage / "final" / "prm.json").is_file()


def test_autocei_smoke(repo_root, tmp_path):
    """bench/autocei.py --smoke runs SFT, plain EI (mode ei), R-Tuning and Auto-CEI (R-Tuning round, 2 curricula) from
    one SFT model and evaluates the four models with the IDK figures."""
    out, res = _run_bench(repo_root, "autocei.py", "--smoke", "--out", str(tmp_path))
    for key in ("f_autocei", "f_ei", "f_rtuning", "f_sft", "precision_autocei", "precision_ei", "idk_rate_autocei",
                "idk_rate_rtuning", "accuracy_autocei"):
        assert key in res and 0 <= float(res[key]) <= 1, res
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["per_seed"]["0"]) == {"sft", "ei", "rtuning", "autocei"}
    assert [c["c1"] for c in results["curricula"]["0"]["tried"]] == [2.0, 2.5]  # one step up after the first
    state = json.loads((tmp_path / "seed0" / "autocei" / "state.json").read_text())
    assert (Path(state["best"]["model"]) / "model.safetensors").is_file()
    assert (tmp_path / "seed0" / "autocei" / "rtuning" / "round_1" / "data" / "sft_data.jsonl").stat().st_size > 0


def test_bolt_smoke(repo_root, tmp_path):
    """bench/bolt.py --smoke: warm-up, in-context bootstrapping, SFT, 3 DPO iterations and the GRPO arm on the tiny
    model; every stage evaluated (format / score / acc) and the RESULT line carries the issue's keys."""
    out, res = _run_bench(repo_root, "bolt.py", "--smoke", "--out", str(tmp_path))
    for key in ("format_base", "format_sft", "score_base", "score_sft", "score_dpo1", "score_dpo3", "score_grpo",
                "format_dpo3"):
        assert 0 <= float(res[key]) <= 1, res
    assert int(res["kept"]) > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["figures"]) == {"base", "base_icl", "sft", "dpo1", "dpo2", "dpo3", "grpo"}
    for it in (1, 2, 3):  # each DPO iteration saved a model (trained on best/worst pairs, or kept when none)
        summary = json.loads((tmp_path / f"dpo{it}" / "summary.json").read_text())
        assert summary["dpo_pairs"] >= 0 and (tmp_path / f"dpo{it}" / "final" / "model.safetensors").is_file()


def test_dfc_smoke(repo_root, tmp_path):
    """bench/dfc.py --smoke: demonstrations + SFT base, then DFC (3 specialists, 2 fusions, 2 conquer runs) and the
    joint arm for the same number of steps, every model evaluated; the RESULT line carries the issue's keys."""
    pytest.importorskip("textarena")
    out, res = _run_bench(repo_root, "dfc.py", "--smoke", "--out", str(tmp_path))
    for key in ("win_dfc", "win_joint", "win_base", "win_specialists"):
        assert 0 <= float(res[key]) <= 1, res
    assert int(res["games"]) == 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]) == {"base", "joint", "specialists", "dfc"}
    state = json.loads((tmp_path / "seed0" / "dfc" / "state.json").read_text())
    assert [p for p in state["phases"]] == ["divide/group_1", "divide/group_2", "divide/group_3", "fuse/group_2",
                                            "conquer/group_2", "fuse/group_3", "conquer/group_3"]
    joint = json.loads((tmp_path / "seed0" / "joint" / "state.json").read_text())
    assert joint["steps"]["total"] == state["steps"]["total"] == 5  # the same RL budget: 3 x 1 + 2 x 1


def test_first_smoke(repo_root, tmp_path):
    """bench/first.py --smoke: teacher SFT, top-k preparation with tau chosen on held-out rows, the four student arms
    (SFT, full-logit KD, FIRST at tau 1 and at the chosen tau) from one start, each evaluated for accuracy and ECE."""
    out, res = _run_bench(repo_root, "first.py", "--smoke", "--jobs", "1", "--out", str(tmp_path))
    for arm in ("sft", "kd", "first", "first_uncal"):
        assert 0 <= float(res[f"acc_{arm}"]) <= 1, res
        assert f"ece_{arm}" in res  # nan when a smoke-sized model writes no answer to be confident in
    assert 0 < float(res["topk_bytes_ratio"]) < 1 and float(res["tau"]) > 0
    meta = json.loads((tmp_path / "prepare" / "topk_meta.json").read_text())
    assert meta["bytes_topk"] == meta["tokens"] * meta["k"] * 8  # int32 id + float32 log-prob per entry
    for arm in ("sft", "kd", "first", "first_uncal"):
        assert (tmp_path / f"{arm}_s0" / "final" / "model.safetensors").is_file()


def test_dricl_smoke(repo_root, tmp_path):
    """bench/dricl.py --smoke: many-shot episodes, plain many-shot NLL and DR-ICL from the same model, both and the base
    evaluated on held-out tasks; the RESULT line carries acc_nll_<k> and acc_dricl_<k> for every k of the issue."""
    out, res = _run_bench(repo_root, "dricl.py", "--smoke", "--out", str(tmp_path))
    for k in (0, 1, 5, 10, 25, 50, 100):
        assert f"acc_nll_{k}" in res and f"acc_dricl_{k}" in res, res
    for k in (0, 1, 5):  # the k the smoke preset evaluates
        for arm in ("base", "nll", "dricl"):
            assert 0 <= float(res[f"acc_{arm}_{k}"]) <= 1, res


def test_mathhay_smoke(repo_root, tmp_path):
    """bench/mathhay.py --smoke: items built in the tiny model's tokens, every configuration (default cache,
    PolarQuant, ThinK per query head and per KV head, PEAR trained then applied as a patch) scored per length, key
    bytes measured on the longest prompt, the plot written."""
    out, res = _run_bench(repo_root, "mathhay.py", "--smoke", "--out", str(tmp_path))
    for cfg in ("none", "polar", "think", "think_kv", "pear"):
        for length in ("800", "1k"):
            assert 0 <= float(res[f"acc_{cfg}_{length}"]) <= 1, res
    nbytes = {cfg: int(res[f"bytes_{cfg}"]) for cfg in ("none", "polar", "think", "think_kv")}
    assert nbytes["polar"] < nbytes["think_kv"] < nbytes["none"], nbytes  # 4-bit keys; ThinK keeps 60% of channels
    assert float(res["bytes_ratio_none"]) == pytest.approx(1.0)
    coefficients = json.loads((tmp_path / "pear_coefficients.json").read_text())["coefficients"]
    assert coefficients and all(len(c) == 3 for c in coefficients)
    assert int(res["items_per_length"]) == 3
    assert (tmp_path / "mathhay.png").stat().st_size > 1000


def test_samplers_smoke(repo_root, tmp_path):
    """bench/samplers.py --smoke runs part (a) (SGLD vs SPS-SGLD vs SPS-MALA, d = 2) and part (b) (DDPM/DDIM/RTK) and
    prints both parts' keys on one RESULT line."""
    out, res = _run_bench(repo_root, "samplers.py", "--smoke", "--out", str(tmp_path))
    for key in ("sps_grad_ratio_d2", "sps_sgld_grad_ratio_d2", "sps_mala_grad_ratio_d2", "eps_d2", "err_sgld_d2",
                "rtk_nfe_ratio"):
        assert key in res and (res[key] == "inf" or float(res[key]) >= 0), res
    results = json.loads((tmp_path / "sps_results.json").read_text())
    assert set(results["results"]["2"]["best"]) == {"sgld", "sps_sgld", "sps_mala"}
    assert (tmp_path / "samplers_sps.png").stat().st_size > 0
